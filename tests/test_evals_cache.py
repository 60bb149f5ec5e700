"""Recurrent KV cache bookkeeping: which entry each (layer, step) query sees."""
from __future__ import annotations

import pytest
import torch

from rdp.evals.cache import RecurrentKVCache

CORE = 1  # layer 0 = prelude, layer 1 = the core layer


def entry(position: int, step: int) -> torch.Tensor:
    """A recognisable (batch=1, heads=1, seq=1, dim=2) key: [position, step]."""
    return torch.tensor([[[[float(position), float(step)]]]])


def run_token(cache, position: int, steps: int) -> dict[int, torch.Tensor]:
    """One token through the prelude and `steps` core steps; the keys each step saw."""
    cache.update((0, 0), entry(position, 0), entry(position, 0))
    seen = {}
    for step in range(steps):
        keys, _ = cache.update((CORE, step), entry(position, step), entry(position, step))
        seen[step] = keys[0, 0].tolist()
    return seen


@pytest.mark.parametrize("strategy,slots", [("full", 0), ("latest", 0), ("modulo", 2)])
def test_early_exit_is_seen_through_its_deepest_entry(strategy, slots):
    cache = RecurrentKVCache([CORE], strategy, slots)
    run_token(cache, 0, steps=4)  # token 0: full depth
    run_token(cache, 1, steps=1)  # token 1 exited after its first step
    seen = run_token(cache, 2, steps=4)
    deepest_1 = [1.0, 0.0]
    if strategy == "full":  # exact per-step entries where they exist
        assert seen[3] == [[0.0, 3.0], deepest_1, [2.0, 3.0]]
        assert seen[1] == [[0.0, 1.0], deepest_1, [2.0, 1.0]]
    elif strategy == "latest":  # every earlier token as it ended
        assert seen[1] == [[0.0, 3.0], deepest_1, [2.0, 1.0]]
        assert seen[3] == [[0.0, 3.0], deepest_1, [2.0, 3.0]]
    else:  # slot = step % 2: token 0 left steps 2 and 3 in the slots
        assert seen[0] == [[0.0, 2.0], deepest_1, [2.0, 0.0]]
        assert seen[3] == [[0.0, 3.0], deepest_1, [2.0, 3.0]]
    sizes = {"full": 1 + 4, "latest": 1, "modulo": 1 + 2}
    assert cache.num_entries() == 1 + sizes[strategy]  # + the prelude layer


def test_padding_mask_hides_left_pads_from_real_tokens():
    cache = RecurrentKVCache([CORE], pad_lengths=torch.tensor([2, 0]))
    mask = cache.attention_mask(q_len=4, k_len=4)[:, 0]
    assert mask[0].tolist() == [[True, False, False, False], [False, True, False, False],
                                [False, False, True, False], [False, False, True, True]]
    assert mask[1].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    step = cache.attention_mask(q_len=1, k_len=5)[:, 0]  # one new token after the prompt
    assert step[0].tolist() == [[False, False, True, True, True]] and step[1].all()
    assert RecurrentKVCache([CORE], pad_lengths=torch.tensor([0, 0])).attention_mask(3, 3) is None


def test_bad_strategy_is_named():
    with pytest.raises(ValueError, match="strategy"):
        RecurrentKVCache([CORE], "deepest")
    with pytest.raises(ValueError, match="slots"):
        RecurrentKVCache([CORE], "modulo", 0)
