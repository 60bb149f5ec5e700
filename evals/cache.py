"""KV caches for generating with a recurrent-depth model.

The model asks its cache for keys/values under `(layer_id, step)`: prelude and coda layers
always use step 0, each core layer is called once per recurrence step. Three ways to keep
the core layers' entries (spec, "KV cache"):

- ``full``: one entry per (core layer, step). With a fixed depth this reproduces the
  uncached forward exactly.
- ``latest``: one entry per core-layer position, overwritten by every deeper step; memory
  does not grow with depth.
- ``modulo``: a fixed number of slots per core layer, step s writes slot s % slots.

A token that exited early (adaptive compute) has no entry at deeper steps; later tokens
then see its deepest entry ("latest" per position), which is also what fills slots it
never wrote.

Left-padded batches: give `pad_lengths` (left pads per row); `attention_mask()` then hides
pad keys from real queries. Pads attend to themselves only, so they stay finite.

`StepKVCache` holds the ``full`` layout in buffers allocated once per generation and
written in place at an explicit position, so speculative decoding can overwrite the
entries of rejected draft tokens (evals/speculative.py).
"""
from __future__ import annotations

from typing import Optional

import torch

STRATEGIES = ("full", "latest", "modulo")


def _cat(old: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    # always a fresh tensor: entries are later overwritten in place
    return new.clone() if old is None else torch.cat([old, new], dim=-2)


class RecurrentKVCache:
    """Implements the model's KVCache protocol; tensors are (batch, heads, seq, head_dim)."""

    def __init__(self, core_layer_ids, strategy: str = "full", slots: int = 0,
                 pad_lengths: Optional[torch.Tensor] = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"cache strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "modulo" and slots < 1:
            raise ValueError(f"cache strategy 'modulo' needs slots >= 1, got {slots}")
        self.core_layers = frozenset(core_layer_ids)
        self.strategy, self.num_slots = strategy, slots
        self.pad_lengths = pad_lengths
        # per layer: every position's most recent (= deepest so far) key/value
        self.latest: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # per (core layer, slot): key/value of the step(s) mapped to that slot
        self.slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_model(cls, model, strategy: str = "full", slots: int = 0,
                  pad_lengths: Optional[torch.Tensor] = None) -> "RecurrentKVCache":
        cfg = model.config
        first = cfg.prelude_layers
        recurrent = list(range(first, first + cfg.core_layers))
        if getattr(cfg, "low_level_steps", 0):  # HRM's low-level layers recur too (pretrain/hrm.py)
            low = cfg.prelude_layers + cfg.core_layers + cfg.coda_layers
            recurrent += range(low, low + cfg.low_level_layers)
        return cls(recurrent, strategy, slots, pad_lengths)

    @property
    def seq_len(self) -> int:
        """Positions held (read from the first layer, which every token passes)."""
        if not self.latest:
            return 0
        return self.latest[min(self.latest)][0].shape[-2]

    def _slot(self, step: int) -> int:
        return step if self.strategy == "full" else step % self.num_slots

    def update(self, key: tuple[int, int], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer, step = key
        new = k.shape[-2]
        old_k, old_v = self.latest.get(layer, (None, None))
        if old_k is None or step == 0:  # first visit of these positions to this layer
            start = 0 if old_k is None else old_k.shape[-2]
            old_k, old_v = _cat(old_k, k), _cat(old_v, v)
            self.latest[layer] = (old_k, old_v)
        else:  # a deeper step of the positions appended last: keep only the newest
            start = old_k.shape[-2] - new
            old_k[..., start:, :] = k
            old_v[..., start:, :] = v
        if layer not in self.core_layers or self.strategy == "latest":
            return old_k, old_v

        slot = (layer, self._slot(step))
        slot_k, slot_v = self.slots.get(slot, (None, None))
        held = 0 if slot_k is None else slot_k.shape[-2]
        if held < start:  # earlier tokens that never reached this step: their deepest entry
            slot_k = _cat(slot_k, old_k[..., held:start, :].clone())
            slot_v = _cat(slot_v, old_v[..., held:start, :].clone())
            held = start
        if held == start:
            slot_k, slot_v = _cat(slot_k, k), _cat(slot_v, v)
        else:  # this slot already holds these positions from a shallower step
            slot_k[..., start:, :] = k
            slot_v[..., start:, :] = v
        self.slots[slot] = (slot_k, slot_v)
        return slot_k, slot_v

    def peek(self, key: tuple[int, int], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What `update` would return for a non-core layer, without storing anything."""
        old_k, old_v = self.latest.get(key[0], (None, None))
        return _cat(old_k, k), _cat(old_v, v)

    def attention_mask(self, q_len: int, k_len: int) -> Optional[torch.Tensor]:
        """(batch, 1, q_len, k_len) bool, True = may attend; None when nothing is padded."""
        if self.pad_lengths is None or not bool((self.pad_lengths > 0).any()):
            return None
        return causal_padding_mask(q_len, k_len, self.pad_lengths, self.pad_lengths.device)

    def num_entries(self) -> int:
        """Stored (key, value) tensors; bounded strategies keep this independent of depth."""
        return len(self.latest) + len(self.slots)

    def nbytes(self) -> int:
        tensors = [t for pair in (*self.latest.values(), *self.slots.values()) for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)


def causal_padding_mask(q_len: int, k_len: int, pad_lengths: Optional[torch.Tensor],
                        device) -> torch.Tensor:
    """Bool mask, True = may attend, for the last q_len of k_len positions: causal, and with
    `pad_lengths` (left pads per row) pad keys hidden from every query but themselves.
    (batch, 1, q_len, k_len), or (1, 1, q_len, k_len) without pads."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    causal = k_pos <= q_pos
    if pad_lengths is None:
        return causal[None, None]
    real_key = k_pos[None] >= pad_lengths[:, None, None]
    return (causal & (real_key | (k_pos == q_pos)))[:, None]


class StepKVCache:
    """The ``full`` layout (one entry per layer and recurrence step) in buffers of
    `capacity` positions, allocated on first use and written in place.

    The caller sets `position` (where the next forward's first token goes) before each
    forward; a forward of n tokens writes positions [position, position + n) of every
    (layer, step) it runs and attends to [0, position + n). Entries past that are stale
    (rejected draft tokens) and are overwritten by later forwards, never read.
    """

    def __init__(self, capacity: int, pad_lengths: Optional[torch.Tensor] = None):
        self.capacity = capacity
        self.position = 0
        self.pad_lengths = pad_lengths if pad_lengths is not None and bool((pad_lengths > 0).any()) else None
        self.buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._mask_shape: Optional[tuple[int, int]] = None
        self._mask: Optional[torch.Tensor] = None

    def update(self, key: tuple[int, int], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.position, self.position + k.shape[-2]
        if end > self.capacity:
            raise ValueError(f"StepKVCache holds {self.capacity} positions; a forward asked for {end}")
        buffer = self.buffers.get(key)
        if buffer is None:
            shape = (*k.shape[:-2], self.capacity, k.shape[-1])
            buffer = self.buffers[key] = (k.new_empty(shape), v.new_empty(shape))
        buffer[0][..., start:end, :] = k
        buffer[1][..., start:end, :] = v
        return buffer[0][..., :end, :], buffer[1][..., :end, :]

    def attention_mask(self, q_len: int, k_len: int) -> torch.Tensor:
        """Additive (0 / -inf) float mask in the keys' dtype: attention turns a bool mask into
        exactly this on every call, so handing it over saves two operations per layer."""
        # every layer of a forward asks for the same mask: build it once per shape
        if self._mask_shape != (q_len, k_len):
            keys = next(iter(self.buffers.values()))[0]
            allowed = causal_padding_mask(q_len, k_len, self.pad_lengths, keys.device)
            self._mask = torch.zeros(allowed.shape, dtype=keys.dtype, device=keys.device).masked_fill_(
                ~allowed, float("-inf"))
            self._mask_shape = (q_len, k_len)
        return self._mask

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.buffers.values() for t in pair)


class ProbeView:
    """Read-only view used to decode an intermediate state (adaptive exit): the coda sees
    every earlier token but the probe leaves no entries behind."""

    def __init__(self, cache: RecurrentKVCache):
        self.cache = cache

    def update(self, key, k, v):
        return self.cache.peek(key, k, v)

    def attention_mask(self, q_len: int, k_len: int):
        return self.cache.attention_mask(q_len, k_len)


class PaddingOnly:
    """No caching, only the left-padding mask (uncached forward of a padded batch)."""

    def __init__(self, pad_lengths: torch.Tensor):
        self.pad_lengths = pad_lengths

    def update(self, key, k, v):
        return k, v

    attention_mask = RecurrentKVCache.attention_mask
