"""The training stream over WebDataset shards.

Global position p (samples consumed by all ranks together) is the whole state. At a step
that starts at p, rank r takes positions p + r*B .. p + r*B + B - 1 (B = micro batch), so
ranks are disjoint and together cover the global order; with DataLoader workers, worker w
of a rank makes that rank's micro-batches for steps w, w + W, w + 2W, ... (W workers), which
torch's DataLoader hands back in step order. Changing the number of ranks or workers
therefore continues the same global order from the same position.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from rdp.data_pipeline.manifest import DataError, Manifest
from rdp.data_pipeline.order import MixOrder, SourceOrder
from rdp.data_pipeline.reader import ShardCache

log = logging.getLogger("rdp.data")
IGNORE_INDEX = -100  # the model's cross-entropy ignores these labels (padding)


@dataclass
class StreamSpec:
    bases: list[str]
    manifests: list[Manifest]
    weights: list[float]
    seq_len: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    skip_corrupt: bool = False
    verify_checksums: bool = True

    @property
    def pad_id(self) -> int:
        return self.manifests[0].pad_token_id


class SampleReader:
    """Global position -> tokens, in one process (the trainer's or a DataLoader worker's)."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.orders = [SourceOrder([s.samples for s in m.shards], spec.seed, i) for i, m in enumerate(spec.manifests)]
        self.mix = MixOrder(spec.weights, spec.seed) if len(spec.manifests) > 1 else None
        self.caches = [ShardCache(b, m, spec.verify_checksums) for b, m in zip(spec.bases, spec.manifests)]
        self.bad_shards: dict[tuple[int, int], str] = {}
        self.skipped_samples = 0

    def locate(self, position: int):
        source, index = self.mix.locate(position) if self.mix else (0, position)
        return source, self.orders[source].locate(index)

    def sample(self, position: int) -> np.ndarray:
        source, where = self.locate(position)
        try:
            known_bad = self.bad_shards.get((source, where.shard))
            if known_bad:
                raise DataError(known_bad)
            try:
                shard = self.caches[source].get(where.shard)
            except DataError as exc:  # the whole shard is unusable: remember, do not reopen it
                self.bad_shards[(source, where.shard)] = str(exc)
                raise
            return shard.read(where.sample)
        except DataError as exc:
            if not self.spec.skip_corrupt:
                raise
            self.skipped_samples += 1
            log.warning("data.skip_corrupt: skipping position %d (%s); %d sample(s) skipped so far",
                        position, exc, self.skipped_samples)
            # a row of padding: no label counts, and no other rank's sample is taken instead
            return np.full(self.spec.seq_len + 1, self.spec.pad_id, dtype=np.int64)

    def rows(self, step_position: int) -> np.ndarray:
        """This rank's micro-batch of the step starting at `step_position`: (B, seq_len+1) ids."""
        first = step_position + self.spec.rank * self.spec.micro_batch_size
        return np.stack([self.sample(first + i) for i in range(self.spec.micro_batch_size)])

    def batch(self, step_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return split_rows(torch.from_numpy(self.rows(step_position)), self.spec.pad_id)


def split_rows(rows: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = rows.long()
    inputs, labels = rows[:, :-1].contiguous(), rows[:, 1:].clone()
    labels[labels == pad_id] = IGNORE_INDEX
    return inputs, labels


class _WorkerBatches(torch.utils.data.IterableDataset):
    def __init__(self, spec: StreamSpec, start_position: int):
        super().__init__()
        self.spec, self.start_position = spec, start_position

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = SampleReader(self.spec)
        stride = self.spec.world_size * self.spec.micro_batch_size
        step = worker
        while True:
            # plain bytes through the worker pipe: cheaper than a shared-memory tensor per batch
            yield reader.rows(self.start_position + step * stride).astype(np.int32).tobytes()
            step += workers


class ShardStream:
    """`next_batch()`, `state_dict()`, `load_state_dict()`: the trainer's whole view of the data."""

    def __init__(self, spec: StreamSpec, num_workers: int = 0):
        self.spec, self.num_workers = spec, num_workers
        self.position = 0
        self._reader: SampleReader | None = None
        self._loader_iter = None

    @property
    def samples_per_epoch(self) -> list[int]:
        return [m.num_samples for m in self.spec.manifests]

    @property
    def skipped_samples(self) -> int:
        """Counted in this process (with DataLoader workers, each worker logs its own count)."""
        return self._reader.skipped_samples if self._reader else 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_workers == 0:
            self._reader = self._reader or SampleReader(self.spec)
            batch = self._reader.batch(self.position)
        else:
            if self._loader_iter is None:
                loader = torch.utils.data.DataLoader(
                    _WorkerBatches(self.spec, self.position), batch_size=None, num_workers=self.num_workers,
                    prefetch_factor=2, persistent_workers=False)
                self._loader_iter = iter(loader)
            rows = np.frombuffer(next(self._loader_iter), dtype=np.int32).reshape(self.spec.micro_batch_size, -1)
            batch = split_rows(torch.from_numpy(rows.copy()), self.spec.pad_id)
        self.position += self.spec.world_size * self.spec.micro_batch_size
        return batch

    def epoch_at(self, position: int) -> int:
        if len(self.spec.manifests) == 1:
            return position // self.spec.manifests[0].num_samples
        consumed = MixOrder(self.spec.weights, self.spec.seed).consumed(position)
        return min(c // n for c, n in zip(consumed, self.samples_per_epoch))

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch_at(self.position)}

    def load_state_dict(self, state: dict) -> None:
        position = int(state["position"])
        if position < 0:
            raise DataError(f"data state: position {position} is negative")
        if "epoch" in state and int(state["epoch"]) != self.epoch_at(position):
            raise DataError(f"data state: epoch {state['epoch']} at position {position}, but these shards put that "
                            f"position in epoch {self.epoch_at(position)} (were the shards or data.paths changed?)")
        self.position = position
        self._stop_workers()  # workers restart at the new position

    def _stop_workers(self) -> None:
        # now, not whenever the iterator happens to be collected (a traceback may hold it)
        shutdown = getattr(self._loader_iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._loader_iter = None

    def close(self) -> None:
        self._stop_workers()
        if self._reader:
            for cache in self._reader.caches:
                cache.close()
        self._reader = None  # a later next_batch reopens what it needs
