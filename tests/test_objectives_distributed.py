"""Training objectives through the real trainer: exact resume on CPU, megatron-core TP=2 over
gloo equal to TP=1 (every objective, loss and gradients), ZeRO-3 over 2 ranks equal to one
rank accumulating the same batch, the exit gate through checkpoints and Huginn export.

Run as a script, this file is the 2-rank worker: `python tests/test_objectives_distributed.py SPEC.json`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_distributed import BASE, EXACT_ENOUGH, PYTHON, launch, metrics

REPO = Path(__file__).resolve().parents[1]
# every objective at once: exit gate trained by expected loss + halting BCE, the fixed-point
# term, 2 segments per batch, a curriculum over the first 3 steps; 2 micro-batches of 2 per step
OBJECTIVE = ["model.exit_gate=true", "objective.loss=expected_exit", "objective.exit_entropy_weight=0.05",
             "objective.halting_weight=0.5", "objective.fixed_point_weight=0.3", "objective.segments=2", "objective.curriculum_steps=3",
             "objective.curriculum_start=1.5", "train.checkpoint_every=2"]
ACCUMULATE = ["train.grad_accum_steps=2"]
# (name, objective overrides) checked at the model level, TP=2 against one device
MODEL_CHECKS = {
    "every": {"loss": "every"},
    "segments": {"loss": "last", "segments": 2},
    "expected_exit": {"loss": "expected_exit", "exit_entropy_weight": 0.1},
    "halting": {"loss": "last", "halting_weight": 1.0},
    "fixed_point": {"loss": "last", "fixed_point_weight": 0.5},
    "hrm": {"loss": "every"},  # on HRM's two-timescale core (pretrain/hrm.py)
}

pytestmark = pytest.mark.multiprocess


def config(run_dir, *extra):
    from rdp.pretrain.config import load_config

    return load_config("tiny", BASE + OBJECTIVE + [f"train.run_dir={run_dir}", *extra])


def tiny_gated_model_config(name: str = ""):
    from dataclasses import replace

    cfg = replace(config("unused").model, num_heads=2, mean_backprop_depth=2)
    return replace(cfg, low_level_steps=2, exit_gate=False) if name == "hrm" else cfg


def model_check(objective_name: str, model, grads_out: dict) -> float:
    """Loss of one objective on a fixed batch; fills grads_out with name -> gradient."""
    import torch

    from rdp.pretrain.objectives import Objective

    cfg = model.config
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    labels[:, :2] = -100
    model.zero_grad(set_to_none=True)
    objective = Objective(**MODEL_CHECKS[objective_name])
    loss = model(tokens, labels=labels, num_steps=(1, 3), objective=objective,
                 generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    grads_out.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return loss.item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from rdp.pretrain.train import train

    root = tmp_path_factory.mktemp("objectives")
    train(config(root / "reference", "train.max_steps=4", *ACCUMULATE), progress=False)
    spec = root / "spec.json"
    spec.write_text(json.dumps({
        "scenarios": {str(root / "tp2"): ["parallel.tensor_parallel=2", "train.max_steps=4", *ACCUMULATE],
                      str(root / "dp2_zero3"): ["parallel.zero_stage=3", "train.max_steps=4"]},
        "model_checks": str(root / "model_checks")}))
    launch([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(Path(__file__)), str(spec)], timeout=900)
    return root


def test_resume_with_every_objective_is_bit_identical(runs, tmp_path):
    from rdp.pretrain.train import train

    checkpoint = runs / "reference" / "checkpoints" / "step_00000002"
    train(config(tmp_path, "train.max_steps=4", *ACCUMULATE, f"train.resume={checkpoint}"), progress=False)
    resumed, uninterrupted = metrics(tmp_path), metrics(runs / "reference")[2:]
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("loss", "grad_norm", "n", "k"):
        assert [r[key] for r in resumed] == [r[key] for r in uninterrupted], key


def test_tensor_parallel_2_and_zero_3_train_the_objectives_like_one_device(runs):
    reference = metrics(runs / "reference")
    for layout in ("tp2", "dp2_zero3"):
        other = metrics(runs / layout)
        assert len(other) == 4, layout
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(reference, other)) < EXACT_ENOUGH, layout
        assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(reference, other)) < EXACT_ENOUGH, layout
    # the gate is consolidated with the rest and trained the same under every layout
    from rdp.pretrain.checkpoint import load_model

    gates = [load_model(runs / name).transformer.exit_gate for name in ("reference", "tp2", "dp2_zero3")]
    assert gates[0].weight.shape == (1, 64)
    for gate in gates[1:]:
        assert (gate.weight - gates[0].weight).abs().max() < 1e-5 and (gate.bias - gates[0].bias).abs().max() < 1e-5


@pytest.mark.parametrize("name", list(MODEL_CHECKS))
def test_each_objective_at_tensor_parallel_2_equals_one_device(runs, name):
    import torch

    from rdp.pretrain.model import build_model

    tp2 = torch.load(runs / "model_checks" / f"{name}.pt")
    single: dict = {}
    loss = model_check(name, build_model(tiny_gated_model_config(name), seed=11), single)
    assert abs(tp2["loss"] - loss) < 1e-6
    assert tp2["grads"].keys() == single.keys()
    for param, grad in single.items():
        torch.testing.assert_close(tp2["grads"][param], grad, rtol=1e-4, atol=1e-6, msg=param)


def test_huginn_export_keeps_the_exit_gate(runs, tmp_path):
    import torch

    from rdp.pretrain.checkpoint import load_model
    from rdp.pretrain.convert import export_huginn, import_huginn, load_huginn

    export_huginn(runs / "reference", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rdp_exit_gate"] is True
    ours, theirs = load_model(runs / "reference"), load_huginn(tmp_path / "hf")
    tokens = torch.randint(0, 127, (1, 10))
    with torch.no_grad():
        state = ours(tokens, num_steps=3, init_scale=0.0, return_state=True).state
        torch.testing.assert_close(ours.exit_logits(state), theirs.exit_logits(state), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    imported = load_model(import_huginn(tmp_path / "hf", tmp_path / "back"))
    assert torch.equal(imported.transformer.exit_gate.bias, ours.transformer.exit_gate.bias)


# ---- the 2-rank worker ------------------------------------------------------------------------------
def _worker(spec_file: str) -> None:
    import torch
    import torch.distributed as dist

    from rdp.launch.distributed import init_distributed
    from rdp.pretrain.parallel import build_parallel_model, gather_full_state_dict, shard_specs
    from rdp.pretrain.train import train

    spec = json.loads(Path(spec_file).read_text())
    ctx = init_distributed(2)
    out = Path(spec["model_checks"])
    out.mkdir(exist_ok=True)
    for name in MODEL_CHECKS:
        model = build_parallel_model(tiny_gated_model_config(name), seed=11)
        grads: dict = {}
        loss = model_check(name, model, grads)
        full, _ = gather_full_state_dict(grads.items(), shard_specs(model), keep=ctx.is_main)
        if ctx.is_main:
            torch.save({"loss": loss, "grads": full}, out / f"{name}.pt")
    dist.barrier()
    for run_dir, extra in spec["scenarios"].items():
        train(config(run_dir, *extra), progress=False)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1])
