"""Which weights an evaluation measured, and how their training framed text.

`describe_checkpoint(path)` turns what a user typed (a run dir, its checkpoints/ dir, one
step dir, or a Huginn-layout dir) into one concrete directory, once, so everything after it
reads the same weights even while training keeps publishing newer checkpoints. Results
record its step and a sha256 of its weights; a sweep never mixes results of two weights.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


class CheckpointMismatch(ValueError):
    user_facing = True


@dataclass
class CheckpointInfo:
    path: Path  # the concrete directory evaluated
    layout: str  # "rdp" (this project's checkpoint) or "huginn" (config.json + safetensors)
    step: Optional[int]  # training step; None for a Huginn-layout dir
    add_bos: bool  # training documents started with BOS (evaluation prompts do too)
    weight_files: list[Path] = field(default_factory=list)
    _sha256: Optional[str] = None

    def weights_sha256(self) -> str:
        """sha256 over the weight files (name and bytes, in name order); computed once."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            for path in self.weight_files:
                digest.update(path.name.encode() + b"\0")
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def record(self) -> dict:
        """What a result stores about the checkpoint it measured."""
        return {"checkpoint_dir": str(self.path), "step": self.step, "weights_sha256": self.weights_sha256()}

    def describe(self) -> str:
        step = f"step {self.step}" if self.step is not None else "no step"
        return f"{self.path} ({step}, weights sha256 {self.weights_sha256()[:12]})"

    def expect(self, sha256: Optional[str]) -> None:
        if sha256 and sha256 != self.weights_sha256():
            raise CheckpointMismatch(f"checkpoint {self.describe()}: weights are not the ones this job was submitted "
                                     f"for (sha256 {sha256[:12]}); the checkpoint was replaced after submission")


def _huginn_weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = sorted(p.name for p in directory.glob("*.safetensors"))
    return [directory / name for name in names]


def describe_checkpoint(path: str | Path) -> CheckpointInfo:
    from rdp.evals.chat import read_tokenizer_config
    from rdp.pretrain.checkpoint import (CONFIG_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE, checkpoint_step,
                                         read_trainer_state, resolve_checkpoint)
    from rdp.pretrain.config import load_config

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    if (path / "config.json").exists():
        # huginn-0125 was trained on documents that start with BOS; an export of ours says so
        # in tokenizer_config.json (Hugging Face's add_bos_token)
        add_bos = bool(read_tokenizer_config(path).get("add_bos_token", True))
        return CheckpointInfo(path.resolve(), "huginn", None, add_bos, _huginn_weight_files(path))
    directory = resolve_checkpoint(path).resolve()
    config = load_config(directory / CONFIG_FILE)
    step = (read_trainer_state(directory)["step"] if (directory / TRAINER_STATE_FILE).exists()
            else checkpoint_step(directory))
    # data.add_bos is null only for weights never trained by `rdp train` on shards, and for runs
    # older than the field: packing wrote no BOS then
    return CheckpointInfo(directory, "rdp", step, bool(config.data.add_bos), [directory / WEIGHTS_FILE])
