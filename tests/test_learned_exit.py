"""Evaluation with the learned exit (`--exit-criterion learned`): a token stops once the
exit gate's CDF 1 - prod (1 - lambda_t) reaches q."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from rdp.evals.adaptive import ExitCriterion, learned_exit_forward
from rdp.evals.runner import DepthRunner, DepthSettings
from rdp.pretrain.model import build_model


def constant_gate_model(cfg, hazard: float):
    """A gated model whose exit hazard is `hazard` at every state (weight 0, bias logit)."""
    model = build_model(replace(cfg, exit_gate=True), seed=0).eval()
    with torch.no_grad():
        model.transformer.exit_gate.weight.zero_()
        model.transformer.exit_gate.bias.fill_(math.log(hazard / (1 - hazard)))
    return model


def first_step_reaching(hazard: float, q: float) -> int:
    """The first t with 1 - (1 - hazard)^t >= q, counted by hand."""
    t, survive = 0, 1.0
    while True:
        t += 1
        survive *= 1 - hazard
        if 1 - survive >= q - 1e-12:
            return t


@pytest.mark.parametrize("hazard,q", [(0.5, 0.8), (0.2, 0.5), (0.9, 0.5)])
def test_runner_exits_each_token_where_the_gate_cdf_reaches_q(micro_model_config, hazard, q):
    model = constant_gate_model(micro_model_config, hazard)
    expected = first_step_reaching(hazard, q)
    assert expected < 8
    ids = [[5, 9, 2, 7, 11, 3]]
    learned = DepthRunner(model, DepthSettings(num_steps=8, init_scale=0.0, exit_criterion="learned", exit_threshold=q))
    fixed = DepthRunner(model, DepthSettings(num_steps=expected, init_scale=0.0))
    (logp, _), = learned.continuation_logprobs(ids, [ids[0][1:] + [4]])
    (reference, _), = fixed.continuation_logprobs(ids, [ids[0][1:] + [4]])
    assert learned.steps_used == [expected] * 6 and learned.mean_steps() == expected
    torch.testing.assert_close(logp, reference, rtol=1e-5, atol=1e-5)


def test_full_sequence_learned_exit_freezes_each_position_at_its_exit(micro_model_config):
    model = constant_gate_model(micro_model_config, 0.5)
    tokens = torch.randint(0, micro_model_config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    logits, steps = learned_exit_forward(model, tokens, max_depth=8, q=0.8)
    assert (steps == 3).all()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(tokens, num_steps=3, init_scale=0.0).logits, rtol=1e-5, atol=1e-5)
    # a state-dependent gate: positions exit at different iterations; q = 1 never exits
    with torch.no_grad():
        model.transformer.exit_gate.weight.normal_(0, 2.0)
    _, low = learned_exit_forward(model, tokens, 8, 0.3)
    _, high = learned_exit_forward(model, tokens, 8, 0.9)
    full_logits, full = learned_exit_forward(model, tokens, 8, 1.0)
    assert len(low.unique()) > 1 and (low <= high).all() and (high <= full).all() and (full == 8).all()
    with torch.no_grad():
        torch.testing.assert_close(full_logits, model(tokens, num_steps=8, init_scale=0.0).logits, rtol=1e-5, atol=1e-5)


def test_learned_exit_errors_are_clear(micro_model_config):
    with pytest.raises(ValueError, match=r"CDF level q in \(0, 1\]"):
        DepthSettings(exit_criterion="learned", exit_threshold=1.5)
    with pytest.raises(ValueError, match="exit gate"):
        DepthRunner(build_model(micro_model_config, seed=0), DepthSettings(exit_criterion="learned"))
    assert ExitCriterion("learned").threshold == 0.5 and ExitCriterion("learned").needs_gate
