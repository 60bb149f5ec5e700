"""Built-in reasoning tasks where depth is necessary: each example is a pure function of
(seed, difficulty, index), so any example can be made without replay, on any rank.

`generate(rng, difficulty)` returns (input ids, labels) of equal length, labels -100 where
a position is not scored. "Difficulty" is the length for the running-state tasks, the
number of bits for prefix sums and the longest chain for pointer chasing.

| task            | input tokens                                     | scored labels                         |
|-----------------|--------------------------------------------------|---------------------------------------|
| parity          | bits b_0..b_i (tokens 0 / 1)                     | at i: (b_0 + ... + b_i) mod 2          |
| s3, s5          | permutations g_0..g_i (index)                    | at i: g_0 o g_1 o ... o g_i (index)    |
| squaring        | r (1..106), then SQUARE tokens                   | at i: r^(2^(i+1)) mod 107              |
| prefix_sums     | n bits, then n query tokens                      | at query j: (b_0 + ... + b_j) mod 2    |
| pointer_chasing | 11 edge slots (one token a->b per edge), then a  | at the query of node v: the last node  |
|                 | query token for each of the 12 nodes in order    | of v's chain                           |

Pointer chasing: the 12 nodes are split into chains; difficulty d puts one chain of exactly
d nodes and splits the rest into chains of 1..d nodes, so the longest chain has d nodes
and its first node needs d-1 hops. Chains are drawn from a permutation, edges listed in
random order, free slots hold NO_EDGE. The sequence length is 23 at every difficulty, so
a harder split is longer chains, not longer inputs.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

IGNORE = -100
PRIME = 107
SQUARE_TOKEN = PRIME  # token 107 means "square again"
QUERY_TOKEN = 2  # prefix sums: "the prefix sum up to the j-th bit, please"
NODES = 12
EDGE_BASE = NODES  # token of edge a -> b: EDGE_BASE + a * NODES + b
NO_EDGE = EDGE_BASE + NODES * NODES


@lru_cache(maxsize=None)
def permutations(n: int) -> tuple[tuple[int, ...], ...]:
    return tuple(itertools.permutations(range(n)))


@lru_cache(maxsize=None)
def composition_table(n: int) -> np.ndarray:
    """table[a, b] = index of (perm_a o perm_b), i.e. x -> perm_a[perm_b[x]]."""
    perms = permutations(n)
    index = {p: i for i, p in enumerate(perms)}
    return np.array([[index[tuple(a[b[x]] for x in range(n))] for b in perms] for a in perms], dtype=np.int64)


def parity(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    bits = rng.integers(0, 2, size=length)
    return bits, np.cumsum(bits) % 2


def _permutation_product(n: int):
    def generate(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        table = composition_table(n)
        items = rng.integers(0, math.factorial(n), size=length)
        labels = np.empty(length, dtype=np.int64)
        state = labels[0] = items[0]
        for i in range(1, length):
            state = labels[i] = table[state, items[i]]
        return items, labels
    return generate


def squaring(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    r = int(rng.integers(1, PRIME))
    inputs = np.full(length, SQUARE_TOKEN, dtype=np.int64)
    inputs[0] = r
    labels = np.empty(length, dtype=np.int64)
    for i in range(length):
        r = r * r % PRIME
        labels[i] = r
    return inputs, labels


def prefix_sums(rng: np.random.Generator, bits: int) -> tuple[np.ndarray, np.ndarray]:
    values = rng.integers(0, 2, size=bits)
    inputs = np.concatenate([values, np.full(bits, QUERY_TOKEN)])
    labels = np.concatenate([np.full(bits, IGNORE), np.cumsum(values) % 2])
    return inputs, labels


def chain_lengths(rng: np.random.Generator, longest: int, nodes: int = NODES) -> list[int]:
    """One chain of `longest` nodes, the rest in chains of 1..longest nodes."""
    lengths, rest = [longest], nodes - longest
    while rest > 0:
        lengths.append(min(int(rng.integers(1, longest + 1)), rest))
        rest -= lengths[-1]
    return lengths


def pointer_chasing(rng: np.random.Generator, longest: int) -> tuple[np.ndarray, np.ndarray]:
    if not 1 <= longest <= NODES:
        raise ValueError(f"pointer_chasing: difficulty (longest chain) must be in 1..{NODES}, got {longest}")
    order = rng.permutation(NODES)
    last = np.empty(NODES, dtype=np.int64)
    edges, start = [], 0
    for length in chain_lengths(rng, longest):
        chain = order[start:start + length]
        start += length
        edges += [EDGE_BASE + a * NODES + b for a, b in zip(chain[:-1], chain[1:])]
        last[chain] = chain[-1]
    slots = np.full(NODES - 1, NO_EDGE, dtype=np.int64)
    slots[:len(edges)] = edges
    inputs = np.concatenate([rng.permutation(slots), np.arange(NODES)])
    labels = np.concatenate([np.full(NODES - 1, IGNORE), last])
    return inputs, labels


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    generate: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    vocab_size: int  # largest token id + 1
    train_difficulty: int
    test_difficulties: tuple[int, ...]  # beyond the training difficulty
    description: str

    def splits(self) -> dict[str, int]:
        """train, easy (the training difficulty, held-out examples), hard<d> (never trained)."""
        out = {"train": self.train_difficulty, "easy": self.train_difficulty}
        out.update({f"hard{d}": d for d in self.test_difficulties})
        return out

    def example(self, seed: int, difficulty: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        inputs, labels = self.generate(np.random.Generator(np.random.PCG64([seed, difficulty, index])), difficulty)
        return np.asarray(inputs, dtype=np.int64), np.asarray(labels, dtype=np.int64)


BUILTIN_TASKS = {task.name: task for task in (
    BuiltinTask("parity", parity, 2, 16, (32, 64), "running parity of a bit string"),
    BuiltinTask("s3", _permutation_product(3), 6, 8, (16, 32), "running product in the group S3"),
    BuiltinTask("s5", _permutation_product(5), 120, 8, (16, 32), "running product in the group S5"),
    BuiltinTask("squaring", squaring, PRIME + 1, 6, (12, 24), "repeated squaring mod 107"),
    BuiltinTask("prefix_sums", prefix_sums, 3, 16, (32, 64),
                "prefix sums mod 2 of a bit string, asked after the whole string (deep-thinking's task)"),
    BuiltinTask("pointer_chasing", pointer_chasing, NO_EDGE + 1, 4, (6, 8),
                "12 nodes in chains, one token per edge; every node asks for the last node of its chain"),
)}
