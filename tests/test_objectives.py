"""Training objectives (pretrain/objectives.py): each loss and its gradients against the
computation written out by hand on a tiny model; the recurrence curriculum; the config checks;
FLOPs of each objective against FlopCounterMode."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from rdp.pretrain.model import build_model
from rdp.pretrain.objectives import Objective


def gated(cfg):
    return replace(cfg, exit_gate=True)


def batch(cfg, seed=0, length=9):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, length), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, length), generator=g)
    labels[0, :3] = -100  # unscored positions must not count
    return tokens, labels


# ---- the hand-written side -----------------------------------------------------------------
def hand_states(model, tokens, n, k, segments=1):
    """States after each grad iteration of each segment, written with plain autograd:
    the state detached after the no-grad iterations and between segments."""
    torch.manual_seed(7)
    cos_sin = model.cos_sin[:tokens.shape[1]]
    e = model.embed(tokens)
    for block in model.transformer.prelude:
        e = block(e, cos_sin)
    s = model.initial_state(e)
    out = []
    for _ in range(segments):
        s = s.detach()
        for _ in range(n):
            s = model.core_step(s, e, cos_sin)
        s = s.detach()
        states = []
        for _ in range(k):
            s = model.core_step(s, e, cos_sin)
            states.append(s)
        out.append(states)
    return out, cos_sin


def hand_logits(model, s, cos_sin):
    return model.decode(s, cos_sin) @ model.transformer.wte.weight.T


def hand_token_ce(logits, labels):
    """Per-token CE written out: logsumexp - logit[label], 0 where unscored."""
    scored = labels != -100
    picked = logits.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return (torch.logsumexp(logits, -1) - picked) * scored


def hand_lambda(model, s):
    """Exit hazard sigmoid(w . s / rms(s) + b), written out."""
    gate = model.transformer.exit_gate
    rms = torch.sqrt((s * s).mean(-1, keepdim=True) + model.config.norm_eps)
    return torch.sigmoid((s / rms) @ gate.weight[0] + gate.bias[0])


def ours(model, tokens, labels, n, k, objective):
    torch.manual_seed(7)
    return model(tokens, labels=labels, num_steps=(n, k), objective=objective).loss


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(model, a, b):
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(model, a), loss_and_grads(model, b)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
    return grads_a


# ---- each objective against its hand-written computation ------------------------------------------
def test_last_is_the_model_default_loss(micro_model_config):
    model = build_model(micro_model_config, seed=1)
    tokens, labels = batch(micro_model_config)
    default = lambda: ours(model, tokens, labels, 2, 2, None)  # noqa: E731
    plain = lambda: ours(model, tokens, labels, 2, 2, Objective("last"))  # noqa: E731
    (a, _), (b, _) = loss_and_grads(model, default), loss_and_grads(model, plain)
    assert a.item() == b.item()


@pytest.mark.parametrize("n,k", [(2, 3), (0, 1)])
def test_deep_supervision_is_the_mean_of_a_loss_after_every_grad_iteration(micro_model_config, n, k):
    model = build_model(micro_model_config, seed=1)
    tokens, labels = batch(micro_model_config)
    scored = (labels != -100).sum()

    def hand():
        (states,), cos_sin = hand_states(model, tokens, n, k)
        return sum(hand_token_ce(hand_logits(model, s, cos_sin), labels).sum() / scored for s in states) / k

    assert_same(model, lambda: ours(model, tokens, labels, n, k, Objective("every")), hand)


def test_segments_carry_the_detached_state_and_average_their_losses(micro_model_config):
    model = build_model(micro_model_config, seed=2)
    tokens, labels = batch(micro_model_config, seed=1)
    scored = (labels != -100).sum()

    def hand():
        segments, cos_sin = hand_states(model, tokens, 0, 2, segments=3)
        return sum(hand_token_ce(hand_logits(model, states[-1], cos_sin), labels).sum() / scored
                   for states in segments) / 3

    # n = 0: only the detach between segments keeps the gradient from flowing through earlier ones
    assert_same(model, lambda: ours(model, tokens, labels, 0, 2, Objective("last", segments=3)), hand)
    # every later segment starts from the previous one's final state
    with torch.no_grad():
        torch.manual_seed(7)
        one = model(tokens, num_steps=(1, 2), init_scale=1.0, return_state=True).state
        torch.manual_seed(7)
        two = model(tokens, labels=labels, num_steps=(1, 2), return_state=True, objective=Objective("last", segments=2))
        torch.manual_seed(7)
        six = model(tokens, num_steps=(6, 0), return_state=True).state
    assert not torch.equal(one, two.state)
    torch.testing.assert_close(two.state, six, rtol=1e-5, atol=1e-5)


def test_expected_exit_loss_is_the_expectation_under_the_gate_minus_entropy(micro_model_config):
    cfg = gated(micro_model_config)
    model = build_model(cfg, seed=3)
    with torch.no_grad():  # a gate that varies across tokens and iterations
        model.transformer.exit_gate.weight.normal_(0, 1.0)
    tokens, labels = batch(cfg, seed=2)
    scored = labels != -100
    beta = 0.3

    def hand():
        (states,), cos_sin = hand_states(model, tokens, 2, 3)
        lam = [hand_lambda(model, s) for s in states]
        survive = torch.ones_like(lam[0])
        p = []
        for t in range(3):
            p.append(survive * lam[t] if t < 2 else survive)  # the last iteration takes what is left
            survive = survive * (1 - lam[t])
        ce = [hand_token_ce(hand_logits(model, s, cos_sin), labels) for s in states]
        expected = sum(pt * c for pt, c in zip(p, ce))
        entropy = -sum(pt * torch.log(pt) for pt in p)
        return ((expected - beta * entropy) * scored).sum() / scored.sum()

    grads = assert_same(model, lambda: ours(model, tokens, labels, 2, 3, Objective("expected_exit", 1, beta)), hand)
    assert grads["transformer.exit_gate.weight"].abs().sum() > 0


def test_expected_exit_over_one_grad_iteration_is_the_plain_loss(micro_model_config):
    model = build_model(gated(micro_model_config), seed=3)
    tokens, labels = batch(micro_model_config, seed=2)
    (a, _), (b, _) = (loss_and_grads(model, lambda: ours(model, tokens, labels, 2, 1, objective))
                      for objective in (Objective("expected_exit", exit_entropy_weight=0.5), None))
    torch.testing.assert_close(a, b)


def test_halting_head_is_trained_on_correctness_of_each_iteration(micro_model_config):
    cfg = gated(micro_model_config)
    model = build_model(cfg, seed=4)
    tokens, labels = batch(cfg, seed=3)
    # make some predictions right: label = the model's own argmax after iteration 1 at some positions
    with torch.no_grad():
        (states,), cos_sin = hand_states(model, tokens, 0, 2)
        own = hand_logits(model, states[0], cos_sin).argmax(-1)
    labels[:, ::2] = own[:, ::2]
    scored = labels != -100
    weight = 0.7

    def hand():
        (states,), cos_sin = hand_states(model, tokens, 0, 2)
        total = 0
        for s in states:
            logits = hand_logits(model, s, cos_sin)
            correct = (logits.argmax(-1) == labels).float()
            lam = hand_lambda(model, s)
            bce = -(correct * torch.log(lam) + (1 - correct) * torch.log(1 - lam))
            total = total + (bce * scored).sum()
        task = sum(hand_token_ce(hand_logits(model, s, cos_sin), labels).sum() for s in states) / 2
        return task / scored.sum() + weight * total / (scored.sum() * 2)

    objective = Objective("every", halting_weight=weight)
    assert_same(model, lambda: ours(model, tokens, labels, 0, 2, objective), hand)


@pytest.mark.parametrize("loss", ["last", "expected_exit"])
def test_fixed_point_term_is_the_relative_state_change_between_grad_iterations(micro_model_config, loss):
    cfg = gated(micro_model_config) if loss == "expected_exit" else micro_model_config
    model = build_model(cfg, seed=5)
    tokens, labels = batch(cfg, seed=4)
    scored = labels != -100
    weight, beta = 0.4, 0.2

    def hand():
        (states,), cos_sin = hand_states(model, tokens, 1, 3)
        if loss == "last":
            task = (hand_token_ce(hand_logits(model, states[-1], cos_sin), labels)).sum() / scored.sum()
        else:
            task = ours(model, tokens, labels, 1, 3, Objective("expected_exit", exit_entropy_weight=beta))
        # every position, scored or not; the denominator a constant
        change = sum(((b - a) ** 2).sum(-1) / (a.detach() ** 2).sum(-1) for a, b in zip(states, states[1:]))
        return task + weight * change.mean() / 2

    objective = Objective(loss, exit_entropy_weight=beta if loss == "expected_exit" else 0.0, fixed_point_weight=weight)
    grads = assert_same(model, lambda: ours(model, tokens, labels, 1, 3, objective), hand)
    without = loss_and_grads(model, lambda: ours(model, tokens, labels, 1, 3, replace(objective, fixed_point_weight=0.0)))
    assert not torch.allclose(grads["transformer.adapter.weight"], without[1]["transformer.adapter.weight"])
    # one grad iteration has no pair of states: the term is absent
    one = [loss_and_grads(model, lambda o=o: ours(model, tokens, labels, 2, 1, o))[0]
           for o in (objective, replace(objective, fixed_point_weight=0.0))]
    torch.testing.assert_close(one[0], one[1])


def test_exit_distribution_sums_to_one_and_is_exact_for_saturated_gates():
    from rdp.pretrain.objectives import exit_log_distribution

    z = torch.tensor([[-50.0, 3.0], [0.0, 60.0], [1.0, -2.0]])  # (iterations - 1, tokens)
    p = exit_log_distribution(z, 4).exp()
    torch.testing.assert_close(p.sum(0), torch.ones(2))
    assert p[0, 0] < 1e-20 and p[2, 1] < 1e-20 and torch.isfinite(exit_log_distribution(z, 4)).all()


# ---- the recurrence curriculum ---------------------------------------------------------------------
def test_curriculum_ramps_the_mean_recurrence_as_a_pure_function_of_the_step():
    import numpy as np

    from rdp.pretrain.sampler import DepthSampler

    flat = DepthSampler(16, 2, 0.5, seed=3)
    linear = DepthSampler(16, 2, 0.5, seed=3, curriculum_steps=100, curriculum="linear", curriculum_start=2)
    root = DepthSampler(16, 2, 0.5, seed=3, curriculum_steps=100, curriculum="1-sqrt", curriculum_start=2)
    assert linear.mean_at(0) == root.mean_at(0) == 2 and linear.mean_at(100) == root.mean_at(100) == 16
    assert linear.mean_at(50) == 9 and root.mean_at(75) == pytest.approx(2 + 14 * 0.5)
    assert root.mean_at(50) < linear.mean_at(50)  # 1-sqrt stays shallow longer
    # after the ramp the draws are exactly the un-ramped sampler's; during it, a pure function of the step
    assert [linear(s) for s in range(100, 140)] == [flat(s) for s in range(100, 140)]
    assert [linear(s) for s in range(40)] == [linear(s) for s in range(40)]
    # the draws follow the ramp: mean total depth over many seeds at a few steps
    for step in (10, 60):
        draws = [sum(DepthSampler(16, 2, 0.5, seed=i, curriculum_steps=100, curriculum_start=2)(step))
                 for i in range(3000)]
        assert abs(np.mean(draws) - (linear.mean_at(step) + 1)) < 0.15 * linear.mean_at(step)


@pytest.mark.parametrize("override,field", [
    (["objective.loss=sometimes"], "objective.loss"),
    (["objective.segments=0"], "objective.segments"),
    (["objective.loss=expected_exit"], "model.exit_gate"),
    (["model.exit_gate=true"], "model.exit_gate"),
    (["objective.curriculum=cubic"], "objective.curriculum"),
    (["objective.curriculum_start=99"], "objective.curriculum_start"),
    (["objective.halting_weight=-1", "model.exit_gate=true"], "objective.halting_weight"),
    (["objective.fixed_point_weight=-0.1"], "objective.fixed_point_weight"),
])
def test_objective_config_errors_name_the_field(override, field):
    from rdp.pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_config("tiny", override)


# ---- FLOPs of each objective ------------------------------------------------------------------------
@pytest.mark.parametrize("objective", [Objective("every"), Objective("last", segments=2),
                                       Objective("expected_exit", exit_entropy_weight=0.1),
                                       Objective("expected_exit", segments=2, halting_weight=0.5)],
                         ids=["every", "segments", "expected_exit", "exit+halting+segments"])
def test_objective_flops_match_flop_counter(tiny_config, objective):
    from rdp.pretrain.flops import FlopsModel
    from tests.test_flops import assert_within_one_percent, counted_flops

    cfg = replace(tiny_config.model, exit_gate=objective.loss == "expected_exit" or objective.halting_weight > 0)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 128, (2, 40))
    n, k = 2, 3

    def step():
        model(tokens, labels=tokens, num_steps=(n, k), return_logits=False, objective=objective).loss.backward()

    flops = FlopsModel.from_config(cfg, 40)
    assert_within_one_percent(flops.train(n, k, objective=objective), counted_flops(step) / tokens.numel())
    assert flops.train(n, k, objective=objective) > flops.train(n, k)


# ---- HRM's two-timescale core (pretrain/hrm.py) ------------------------------------------------------
def hrm_config(cfg, steps=3):
    return replace(cfg, low_level_steps=steps, low_level_layers=1)


def hand_hrm(model, tokens, n, k, steps):
    """The two-timescale recurrence written out: T low-level updates z_L <- L(z_L + z_H + e)
    per high-level update z_H <- H(adapter([z_H, z_L])); in a grad iteration the first T-1
    low-level results are constants (detached), the state detached after the n no-grad ones."""
    cos_sin = model.cos_sin[:tokens.shape[1]]
    e = model.embed(tokens)
    for block in model.transformer.prelude:
        e = block(e, cos_sin)
    zh, zl = torch.zeros_like(e), torch.zeros_like(e)

    def run(blocks, x):
        for block in blocks:
            x = block(x, cos_sin)
        return x

    for it in range(n + k):
        for t in range(steps):
            if t == steps - 1 and it >= n:
                zl = zl.detach()
            zl = run(model.transformer.low_block, zl + zh + e)
        zh = run(model.transformer.core_block, torch.cat([zh, zl], -1) @ model.transformer.adapter.weight.T)
        if it == n - 1:
            zh, zl = zh.detach(), zl.detach()
    return hand_logits(model, zh, cos_sin)


def test_hrm_core_forward_and_one_step_gradient_match_the_hand_written_recurrence(micro_model_config):
    model = build_model(hrm_config(micro_model_config), seed=5)
    tokens, labels = batch(micro_model_config, seed=4)
    scored = (labels != -100).sum()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, num_steps=4, init_scale=0.0).logits,
                                   hand_hrm(model, tokens, 4, 0, 3), rtol=1e-5, atol=1e-5)

    def ours_hrm():
        return model(tokens, labels=labels, num_steps=(1, 2), init_scale=0.0).loss

    def hand():
        return hand_token_ce(hand_hrm(model, tokens, 1, 2, 3), labels).sum() / scored

    grads = assert_same(model, ours_hrm, hand)
    assert grads["transformer.low_block.0.mlp.fc.weight"].abs().sum() > 0


def test_hrm_core_flops_config_and_export(tiny_config, micro_model_config, tmp_path):
    from rdp.pretrain.config import ConfigError, load_config
    from rdp.pretrain.convert import ConversionError, save_huginn
    from rdp.pretrain.flops import FlopsModel
    from tests.test_flops import assert_within_one_percent, counted_flops

    cfg = hrm_config(tiny_config.model, steps=3)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 128, (2, 40))

    def step():
        model(tokens, labels=tokens, num_steps=(1, 2), return_logits=False).loss.backward()

    flops = FlopsModel.from_config(cfg, 40)
    assert_within_one_percent(flops.train(1, 2), counted_flops(step) / tokens.numel())
    assert_within_one_percent(flops.forward(3), counted_flops(lambda: model(tokens, num_steps=3)) / tokens.numel())
    with pytest.raises(ConfigError, match="'model.low_level_layers'"):
        load_config("tiny", ["model.low_level_steps=2", "model.low_level_layers=0"])
    with pytest.raises(ConversionError, match="two-timescale"):
        save_huginn(build_model(hrm_config(micro_model_config), seed=0), tmp_path)


def test_hrm_core_generates_the_same_with_the_full_kv_cache(micro_model_config):
    from rdp.evals.runner import DepthRunner, DepthSettings, SamplingParams

    model = build_model(hrm_config(micro_model_config, steps=2), seed=6)
    prompts = [[3, 9, 14, 2], [7, 1]]
    out = [DepthRunner(model, DepthSettings(num_steps=3, init_scale=0.0, cache=cache)).generate(
        prompts, SamplingParams(max_new_tokens=5)) for cache in ("full", "none")]
    assert out[0] == out[1]
