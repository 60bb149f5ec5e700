"""What a run directory holds, and the start-up rules that keep one run from destroying another.

A run directory holds a run once the trainer has written any of its artifacts there. A
fresh start (`train.resume=none`) into such a directory is refused before anything is
written, naming what is there and the three ways on: resume it (`train.resume=auto`),
choose another `train.run_dir`, or replace it explicitly (`rdp train --overwrite`). The
same holds for continuing another run's checkpoint (`train.resume=PATH`) into it. Files the
trainer does not own (a `slurm/` folder of `rdp submit`, a copied tokenizer, notes) never
make a directory count as a run and are never removed, not even by `--overwrite`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from rdp.pretrain.checkpoint import (CHECKPOINT_DIR, CONFIG_FILE, LATEST_POINTER, STAGING_PREFIX,
                                     checkpoint_step)

METRICS_FILE = "metrics.jsonl"
FINISHED_MARKER = "FINISHED"  # the SLURM chain (slurm/render.py) stops resubmitting once it exists
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # pretrain/wandb_sink.py: the W&B run id a resumed run continues
# everything the trainer writes into a run dir; --overwrite removes exactly these
RUN_ARTIFACTS = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, FINISHED_MARKER, TENSORBOARD_DIR, WANDB_DIR)


class RunDirError(RuntimeError):
    user_facing = True


def describe_run(run_dir: Path) -> list[str]:
    """What of a run `run_dir` holds, in words (empty: no run there)."""
    found = []
    checkpoints = run_dir / CHECKPOINT_DIR
    if checkpoints.is_dir():
        steps = sorted(s for s in (checkpoint_step(p) for p in checkpoints.glob("step_*")) if s is not None)
        if steps:
            found.append(f"{len(steps)} checkpoint(s) up to step {steps[-1]}")
        elif (checkpoints / LATEST_POINTER).exists() or any(checkpoints.glob(f"{STAGING_PREFIX}*")):
            found.append(f"{CHECKPOINT_DIR}/ (partly written)")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        found.append(f"{METRICS_FILE} up to step {_last_logged_step(metrics)}")
    for name in (CONFIG_FILE, FINISHED_MARKER):
        if (run_dir / name).exists():
            found.append(name)
    return found


def _last_logged_step(path: Path) -> str:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            return str(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return "?"


def check_fresh_start(run_dir: Path, resume: str, overwrite: bool) -> None:
    """Refuse, changing nothing, to start a run in a directory that already holds one
    (unless `overwrite`). `resume` is the config's train.resume."""
    if overwrite:
        return
    held = describe_run(run_dir)
    if not held:
        return
    if resume == "none":
        raise RunDirError(
            f"train.run_dir {run_dir} already holds a run ({', '.join(held)}); nothing was changed. "
            f"Resume it with train.resume=auto, choose another train.run_dir, or pass --overwrite to replace it")
    if resume != "auto" and not _inside(Path(resume), run_dir / CHECKPOINT_DIR) and not _same(Path(resume), run_dir):
        raise RunDirError(
            f"train.run_dir {run_dir} already holds a run ({', '.join(held)}); train.resume={resume} would continue "
            f"another run's checkpoint into it; nothing was changed. Choose another train.run_dir, or pass "
            f"--overwrite to replace it")


def remove_run(run_dir: Path) -> list[str]:
    """--overwrite: delete the trainer's artifacts of the run in `run_dir` (nothing else)."""
    removed = []
    for name in RUN_ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False
