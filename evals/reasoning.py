"""Synthetic reasoning tasks where depth visibly matters (the "easy-to-hard" setting:
train on short instances, test on longer ones with more test-time iterations).

Every task is a running state over a sequence, written token-aligned: input token i is
the next item, label i is the state after it, so one forward predicts the whole answer
and scoring is whole-answer exact match (every position's argmax right).

| task     | input tokens                       | label at position i                  |
|----------|------------------------------------|--------------------------------------|
| parity   | bits b_0..b_i (tokens 0 / 1)       | (b_0 + ... + b_i) mod 2               |
| s3, s5   | permutations g_0..g_i (index)      | g_0 o g_1 o ... o g_i (index)         |
| squaring | r (1..106), then SQUARE tokens     | r^(2^(i+1)) mod 107                   |

Training data come from `ReasoningStream` (data.source = "reasoning:<task>"), a stream of
the trainer's protocol whose sample i is a pure function of (seed, i).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

PRIME = 107
SQUARE_TOKEN = PRIME  # token 107 means "square again"


@lru_cache(maxsize=None)
def permutations(n: int) -> tuple[tuple[int, ...], ...]:
    return tuple(itertools.permutations(range(n)))


@lru_cache(maxsize=None)
def composition_table(n: int) -> np.ndarray:
    """table[a, b] = index of (perm_a o perm_b), i.e. x -> perm_a[perm_b[x]]."""
    perms = permutations(n)
    index = {p: i for i, p in enumerate(perms)}
    return np.array([[index[tuple(a[b[x]] for x in range(n))] for b in perms] for a in perms], dtype=np.int64)


@dataclass(frozen=True)
class ReasoningTask:
    name: str
    num_symbols: int  # tokens 0..num_symbols-1 are used
    train_length: int
    test_lengths: tuple[int, ...]

    def sample(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        if self.name == "parity":
            bits = rng.integers(0, 2, size=length)
            return bits, np.cumsum(bits) % 2
        if self.name in ("s3", "s5"):
            n = 3 if self.name == "s3" else 5
            table = composition_table(n)
            items = rng.integers(0, math.factorial(n), size=length)
            labels = np.empty(length, dtype=np.int64)
            state = items[0]
            labels[0] = state
            for i in range(1, length):
                state = table[state, items[i]]
                labels[i] = state
            return items, labels
        if self.name == "squaring":
            r = int(rng.integers(1, PRIME))
            inputs = np.full(length, SQUARE_TOKEN, dtype=np.int64)
            inputs[0] = r
            labels = np.empty(length, dtype=np.int64)
            for i in range(length):
                r = r * r % PRIME
                labels[i] = r
            return inputs, labels
        raise ValueError(f"unknown reasoning task {self.name!r}")

    def batch(self, seed: int, first_index: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.sample(np.random.Generator(np.random.PCG64([seed, length, first_index + i])), length)
                for i in range(count)]
        inputs = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
        labels = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))
        return inputs, labels

    def splits(self) -> dict[str, int]:
        """easy = the training length, hard_* = the longer test lengths."""
        out = {"easy": self.train_length}
        out.update({f"hard{length}": length for length in self.test_lengths if length != self.train_length})
        return out


TASKS = {
    "parity": ReasoningTask("parity", 2, 16, (32, 64)),
    "s3": ReasoningTask("s3", 6, 8, (16, 32)),
    "s5": ReasoningTask("s5", 120, 8, (16, 32)),
    "squaring": ReasoningTask("squaring", PRIME + 1, 6, (12, 24)),
}
EVAL_SEED_OFFSET = 1_000_003  # held-out examples: a different seed than training


def get_task(name: str) -> ReasoningTask:
    if name not in TASKS:
        raise ValueError(f"unknown reasoning task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


class ReasoningStream:
    """Training batches of one task at data.seq_len for one data-parallel rank; the state is
    the global sample position, so resume (on any number of ranks) is exact."""

    def __init__(self, task: str, seq_len: int, vocab_size: int, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.task = get_task(task)
        if self.task.num_symbols > vocab_size:
            raise ValueError(f"reasoning task {task} needs model.vocab_size >= {self.task.num_symbols}, got {vocab_size}")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.position + self.rank * self.micro_batch_size
        self.position += self.world_size * self.micro_batch_size
        return self.task.batch(self.seed, first, self.micro_batch_size, self.seq_len)

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": 0}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


@torch.no_grad()
def exact_match(model, task: ReasoningTask, length: int, depth: int, num_examples: int = 256,
                batch_size: int = 64, seed: int = 0) -> tuple[float, float, float]:
    """Whole-answer exact match (all positions right) at test-time depth `depth`, its
    binomial standard error, and the per-position accuracy (partial progress that exact
    match hides); deterministic state init (init_scale 0)."""
    device = next(model.parameters()).device
    correct = positions_right = 0
    for first in range(0, num_examples, batch_size):
        count = min(batch_size, num_examples - first)
        inputs, labels = task.batch(seed + EVAL_SEED_OFFSET, first, count, length)
        logits = model(inputs.to(device), num_steps=(depth, 0), init_scale=0.0).logits
        right = logits.argmax(-1).cpu() == labels
        correct += int(right.all(dim=-1).sum())
        positions_right += int(right.sum())
    accuracy = correct / num_examples
    return (accuracy, math.sqrt(max(accuracy * (1 - accuracy), 0.0) / num_examples),
            positions_right / (num_examples * length))
