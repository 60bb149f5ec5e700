"""The single-process training job and the Huginn import/export."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rdp.launch.cli import main as rdp
from rdp.pretrain.checkpoint import load_model
from rdp.pretrain.config import load_config
from rdp.pretrain.convert import ConversionError, load_huginn, save_huginn
from rdp.pretrain.model import build_model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    code = rdp(["train", "tiny", "--no-progress", f"train.run_dir={run_dir}", "train.max_steps=6",
                "train.checkpoint_every=3", "train.eval_depths=[1,4]", "train.eval_batches=1"])
    assert code == 0
    return run_dir


def test_train_writes_metrics_tensorboard_config_and_checkpoint(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert {"step", "loss", "tokens", "n", "k", "lr", "grad_norm"} <= r.keys()
        assert r["n"] + r["k"] >= 1
        assert r["model_flops_per_s"] > 0 and "mfu" not in r  # no peak on a CPU: achieved FLOP/s only
    assert records[-1]["tokens"] == 6 * 8 * 64
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(trained_run / "config.yaml").train.max_steps == 6
    model = load_model(trained_run)
    assert model.config.hidden_size == 64


def test_training_lowers_the_loss(tmp_path):
    from rdp.pretrain.train import train

    cfg = load_config("tiny", [f"train.run_dir={tmp_path}", "train.max_steps=30", "train.eval_depths=[]"])
    result = train(cfg, progress=False)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.3


def test_bf16_and_gradient_accumulation_train(tmp_path):
    from rdp.pretrain.train import train

    cfg = load_config("tiny", [f"train.run_dir={tmp_path}", "train.max_steps=2", "train.precision=bf16",
                               "train.grad_accum_steps=2", "train.eval_depths=[]"])
    result = train(cfg, progress=False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["tokens"] == 2 * 2 * 8 * 64


def test_export_import_round_trip_gives_identical_logits(trained_run, tmp_path):
    assert rdp(["convert", "to-huginn", str(trained_run), str(tmp_path / "hf")]) == 0
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    assert weights["transformer.core_block.1.attn.qk_bias"].shape == (2, 1, 4, 16)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_embd"] == 64 and config["n_layers_in_recurrent_block"] == 2
    assert rdp(["convert", "from-huginn", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0

    tokens = torch.randint(0, 128, (2, 12))
    original, imported, reimported = load_model(trained_run), load_huginn(tmp_path / "hf"), load_model(tmp_path / "back")
    with torch.no_grad():
        logits = [m(tokens, num_steps=6, init_scale=0.0).logits for m in (original, imported, reimported)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_import_reads_sharded_checkpoints_and_ignores_stored_rope(tmp_path, micro_model_config):
    model = build_model(micro_model_config, seed=0)
    save_huginn(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    save_file({"freqs_cis": torch.zeros(4, 2)}, str(tmp_path / "model-rope.safetensors"))
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys} | {"freqs_cis": "model-rope.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_huginn(tmp_path)
    tokens = torch.randint(0, micro_model_config.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(tokens, num_steps=3, init_scale=0.0).logits,
                           loaded(tokens, num_steps=3, init_scale=0.0).logits)


def test_import_errors_name_the_problem(tmp_path, micro_model_config):
    save_huginn(build_model(micro_model_config, seed=0), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["transformer.adapter.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="transformer.adapter.weight"):
        load_huginn(tmp_path)
    with pytest.raises(ConversionError, match="config.json"):
        load_huginn(tmp_path / "nowhere")
