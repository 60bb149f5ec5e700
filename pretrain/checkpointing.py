"""The trainer's checkpoints across ranks: saving (snapshot now, write in the background,
publish when every rank is done) and choosing the one to resume from (all ranks agree).

Saving (`train.async_checkpoint=true`, the default):
  step N boundary   all ranks: barrier, gather the full fp32 weights to rank 0 (for
                    model.safetensors), DeepSpeed's save_checkpoint with a snapshotting
                    engine; the writes go to each rank's background thread
  later boundaries  `poll()`: one tiny all-reduce says whether every rank has written its
                    files and its manifest part; then rank 0 publishes in the background
  next save / end   `finish()`: wait for the pending checkpoint and publish it first
A write that fails on any rank stops training on every rank with the error; the previous
checkpoint stays the published one. `train.async_checkpoint=false` waits at the save itself.

Resuming: rank 0 lists the candidates ("latest", then older) and broadcasts them; for each,
rank 0 checks that every file is there with its recorded size, and every rank hashes its own
share of the files (those written by the ranks r, r + W, r + 2W, ... of the saving run), in
parallel; the first candidate no rank objects to is loaded by all, and each rank then
checks that it holds that step. Only rank 0 reads "latest": ranks whose views of the run
dir differ (a node behind on a shared filesystem) still load one step, or all refuse.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from rdp.pretrain.checkpoint import (CHECKPOINT_DIR, LATEST_POINTER, TRAINER_STATE_FILE, WEIGHTS_FILE,
                                     CheckpointError, checkpoint_name, checkpoint_step, latest_step, prune, publish,
                                     published_checkpoints, remove_stale_staging, rng_state, save_model_weights,
                                     staging_dir, verify_checkpoint, write_json, write_rank_part)
from rdp.pretrain.checkpoint_writer import BackgroundWriter, SnapshotCheckpointEngine, snapshot

DEEPSPEED_TAG = "deepspeed"


@dataclass
class Pending:
    step: int
    staging: Path


class Checkpointer:
    def __init__(self, ctx, config, engine, root: Path, background: bool = True):
        self.ctx, self.config, self.engine, self.root = ctx, config, engine, root
        self.background = background
        self.writer = BackgroundWriter()
        self._files: list[Path] = []  # what this rank writes into the pending checkpoint
        engine.checkpoint_engine = SnapshotCheckpointEngine(self.writer, self._files.append, engine._config)
        self.pending: Optional[Pending] = None
        self.published_step: Optional[int] = None

    # ---- saving -------------------------------------------------------------------------------
    def save(self, step: int, full_weights: dict[str, torch.Tensor], client_state: dict) -> None:
        """Snapshot this step's state and start writing it. `full_weights`: the consolidated
        fp32 weights on rank 0 (empty elsewhere)."""
        self.finish()
        self._all_written(block=True, step=self.published_step)  # rank 0: its last publish has run
        staging = staging_dir(self.root, step)
        if self.ctx.is_main:
            remove_stale_staging(self.root)
            (staging / "rng").mkdir(parents=True)
        dist.barrier()
        self._files.clear()
        self.engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, client_state={"trainer": client_state},
                                    save_latest=False)
        rng_file = staging / "rng" / f"rank_{self.ctx.rank:05d}.pt"
        self._files.append(rng_file)
        self.writer.submit(torch.save, rng_state(), rng_file)
        if self.ctx.is_main:
            # shares no memory with the weights (parallel.gather_full_state_dict copies)
            self.writer.submit(save_model_weights, None, staging, self.config, state=full_weights)
            self.writer.submit(write_json, staging / TRAINER_STATE_FILE, snapshot(client_state))
            self._files += [staging / "model.safetensors", staging / "config.yaml", staging / TRAINER_STATE_FILE]
        self.writer.submit(write_rank_part, staging, self.ctx.rank, list(self._files))
        self.pending = Pending(step, staging)
        if not self.background:
            self.finish()

    def poll(self) -> Optional[int]:
        """At a step boundary (all ranks): publish the pending checkpoint if every rank has
        written its part. Returns the step published, if any."""
        if self.pending is None:
            return None
        if not self._all_written(block=False, step=self.pending.step):
            return None
        return self._publish()

    def finish(self) -> Optional[int]:
        """All ranks: wait until the pending checkpoint is written everywhere and published."""
        if self.pending is None:
            return None
        self._all_written(block=True, step=self.pending.step)
        step = self._publish()
        self._all_written(block=True, step=step)  # rank 0's publish has run (or failed, on every rank)
        return step

    def _all_written(self, block: bool, step: Optional[int]) -> bool:
        """Collective: whether every rank's writer is idle; a failure on any rank raises on all."""
        if block:
            self.writer.drain()
        failed = self.writer.error is not None
        writing = not failed and not self.writer.idle
        flags = torch.tensor([float(writing), float(failed)], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(flags)
        if flags[1] > 0:
            mine = f"rank {self.ctx.rank}: {self.writer.error!r}" if self.writer.error is not None else None
            every = [None] * self.ctx.world_size
            dist.all_gather_object(every, mine)
            raise CheckpointError(f"checkpoint at step {step} could not be written or published "
                                  f"({'; '.join(m for m in every if m)}); stopping, {self.root / LATEST_POINTER} "
                                  f"names the newest intact checkpoint")
        return bool(flags[0] == 0)

    def _publish(self) -> int:
        """Rank 0 publishes in its background thread; a failure stops every rank at the next check."""
        pending, self.pending = self.pending, None
        if self.ctx.is_main:
            t = self.config.train
            self.writer.submit(_publish_and_prune, pending, self.root, t.keep_last, t.keep_every)
        self.published_step = pending.step
        return pending.step

    # ---- resuming -----------------------------------------------------------------------------
    def agree_on_resume(self, resume: str) -> Optional[Path]:
        """All ranks: the checkpoint to resume from (train.resume = auto or a PATH), from rank
        0's ordered candidates, after every rank verified its share of it. None: nothing to
        resume from. An error naming each candidate and its problem when none is intact."""
        shared: list = [None, None]
        if self.ctx.is_main:
            try:
                shared[0] = resume_candidates(resume, self.root)
            except (CheckpointError, FileNotFoundError) as exc:
                shared[1] = exc
        dist.broadcast_object_list(shared, src=0)
        if shared[1] is not None:
            raise shared[1]
        problems = []
        for candidate in shared[0]:
            structure = [verify_checkpoint(candidate, hash_share=None) if self.ctx.is_main else None]
            dist.broadcast_object_list(structure, src=0)
            mine = structure[0] or verify_checkpoint(candidate, hash_share=(self.ctx.rank, self.ctx.world_size))
            every = [None] * self.ctx.world_size
            dist.all_gather_object(every, mine)
            found = _naming_ranks(every)
            if not found:
                return candidate
            problems.append(f"{candidate.name}: {'; '.join(found)}")
            if self.ctx.is_main:
                warnings.warn(f"checkpoint {candidate} is unusable ({'; '.join(found)}); falling back to the "
                              f"previous one", stacklevel=2)
        if problems:
            raise CheckpointError(f"{self.root if len(shared[0]) > 1 else shared[0][0]}: no intact checkpoint to "
                                  f"resume from: {'; '.join(problems)} (move them aside to start over, or pass an "
                                  f"intact checkpoint as train.resume=PATH)")
        return None

    def check_loaded(self, directory: Path, step: int) -> None:
        """Every rank holds the step of the checkpoint rank 0 chose."""
        expected = checkpoint_step(directory)
        steps = torch.tensor([float(step), -float(step)], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        low, high = -int(steps[1]), int(steps[0])
        if low != high or (expected is not None and high != expected):
            raise CheckpointError(f"{directory}: ranks loaded different steps ({low}..{high}, expected {expected}); "
                                  f"the checkpoint's files disagree with each other")


def _naming_ranks(reports: list[Optional[str]]) -> list[str]:
    """Each problem once; one that only some ranks see names them (their view of the run dir
    differs: a node behind on a shared filesystem, say), so the error says where to look."""
    named = []
    for problem in sorted({p for p in reports if p}):
        ranks = [str(r) for r, p in enumerate(reports) if p == problem]
        named.append(problem if len(ranks) == len(reports) else f"{problem} (on rank {', '.join(ranks)} only)")
    return named


def resume_candidates(resume: str, root: Path) -> list[Path]:
    """Rank 0: the checkpoints train.resume may use, in the order to try them (nothing is
    verified here). auto: this run's, "latest" first, then older; PATH: that checkpoint, or
    those of the run dir / checkpoints dir it names."""
    if resume != "auto":
        path = Path(resume)
        if (path / WEIGHTS_FILE).exists() and not (path / TRAINER_STATE_FILE).exists():
            raise CheckpointError(f"{path}: has no {TRAINER_STATE_FILE}; only checkpoints written by `rdp train` "
                                  f"can be resumed (weights alone cannot restore the optimizer)")
        if (path / TRAINER_STATE_FILE).exists():
            return [path]
        root = next((c for c in (path / CHECKPOINT_DIR, path) if c.is_dir() and any(c.glob("step_*"))), None)
        if root is None:
            raise FileNotFoundError(f"train.resume={resume}: not a checkpoint, checkpoints dir or run dir with "
                                    f"checkpoints")
    if not root.exists():
        return []
    latest = latest_step(root)
    found = published_checkpoints(root)
    if latest is not None and not (root / checkpoint_name(latest)).is_dir():
        if not found:
            raise CheckpointError(f"{root / LATEST_POINTER} names {checkpoint_name(latest)}, which does not exist, "
                                  f"and no older checkpoint is there; move {root} aside to start over")
        warnings.warn(f"{root / LATEST_POINTER} names {checkpoint_name(latest)}, which does not exist; falling back "
                      f"to the previous checkpoint", stacklevel=2)
    return found


def _publish_and_prune(pending: Pending, root: Path, keep_last: int, keep_every: int) -> None:
    publish(pending.staging, root, pending.step)
    prune(root, keep_last, keep_every)
