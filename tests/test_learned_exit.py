"""Evaluation with the learned exit (`--exit-criterion learned`): a token stops once the
exit gate's CDF 1 - prod (1 - lambda_t) reaches q."""
from __future__ import annotations

import json
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


def gated_checkpoint(directory):
    """A tiny gated model whose exit depends on the state, saved as a checkpoint."""
    from rdp.pretrain.checkpoint import save_model_weights
    from rdp.pretrain.config import load_config

    config = load_config("tiny", ["model.exit_gate=true", "objective.loss=expected_exit"])
    model = build_model(config.model, seed=0).eval()
    with torch.no_grad():
        model.transformer.exit_gate.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        model.transformer.exit_gate.bias.zero_()
    save_model_weights(model, directory, config)
    return model


def test_reasoning_sweep_with_the_learned_exit_records_mean_steps_per_cap(tmp_path, capsys):
    """`rdp eval --tasks parity --exit-criterion learned`: each depth is a cap; the one-pass
    sweep gives, at every cap, learned_exit_forward's answers and iterations (scored positions)."""
    from rdp.data_pipeline.tasks import load_task
    from rdp.evals.testing import write_tiny_checkpoint
    from rdp.launch.cli import main as rdp

    model = gated_checkpoint(tmp_path / "gated")
    out, q, caps = tmp_path / "sweep", 0.7, [1, 4, 8]
    assert rdp(["eval", str(tmp_path / "gated"), "--tasks", "parity", "--depths", "1,4,8", "--exit-criterion",
                "learned", "--exit-threshold", str(q), "--reasoning-examples", "12", "--seed", "5", "--out",
                str(out), "--no-progress"]) == 0
    document = json.loads((out / "results.json").read_text())
    task = load_task("parity")
    used = []
    for split in task.test_splits():
        batch = task.batch(split, 0, 12, 5)
        scored = batch.labels != -100
        for cap in caps:
            logits, steps = learned_exit_forward(model, batch.inputs, cap, q)
            entry = document["results"][f"parity/{split}"][str(cap)]
            assert entry["mean_steps"] == pytest.approx(steps[scored].double().mean().item(), abs=1e-9)
            exact = ((logits.argmax(-1) == batch.labels) | ~scored).all(-1).float().mean().item()
            assert entry["score"] == pytest.approx(exact, abs=1e-9)
            right = (logits.argmax(-1) == batch.labels)[scored].float().mean().item()
            assert entry["all"]["position_accuracy"] == pytest.approx(right, abs=1e-9)
            if cap == max(caps):
                used.append(steps[scored])
    used = torch.cat(used)  # positions exit on their own, at different iterations, before the deepest cap
    assert used.float().mean() < max(caps) and len(used.unique()) > 1
    assert "learned (exit once the gate's CDF reaches q = 0.7)" in (out / "results.md").read_text()
    capsys.readouterr()

    # refused in one line: other criteria on reasoning tasks, a model without a gate, training without one
    assert rdp(["eval", str(tmp_path / "gated"), "--tasks", "parity", "--exit-criterion", "kl",
                "--out", str(tmp_path / "kl")]) == 2
    assert "--exit-criterion kl is not supported on reasoning tasks" in capsys.readouterr().err
    plain = write_tiny_checkpoint(tmp_path / "plain")
    assert rdp(["eval", str(plain), "--tasks", "parity", "--depths", "2", "--exit-criterion", "learned",
                "--out", str(tmp_path / "plain-sweep"), "--no-progress"]) == 2
    assert "needs a model trained with an exit gate" in capsys.readouterr().err
    assert rdp(["reasoning", "parity", "--exit-criterion", "learned", "--out", str(tmp_path / "r"),
                "model.exit_gate=false", "objective.loss=last"]) == 2
    assert "--exit-criterion learned needs model.exit_gate=true" in capsys.readouterr().err
    assert not (tmp_path / "r" / "train").exists()


def test_reasoning_command_trains_a_gate_and_sweeps_with_the_learned_exit(tmp_path):
    from rdp.launch.cli import main as rdp

    out = tmp_path / "run"
    assert rdp(["reasoning", "parity", "--steps", "1", "--depths", "1,3", "--examples", "4", "--out", str(out),
                "--exit-criterion", "learned", "--exit-threshold", "0.9", "--no-progress", "model.exit_gate=true",
                "objective.loss=expected_exit", "train.micro_batch_size=4", "train.eval_depths=[]"]) == 0
    document = json.loads((out / "eval" / "results.json").read_text())
    assert document["settings"]["exit_criterion"] == "learned" and document["settings"]["exit_threshold"] == 0.9
    for per_depth in document["results"].values():
        assert 1.0 == per_depth["1"]["mean_steps"] and 1.0 <= per_depth["3"]["mean_steps"] <= 3.0
