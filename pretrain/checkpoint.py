"""Checkpoint layout, integrity and loading.

    RUN_DIR/checkpoints/step_00000040/
        global_step40/ ...            DeepSpeed's sharded model + optimizer state (per TP rank,
                                      per ZeRO partition)
        model.safetensors             consolidated full fp32 weights (single-device layout)
        config.yaml                   the run's resolved config
        trainer_state.json            step, tokens seen, data position, sampler seed, ...
        rng/rank_00000.pt             each rank's RNG states (tensors and numbers only)
        manifest.json                 size and sha256 of every file above, and which rank
                                      wrote it; written last: without it, incomplete
    RUN_DIR/checkpoints/latest        name of the newest published checkpoint
    RUN_DIR/checkpoints/.tmp-step_*   a checkpoint being written (never read)

A checkpoint is written under its temporary name, then renamed, then "latest" is moved, so a
crash at any moment leaves the previous checkpoint intact and pointed to. Each rank hashes
the files it wrote into `.parts/rank_NNNNN.json`; publishing merges the parts into the
manifest. Loading checks the manifest and falls back to the next older checkpoint, with a
warning naming the broken one; several ranks split the hashing (`verify_checkpoint`).

What is a pickle: DeepSpeed's files under deepspeed/ (torch.save of Python objects, read back
by DeepSpeed with torch.load(weights_only=False)); resume only from checkpoints you trust.
Everything the trainer itself reads back is JSON, safetensors, or tensors and numbers read
with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from rdp.pretrain.config import RunConfig, load_config, to_yaml
from rdp.pretrain.model import RecurrentDepthModel, model_from_state_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
LATEST_POINTER = "latest"
MANIFEST_FILE = "manifest.json"
TRAINER_STATE_FILE = "trainer_state.json"
STAGING_PREFIX = ".tmp-"
CHECKPOINT_DIR = "checkpoints"
PARTS_DIR = ".parts"
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    user_facing = True


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: str | Path) -> Optional[int]:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


# ---- integrity -----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_rank_part(directory: Path, rank: int, paths: list[Path]) -> None:
    """One rank's share of the manifest: size and sha256 of the files it wrote (flushed to
    disk first, so a published checkpoint survives a node failure)."""
    files = {}
    for path in paths:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path),
                                                         "rank": rank}
    (directory / PARTS_DIR).mkdir(exist_ok=True)
    write_json(directory / PARTS_DIR / f"rank_{rank:05d}.json", {"files": files})


def write_manifest(directory: Path) -> None:
    """Merge the ranks' parts; hash (as rank 0) any file no part lists; written last, atomically."""
    files = {}
    parts = directory / PARTS_DIR
    for part in sorted(parts.glob("rank_*.json")) if parts.is_dir() else []:
        files.update(json.loads(part.read_text())["files"])
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        name = path.relative_to(directory).as_posix()
        if name not in files and not name.startswith(PARTS_DIR + "/"):
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path), "rank": 0}
    temporary = directory / f".{MANIFEST_FILE}.tmp"
    temporary.write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1))
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, directory / MANIFEST_FILE)
    shutil.rmtree(parts, ignore_errors=True)


def verify_checkpoint(directory: Path, hash_share="all") -> Optional[str]:
    """None if complete and intact, else what is wrong. Every file's presence and size is
    checked; its sha256 too where `hash_share` says: "all", None (sizes only), or
    (rank, world_size): the files written by ranks r with r % world_size == rank, so that
    world_size processes verify a checkpoint together, each reading a different share."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        return f"no {MANIFEST_FILE} (incomplete write)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable {MANIFEST_FILE}: {exc}"
    for name, entry in files.items():
        path = directory / name
        if not path.exists():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest recorded {entry['size']} (truncated or overwritten)"
        mine = hash_share == "all" or (hash_share is not None and entry.get("rank", 0) % hash_share[1] == hash_share[0])
        if mine and "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its recorded sha256 (corrupted)"
    return None


# ---- finding checkpoints ---------------------------------------------------------------------
def _checkpoint_root(path: Path) -> Optional[Path]:
    """A run dir or its checkpoints dir -> the checkpoints dir."""
    for candidate in (path / CHECKPOINT_DIR, path):
        if candidate.is_dir() and ((candidate / LATEST_POINTER).exists() or any(candidate.glob("step_*"))):
            return candidate
    return None


def published_checkpoints(root: Path) -> list[Path]:
    """The checkpoints a resume may use, in the order to try them: the one "latest" names,
    then the older ones, newest first. Checkpoints newer than "latest" are never candidates:
    they belong to a timeline the run left when it was resumed from an older checkpoint
    (until they are overwritten). Without a pointer: every checkpoint, newest first."""
    found = sorted((p for p in root.glob("step_*") if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True)
    latest = latest_step(root)
    if latest is None:
        return found
    return [p for p in found if checkpoint_step(p) <= latest]


def latest_step(root: Path) -> Optional[int]:
    """The step the "latest" pointer names (None: no pointer, or not a checkpoint name)."""
    pointer = root / LATEST_POINTER
    try:
        return checkpoint_step(pointer.read_text().strip())
    except OSError:
        return None


def newest_valid_checkpoint(root: Path) -> Optional[Path]:
    """The newest intact checkpoint under `root`, warning about each broken one skipped.
    None when `root` holds no checkpoint; an error naming each one when none is intact."""
    problems = []
    latest = latest_step(root)
    if latest is not None and not (root / checkpoint_name(latest)).is_dir():
        problems.append(f"{LATEST_POINTER}: names {checkpoint_name(latest)}, which does not exist")
        warnings.warn(f"{root / LATEST_POINTER} names {checkpoint_name(latest)}, which does not exist; "
                      f"falling back to the previous checkpoint", stacklevel=2)
    for candidate in published_checkpoints(root):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        problems.append(f"{candidate.name}: {problem}")
        warnings.warn(f"checkpoint {candidate} is unusable ({problem}); falling back to the previous one",
                      stacklevel=2)
    if problems:
        raise CheckpointError(f"{root}: no intact checkpoint to resume from: {'; '.join(problems)} (move them "
                              f"aside to start over, or pass an intact checkpoint as train.resume=PATH)")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir or one checkpoint dir -> an intact checkpoint dir."""
    path = Path(path)
    if (path / WEIGHTS_FILE).exists():
        problem = verify_checkpoint(path) if (path / MANIFEST_FILE).exists() else None
        if problem:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
        return path
    root = _checkpoint_root(path)
    found = newest_valid_checkpoint(root) if root else None
    if found is None:
        raise FileNotFoundError(f"{path}: not a checkpoint, checkpoints dir or run dir with an intact checkpoint "
                                f"(no {WEIGHTS_FILE}, and no complete checkpoints/step_*)")
    return found


# ---- writing ---------------------------------------------------------------------------------
def staging_dir(root: Path, step: int) -> Path:
    return root / f"{STAGING_PREFIX}{checkpoint_name(step)}"


def publish(staging: Path, root: Path, step: int) -> Path:
    """Rename a fully written staging dir into place, then move "latest" (last)."""
    write_manifest(staging)
    final = root / checkpoint_name(step)
    if final.exists():  # a re-run of the same step (e.g. after a restart) replaces it
        shutil.rmtree(final)
    os.replace(staging, final)
    pointer = root / f".{LATEST_POINTER}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST_POINTER)
    _fsync_dir(root)
    return final


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Keep the `keep_last` newest checkpoints up to the one "latest" names, plus every
    `keep_every`-th step; remove the other older ones. "latest" itself and anything newer
    (another timeline, see `published_checkpoints`) are never removed. Returns what was."""
    steps = sorted(checkpoint_step(p) for p in root.glob("step_*") if checkpoint_step(p) is not None)
    latest = latest_step(root)
    if latest is None:
        return []
    older = [s for s in steps if s <= latest]
    keep = set(older[-keep_last:]) | {latest} | {s for s in older if keep_every and s % keep_every == 0}
    removed = [root / checkpoint_name(s) for s in older if s not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_stale_staging(root: Path) -> None:
    for path in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def save_model_weights(model: torch.nn.Module, directory: Path, config: RunConfig,
                       state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Consolidated single-device weights + config: what `load_model` and export read."""
    directory.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else model.state_dict()
    tensors = {name: t.detach().float().contiguous().cpu() if t.is_floating_point() else t.detach().contiguous().cpu()
               for name, t in state.items() if not name.endswith("_extra_state")}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(to_yaml(config))


def write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)


def rng_state() -> dict:
    """This process's RNG states as tensors and numbers only, so that they load back with
    torch.load(weights_only=True) (no pickled objects)."""
    import random

    import numpy as np

    name, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_state(path: Path) -> Optional[dict]:
    """A rank's RNG file, read without unpickling anything; None (with a warning) for a file
    in the pickled format of earlier rdp versions, which is then not restored."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError here
        warnings.warn(f"{path}: not restored, it needs a full unpickler ({type(exc).__name__}); the run "
                      f"continues with fresh RNG states (the trainer's own randomness is seeded by step)",
                      stacklevel=2)
        return None


# ---- reading -----------------------------------------------------------------------------------
def read_trainer_state(directory: Path) -> dict:
    return json.loads((directory / TRAINER_STATE_FILE).read_text())


def load_model(path: str | Path, device: str | torch.device = "cpu") -> RecurrentDepthModel:
    """A ready single-device model from a run dir, its checkpoints/ dir or one checkpoint dir
    (the newest intact checkpoint; tensor-parallel and ZeRO runs included: their weights are
    consolidated at save time)."""
    directory = resolve_checkpoint(path)
    config = load_config(directory / CONFIG_FILE)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    return model_from_state_dict(config.model, state, device).eval()
