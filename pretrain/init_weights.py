"""Initial weights that are the same whatever the tensor-parallel degree, drawn without ever
holding the full model.

Every randomly initialised tensor of the full (single-device) model is cut into fixed tiles
of its 2-D view (TILE rows x TILE columns); tile (i, j) of parameter `name` is drawn from its
own generator, seeded by (seed, name, i, j). A rank draws only the tiles that overlap its
shard and keeps the overlap, so for one seed:
- the full tensor is the same at every TP degree, and on a single device;
- a rank's memory is its shard plus one tile, whatever the model size;
- a rank's drawing time is proportional to its shard, not to the model.
Tiles are drawn on the CPU in fp32 and copied to the parameter's device, so a GPU run starts
from the same weights as a CPU run.

How each parameter starts is declared by its module: `init_std` (truncated normal, +-3 std,
the spec's "takase" init) for its `weight`, or `init_constants` ({parameter: value}) for norms
and biases. A replicated module with other parameters is first reset by its own
`reset_parameters` under a seed drawn from its name (the same at any TP degree); a sharded
parameter without a declared init is an error naming it.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch
from torch import nn

TILE = 1024


def tile_seed(seed: int, name: str, row_tile: int, col_tile: int) -> int:
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return int(np.random.SeedSequence([seed, key, row_tile, col_tile]).generate_state(1, np.uint64)[0] >> 1)


def _segments(spec, rank: int, tp: int) -> list[tuple[int, int, int]]:
    """(full_start, full_end, local_start) along the split dim for rank `rank` of a ShardSpec:
    slice `rank` of each of its `parts` blocks; the rest of the local rows is zero padding."""
    local = spec.padded_size // tp
    segments = []
    for part in range(spec.parts):
        start, end = rank * local, min((rank + 1) * local, spec.part_size)
        if end > start:
            segments.append((part * spec.part_size + start, part * spec.part_size + end, part * local))
    return segments


def _overlaps(lo: int, hi: int, segments: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The parts of segments inside [lo, hi), as (full_start, full_end, local_start)."""
    found = []
    for start, end, local in segments:
        a, b = max(start, lo), min(end, hi)
        if b > a:
            found.append((a, b, local + a - start))
    return found


@torch.no_grad()
def draw_truncated_normal(out: torch.Tensor, full_shape: tuple[int, ...], std: float, seed: int, name: str,
                          spec=None, rank: int = 0, tp: int = 1) -> None:
    """Fill `out` (this rank's shard of a tensor of `full_shape`, or the whole tensor when
    `spec` is None) with its part of the tiled truncated normal."""
    rows = full_shape[0]
    cols = int(np.prod(full_shape[1:])) if len(full_shape) > 1 else 1
    split = spec.dim if spec is not None else None
    if split not in (None, 0, 1) or (split == 1 and len(full_shape) != 2):
        raise ValueError(f"{name}: cannot draw a shard split along dim {split} of shape {full_shape}")
    view = out.view(out.shape[0], -1)
    view.zero_()  # padding rows / columns of a shard stay zero
    row_segments = _segments(spec, rank, tp) if split == 0 else [(0, rows, 0)]
    col_segments = _segments(spec, rank, tp) if split == 1 else [(0, cols, 0)]
    for i in range((rows + TILE - 1) // TILE):
        r_lo, r_hi = i * TILE, min((i + 1) * TILE, rows)
        row_parts = _overlaps(r_lo, r_hi, row_segments)
        if not row_parts:
            continue
        for j in range((cols + TILE - 1) // TILE):
            c_lo, c_hi = j * TILE, min((j + 1) * TILE, cols)
            col_parts = _overlaps(c_lo, c_hi, col_segments)
            if not col_parts:
                continue
            generator = torch.Generator().manual_seed(tile_seed(seed, name, i, j))
            tile = torch.empty(r_hi - r_lo, c_hi - c_lo)
            nn.init.trunc_normal_(tile, 0.0, std, -3 * std, 3 * std, generator=generator)
            for a, b, local_row in row_parts:
                for c, d, local_col in col_parts:
                    view[local_row:local_row + b - a, local_col:local_col + d - c].copy_(
                        tile[a - r_lo:b - r_lo, c - c_lo:d - c_lo])


@torch.no_grad()
def initialize(model: nn.Module, seed: int, specs: Optional[dict] = None, rank: int = 0, tp: int = 1) -> None:
    """Initialise every parameter of `model` (allocated, e.g. by `to_empty`) from `seed`.
    `specs` maps sharded parameter names to their ShardSpec (pretrain.parallel), this rank
    holding shard `rank` of `tp`."""
    specs = specs or {}
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        prefix = f"{module_name}." if module_name else ""
        constants = getattr(module, "init_constants", {})
        std = getattr(module, "init_std", None)
        declared = {attr for attr, _ in own if attr in constants or (attr == "weight" and std is not None)}
        undeclared = [prefix + attr for attr, _ in own if attr not in declared]
        if undeclared:
            if any(name in specs for name in undeclared) or not hasattr(module, "reset_parameters"):
                raise ValueError(f"parameter {undeclared[0]}: no initialisation rule (give its module an `init_std` "
                                 f"for a random weight, or list it in the module's `init_constants`)")
            # replicated, so the module's own init under a seed from its name is the same at any TP
            cuda = [p.device for _, p in own if p.is_cuda][:1]
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(tile_seed(seed, module_name, 0, 0))
                module.reset_parameters()
        for attr, param in own:
            name, spec = prefix + attr, specs.get(prefix + attr)
            if attr in constants:
                param.fill_(constants[attr])
            elif attr in declared:
                shape = list(param.shape)
                if spec is not None:
                    shape[spec.dim] = spec.parts * spec.part_size
                in_place = param.device.type == "cpu" and param.dtype == torch.float32 and param.is_contiguous()
                local = param if in_place else torch.empty(param.shape, dtype=torch.float32)
                draw_truncated_normal(local, tuple(shape), std, seed, name, spec, rank, tp)
                if not in_place:
                    param.copy_(local)
