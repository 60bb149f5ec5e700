"""Reasoning tasks as data: examples of token ids with per-position labels (-100 = not
scored), a difficulty, and named splits; a built-in task or a user's task directory behind
one interface, and the training stream over a task's train split.

Split "train" is what training reads; every other split is a test split. A built-in task
makes train examples from the data seed and test examples from seed + EVAL_SEED_OFFSET (its
"easy" split has the training difficulty, "hard<d>" harder ones); a directory's splits are
its files. The stream's state is the global position in the train split's order (for a
directory: one permutation per epoch from (seed, epoch)), so resume is exact on any number
of data-parallel ranks, like every other stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rdp.data_pipeline.builtin_tasks import BUILTIN_TASKS, BuiltinTask
from rdp.data_pipeline.manifest import DataError
from rdp.data_pipeline.task_dir import IGNORE, NO_DIFFICULTY, TRAIN_SPLIT, TaskDirectory

EVAL_SEED_OFFSET = 1_000_003  # test splits of built-in tasks: another seed than training
SOURCE_PREFIXES = ("task:", "reasoning:")  # data.source=task:NAME_OR_DIR (reasoning: is the older spelling)


@dataclass
class TaskBatch:
    inputs: torch.Tensor  # (batch, length) int64, right-padded with 0
    labels: torch.Tensor  # (batch, length) int64, -100 where not scored or padded
    difficulty: torch.Tensor  # (batch,) int64, -1 where not given


def _pad(rows: list[tuple[np.ndarray, np.ndarray, int]], length: int) -> TaskBatch:
    inputs = np.zeros((len(rows), length), dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE, dtype=np.int64)
    for i, (x, y, _) in enumerate(rows):
        inputs[i, :len(x)] = x
        labels[i, :len(y)] = y
    difficulty = np.asarray([d for _, _, d in rows], dtype=np.int64)
    return TaskBatch(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(difficulty))


class Task:
    """A built-in task (generated) or a task directory (read), seen the same way."""

    def __init__(self, spec: str):
        self.spec = spec
        self.builtin: Optional[BuiltinTask] = BUILTIN_TASKS.get(spec)
        self.directory: Optional[TaskDirectory] = None
        if self.builtin is None:
            if not Path(spec).is_dir():
                raise DataError(f"task {spec!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) "
                                f"and not a task directory")
            self.directory = TaskDirectory(spec)
        self.name = self.builtin.name if self.builtin else self.directory.name

    # ---- shape ----------------------------------------------------------------------------------
    def split_names(self) -> list[str]:
        return list(self.builtin.splits()) if self.builtin else self.directory.split_names()

    def test_splits(self) -> list[str]:
        return [s for s in self.split_names() if s != TRAIN_SPLIT]

    def check_split(self, split: str) -> None:
        if split not in self.split_names():
            where = self.directory.directory if self.directory else f"task {self.name}"
            raise DataError(f"{where}: missing split {split!r} (has: {', '.join(self.split_names())})")

    @property
    def vocab_size(self) -> int:
        """Largest id in inputs and labels + 1."""
        return self.builtin.vocab_size if self.builtin else self.directory.vocab_size

    @property
    def seq_len(self) -> int:
        """The longest example of any split."""
        if self.directory:
            return self.directory.seq_len
        return max(len(self.builtin.example(0, d, 0)[0]) for d in set(self.builtin.splits().values()))

    def num_examples(self, split: str) -> Optional[int]:
        """Examples in a split; None for a built-in task (as many as asked for)."""
        self.check_split(split)
        return None if self.builtin else self.directory.num_examples(split)

    def check_fits(self, vocab_size: int, seq_len: int, seq_field: str = "data.seq_len") -> None:
        """Every id inside the configured vocabulary, every example within data.seq_len."""
        if self.builtin:
            if self.vocab_size > vocab_size:
                raise DataError(f"task {self.name} uses ids up to {self.vocab_size - 1}: outside the vocabulary "
                                f"[0, {vocab_size}) of model.vocab_size")
            if self.seq_len > seq_len:
                raise DataError(f"task {self.name}: examples of {self.seq_len} tokens exceed {seq_field} {seq_len}")
            return
        for split in self.split_names():
            part = self.directory.split(split)
            part.check_vocabulary(vocab_size, "model.vocab_size")
            too_long = [i for i, x in enumerate(part.inputs, start=1) if len(x) > seq_len]
            if too_long:
                raise DataError(f"{part.path}:{too_long[0]}: {len(part.inputs[too_long[0] - 1])} tokens exceed "
                                f"{seq_field} {seq_len}")

    # ---- examples ---------------------------------------------------------------------------------
    def examples(self, split: str, first: int, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Examples first .. first+count-1 of a split: for "train" in the training order of
        `seed` (endless), for a test split in file / generation order."""
        self.check_split(split)
        if self.builtin:
            difficulty = self.builtin.splits()[split]
            split_seed = seed if split == TRAIN_SPLIT else seed + EVAL_SEED_OFFSET
            return [(*self.builtin.example(split_seed, difficulty, i), difficulty) for i in range(first, first + count)]
        part = self.directory.split(split)
        size = len(part.inputs)
        if split == TRAIN_SPLIT:
            indices = [_epoch_order(seed, size, i // size)[i % size] for i in range(first, first + count)]
        else:
            if first + count > size:
                raise DataError(f"{part.path}: has {size} examples, asked for {first + count}")
            indices = range(first, first + count)
        return [(part.inputs[i], part.labels[i], int(part.difficulty[i])) for i in indices]

    def batch(self, split: str, first: int, count: int, seed: int, length: Optional[int] = None) -> TaskBatch:
        rows = self.examples(split, first, count, seed)
        return _pad(rows, length or max(len(x) for x, _, _ in rows))


@lru_cache(maxsize=4)
def _epoch_order(seed: int, size: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(size)


@lru_cache(maxsize=8)
def _load(spec: str) -> Task:
    return Task(spec)


def load_task(spec: str) -> Task:
    """A built-in task name or a task directory (read once per process)."""
    return _load(str(spec))


def task_of_source(source: str) -> Optional[str]:
    """The task named by data.source (task:NAME_OR_DIR), or None for other sources."""
    for prefix in SOURCE_PREFIXES:
        if source.startswith(prefix):
            return source[len(prefix):]
    return None


class TaskStream:
    """Training batches of a task's train split at data.seq_len for one data-parallel rank;
    the state is the global sample position."""

    def __init__(self, task: str, seq_len: int, vocab_size: int, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.task = load_task(task)
        self.task.check_fits(vocab_size, seq_len)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.position + self.rank * self.micro_batch_size
        self.position += self.world_size * self.micro_batch_size
        batch = self.task.batch(TRAIN_SPLIT, first, self.micro_batch_size, self.seed, self.seq_len)
        return batch.inputs, batch.labels

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": 0}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


# ---- scoring (shared by validation during training and evaluation sweeps) ---------------------------
@dataclass
class TaskScore:
    """Counts over scored examples; an example is right when every scored position is."""
    examples: int = 0
    exact: int = 0
    positions: int = 0
    positions_right: int = 0
    by_difficulty: dict[int, list[int]] = field(default_factory=dict)  # difficulty -> [exact, examples]
    loss_sum: Optional[float] = None  # cross-entropy summed over scored positions, when logits are given

    def add(self, predictions: torch.Tensor, labels: torch.Tensor, difficulty: torch.Tensor,
            logits: Optional[torch.Tensor] = None) -> None:
        scored = labels != IGNORE
        if logits is not None:
            self.loss_sum = (self.loss_sum or 0.0) + float(torch.nn.functional.cross_entropy(
                logits.flatten(0, -2).float(), labels.flatten().to(logits.device), ignore_index=IGNORE, reduction="sum"))
        right = (predictions == labels) & scored
        whole = (right | ~scored).all(dim=-1)
        self.examples += len(labels)
        self.exact += int(whole.sum())
        self.positions += int(scored.sum())
        self.positions_right += int(right.sum())
        for level, ok in zip(difficulty.tolist(), whole.tolist()):
            if level != NO_DIFFICULTY:
                entry = self.by_difficulty.setdefault(int(level), [0, 0])
                entry[0] += int(ok)
                entry[1] += 1

    def summary(self) -> dict:
        out = {"exact_match": self.exact / max(1, self.examples),
               "position_accuracy": self.positions_right / max(1, self.positions), "examples": self.examples}
        if self.loss_sum is not None:
            out["loss"] = self.loss_sum / max(1, self.positions)
        if self.by_difficulty:
            out["accuracy_by_difficulty"] = {str(d): right / n for d, (right, n) in sorted(self.by_difficulty.items())}
        return out
