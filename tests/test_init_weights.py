"""The tiled initial-weight draw (pretrain/init_weights.py): every rank's shard, drawn alone,
is exactly the shard of the full tensor drawn at once, for each way the model splits tensors
(column blocks with [q|k|v] / [gate|up] parts, rows, padded vocabulary), including tensors
larger than one tile. The 4-rank test checks the consolidated model at TP 1, 2 and 4."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rdp.pretrain.init_weights import TILE, draw_truncated_normal, initialize
from rdp.pretrain.parallel import ShardSpec

CASES = [  # full shape, spec, tp
    ((2 * 151, 70), ShardSpec(dim=0, part_size=151, padded_size=152, parts=2), 2),  # [gate|up], padded
    ((3 * 64, 64), ShardSpec(dim=0, part_size=64, padded_size=64, parts=3), 4),  # [q|k|v]
    ((64, 151), ShardSpec(dim=1, part_size=151, padded_size=152), 2),  # row-parallel input, padded
    ((127, 64), ShardSpec(dim=0, part_size=127, padded_size=128), 4),  # vocabulary, padded
    ((3 * (TILE + 7), 2 * TILE + 5), ShardSpec(dim=0, part_size=TILE + 7, padded_size=TILE + 8, parts=3), 3),
    ((TILE + 3, 2 * TILE + 50), ShardSpec(dim=1, part_size=2 * TILE + 50, padded_size=2 * TILE + 50), 5),
]


@pytest.mark.parametrize("shape,spec,tp", CASES)
def test_each_shard_drawn_alone_is_the_shard_of_the_full_draw(shape, spec, tp):
    full = torch.empty(shape)
    draw_truncated_normal(full, shape, 0.02, seed=3, name="w")
    assert full.abs().max() <= 3 * 0.02 and 0.015 < full.std() < 0.025
    for rank in range(tp):
        expected = spec.shard(full, rank, tp)
        alone = torch.full(expected.shape, float("nan"))
        draw_truncated_normal(alone, shape, 0.02, seed=3, name="w", spec=spec, rank=rank, tp=tp)
        assert torch.equal(alone, expected), (shape, rank)


def test_seed_and_name_choose_the_draw():
    a, b, c = (torch.empty(8, 8) for _ in range(3))
    draw_truncated_normal(a, (8, 8), 1.0, seed=1, name="x")
    draw_truncated_normal(b, (8, 8), 1.0, seed=2, name="x")
    draw_truncated_normal(c, (8, 8), 1.0, seed=1, name="y")
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_a_sharded_parameter_without_a_declared_init_is_an_error():
    model = nn.Module()
    model.mystery = nn.Parameter(torch.empty(4, 4))
    with pytest.raises(ValueError, match="parameter mystery: no initialisation rule"):
        initialize(model, seed=0, specs={"mystery": ShardSpec(dim=0, part_size=4, padded_size=4)}, rank=0, tp=2)
