"""The global sample order: a pure function of (seed, epoch), computable at any position.

Within one source, epoch e permutes the shards, and each shard's samples, from
(seed, source, e[, shard]); a position maps to (epoch, shard, sample) by a binary search in
the cumulative sample counts of the permuted shards. Nothing is replayed, so position
195,312,500 costs what position 0 costs. Several sources are interleaved in blocks of
MIX_BLOCK positions: each block holds a fixed number of samples of each source
(proportional to its weight, off by at most one per block), in an order permuted from
(seed, block), so every source's share is within 1/MIX_BLOCK of its weight and the index
inside each source is again arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rdp.data_pipeline.manifest import DataError

MIX_BLOCK = 1024


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([int(w) for w in words]))


@dataclass(frozen=True)
class Location:
    epoch: int
    shard: int  # index into the manifest's shard list
    sample: int  # index inside that shard


class SourceOrder:
    def __init__(self, shard_sizes: list[int], seed: int, source_index: int = 0):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        if len(self.sizes) == 0 or (self.sizes <= 0).any():
            raise DataError("a source needs at least one shard with samples")
        self.seed, self.source_index = seed, source_index
        self.samples_per_epoch = int(self.sizes.sum())
        self._epoch_layout = lru_cache(maxsize=2)(self._layout)
        self._shard_permutation = lru_cache(maxsize=64)(self._permute_shard)

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        shard_order = _rng(self.seed, self.source_index, epoch).permutation(len(self.sizes))
        return shard_order, np.cumsum(self.sizes[shard_order])

    def _permute_shard(self, epoch: int, shard: int) -> np.ndarray:
        return _rng(self.seed, self.source_index, epoch, shard + 1).permutation(int(self.sizes[shard]))

    def locate(self, index: int) -> Location:
        epoch, within = divmod(int(index), self.samples_per_epoch)
        shard_order, ends = self._epoch_layout(epoch)
        slot = int(np.searchsorted(ends, within, side="right"))
        shard = int(shard_order[slot])
        offset = within - (int(ends[slot - 1]) if slot else 0)
        return Location(epoch, shard, int(self._shard_permutation(epoch, shard)[offset]))


class MixOrder:
    """Which source global position p reads, and that source's own sample index."""

    def __init__(self, weights: list[float], seed: int):
        total = float(sum(weights))
        bounds = np.cumsum(np.asarray(weights, dtype=np.float64) / total)
        bounds[-1] = 1.0
        centers = (np.arange(MIX_BLOCK) + 0.5) / MIX_BLOCK
        # the slots of a block, in canonical order, carry these source ids
        self.slot_source = np.searchsorted(bounds, centers, side="right").astype(np.int64)
        self.per_block = np.bincount(self.slot_source, minlength=len(weights))
        for i, count in enumerate(self.per_block):
            if count == 0:
                raise DataError(f"data.weights: weight {weights[i]} of source {i} is below 1/{MIX_BLOCK} of the total")
        self.seed = seed
        self._block = lru_cache(maxsize=4)(self._block_layout)

    def _block_layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        sources = self.slot_source[_rng(self.seed, 1 << 20, block).permutation(MIX_BLOCK)]
        rank_in_source = np.empty(MIX_BLOCK, dtype=np.int64)
        for source in range(len(self.per_block)):
            mask = sources == source
            rank_in_source[mask] = np.arange(int(mask.sum()))
        return sources, rank_in_source

    def locate(self, position: int) -> tuple[int, int]:
        block, slot = divmod(int(position), MIX_BLOCK)
        sources, rank_in_source = self._block(block)
        source = int(sources[slot])
        return source, block * int(self.per_block[source]) + int(rank_in_source[slot])

    def consumed(self, position: int) -> list[int]:
        """Samples each source has given in positions [0, position)."""
        block, slot = divmod(int(position), MIX_BLOCK)
        counts = block * self.per_block.copy()
        if slot:
            counts += np.bincount(self._block(block)[0][:slot], minlength=len(self.per_block))
        return [int(c) for c in counts]
