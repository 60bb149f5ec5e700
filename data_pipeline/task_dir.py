"""A task directory from a user: `train.jsonl` plus one `<split>.jsonl` per test split.

Each line is `{"input": [ids], "labels": [ids or -100], "difficulty": int (optional)}`;
input and labels have equal length, lengths may differ between lines (batches are padded
and the padding masked). Every problem is reported as one line naming the file and line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from rdp.data_pipeline.jsonl import read_jsonl
from rdp.data_pipeline.manifest import DataError

IGNORE = -100
TRAIN_SPLIT = "train"
NO_DIFFICULTY = -1


@dataclass
class SplitFile:
    path: Path
    inputs: list[np.ndarray]
    labels: list[np.ndarray]
    difficulty: np.ndarray  # NO_DIFFICULTY where a line gives none

    @property
    def max_length(self) -> int:
        return max(len(x) for x in self.inputs)

    @property
    def max_id(self) -> int:
        return max(max(int(x.max()), int(y.max())) for x, y in zip(self.inputs, self.labels))

    def check_vocabulary(self, vocab_size: int, field: str) -> None:
        """The first line holding an id outside [0, vocab_size), named with the config field."""
        for number, (x, y) in enumerate(zip(self.inputs, self.labels), start=1):
            bad_input = x[(x < 0) | (x >= vocab_size)]
            bad_label = y[(y != IGNORE) & ((y < 0) | (y >= vocab_size))]
            for name, bad in (("input", bad_input), ("labels", bad_label)):
                if len(bad):
                    raise DataError(f"{self.path}:{number}: {name} id {int(bad[0])} is outside the vocabulary "
                                    f"[0, {vocab_size}) of {field}")


def _ids(value, path: Path, number: int, name: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise DataError(f"{path}:{number}: {name!r} must be a non-empty list of token ids")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(f"{path}:{number}: {name!r} must hold integers only")
    return np.asarray(value, dtype=np.int64)


def read_split(path: Path) -> SplitFile:
    if not path.is_file():
        raise DataError(f"{path}: no such split file")
    inputs, labels, difficulty = [], [], []
    for number, record in read_jsonl(path):
        if not isinstance(record, dict) or "input" not in record or "labels" not in record:
            raise DataError(f"{path}:{number}: expected an object with \"input\" and \"labels\"")
        x = _ids(record["input"], path, number, "input")
        y = _ids(record["labels"], path, number, "labels")
        if len(x) != len(y):
            raise DataError(f"{path}:{number}: \"input\" has {len(x)} ids but \"labels\" has {len(y)}; "
                            f"they must have equal length")
        if (x < 0).any():
            raise DataError(f"{path}:{number}: input id {int(x[x < 0][0])} is negative")
        if ((y < 0) & (y != IGNORE)).any():
            raise DataError(f"{path}:{number}: label {int(y[(y < 0) & (y != IGNORE)][0])} is negative "
                            f"(only -100, not scored, may be)")
        if (y == IGNORE).all():
            raise DataError(f"{path}:{number}: every label is -100; the line scores nothing")
        level = record.get("difficulty")
        if level is None:
            level = NO_DIFFICULTY
        elif not isinstance(level, int) or isinstance(level, bool) or level < 0:
            raise DataError(f"{path}:{number}: \"difficulty\" must be a non-negative integer, got {level!r}")
        inputs.append(x)
        labels.append(y)
        difficulty.append(level)
    if not inputs:
        raise DataError(f"{path}: empty file (no examples)")
    return SplitFile(path, inputs, labels, np.asarray(difficulty, dtype=np.int64))


class TaskDirectory:
    """All splits of a directory, read and checked once."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DataError(f"{self.directory}: not a task directory")
        names = sorted(p.stem for p in self.directory.glob("*.jsonl"))
        if TRAIN_SPLIT not in names:
            raise DataError(f"{self.directory}: missing split {TRAIN_SPLIT}.jsonl (a task directory holds "
                            f"train.jsonl and one <split>.jsonl per test split)")
        self.name = self.directory.name
        self.files = {name: read_split(self.directory / f"{name}.jsonl") for name in names}

    def split_names(self) -> list[str]:
        return [TRAIN_SPLIT] + [n for n in self.files if n != TRAIN_SPLIT]

    def split(self, name: str) -> SplitFile:
        if name not in self.files:
            raise DataError(f"{self.directory}: missing split {name}.jsonl (has: {', '.join(self.split_names())})")
        return self.files[name]

    @property
    def vocab_size(self) -> int:
        return max(f.max_id for f in self.files.values()) + 1

    @property
    def seq_len(self) -> int:
        return max(f.max_length for f in self.files.values())

    def num_examples(self, split: str) -> Optional[int]:
        return len(self.split(split).inputs)
