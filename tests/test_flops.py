"""Analytic FLOPs against torch's FlopCounterMode on the real model, and the planner."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rdp.launch.cli import main as rdp
from rdp.pretrain.config import load_config
from rdp.pretrain.flops import FlopsModel, plan_training, throughput_metrics
from rdp.pretrain.model import build_model
from rdp.pretrain.sampler import DepthSampler


def counted_flops(fn) -> int:
    # the math SDPA backend runs attention as bmm, which FlopCounterMode counts (the fused
    # CPU kernel is not counted); on the meta device SDPA decomposes the same way
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def assert_within_one_percent(analytic, counted):
    assert counted > 0 and abs(analytic / counted - 1) < 0.01, (analytic, counted)


@pytest.mark.parametrize("depth", [1, 3])
def test_forward_flops_match_flop_counter_on_tiny_model(tiny_config, depth):
    model = build_model(tiny_config.model, seed=0)
    tokens = torch.randint(0, 128, (2, 48))
    counted = counted_flops(lambda: model(tokens, num_steps=depth)) / tokens.numel()
    assert_within_one_percent(FlopsModel.from_config(tiny_config.model, 48).forward(depth), counted)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_flops_match_flop_counter_on_tiny_model(tiny_config, checkpointing):
    cfg = replace(tiny_config.model, activation_checkpointing=checkpointing)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 128, (2, 40))
    n, k = 3, 2

    def step():
        model(tokens, labels=tokens, num_steps=(n, k), return_logits=False).loss.backward()

    counted = counted_flops(step) / tokens.numel()
    flops = FlopsModel.from_config(cfg, 40)
    assert_within_one_percent(flops.train(n, k, recompute=checkpointing), counted)
    if checkpointing:
        assert flops.train(n, k, recompute=True) > flops.train(n, k)


def test_huginn_flops_match_flop_counter_on_meta_device():
    cfg = load_config("huginn-3.5b").model
    model = build_model(replace(cfg, activation_checkpointing=False), device="meta")
    tokens = torch.zeros(1, 4096, dtype=torch.long, device="meta")
    flops = FlopsModel.from_config(cfg)
    counted = counted_flops(lambda: model(tokens, num_steps=2)) / 4096
    assert_within_one_percent(flops.forward(2), counted)

    def step():
        model(tokens, labels=tokens, num_steps=(1, 1), return_logits=False).loss.backward()

    assert_within_one_percent(flops.train(1, 1), counted_flops(step) / 4096)


def test_expected_training_flops_are_over_the_distribution_not_the_mean():
    cfg = load_config("tiny").model
    flops = FlopsModel.from_config(cfg)
    sampler = DepthSampler.from_config(cfg, seed=0)
    draws = np.array([sampler(s) for s in range(20_000)])
    monte_carlo = np.mean([flops.train(int(n), int(k)) for n, k in draws])
    assert abs(flops.expected_train(sampler) / monte_carlo - 1) < 0.01


def test_throughput_metrics():
    flops = FlopsModel(prelude=10, core=20, adapter=5, coda=10, head=5)
    record = throughput_metrics(flops, n=2, k=1, tokens=100, seconds=2.0, recompute=True, peak=1e6)
    assert record["model_flops_per_s"] == flops.train(2, 1) * 100 / 2
    assert record["mfu"] == record["model_flops_per_s"] / 1e6 and record["hfu"] > record["mfu"]
    assert "mfu" not in throughput_metrics(flops, 2, 1, 100, 2.0, False, peak=None)


def test_device_peak_flops_uses_the_configured_value_or_the_table():
    from rdp.pretrain.flops import PEAK_FLOPS, device_peak_flops

    assert device_peak_flops(123e12) == 123e12
    assert PEAK_FLOPS["h100"] == PEAK_FLOPS["h200"] == 989e12 and PEAK_FLOPS["mi250x"] == 191.5e12
    if not torch.cuda.is_available():
        assert device_peak_flops() is None


def test_rdp_flops_json_has_the_documented_fields(capsys):
    assert rdp(["flops", "huginn-3.5b", "--json", "--depths", "1,32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_total"] == 3_564_976_800
    assert report["params_materialized"]["32"] == 1_983_384_480 + 32 * 1_581_592_320
    assert report["seq_len"] == 4096
    assert report["forward_flops_per_token"]["32"] > 10 * report["forward_flops_per_token"]["1"] / 4
    assert report["forward_flops_per_token_causal"]["32"] < report["forward_flops_per_token"]["32"]
    # recurrence makes 6N an order-of-magnitude undercount
    assert report["train_flops_per_token_expected"] > 5 * report["six_n_per_token"]


def test_plan_matches_the_huginn_run_order_of_magnitude():
    # huginn-0125: ~800B tokens on 4096 MI250X dies at 52-64 TFLOP/s each (~0.3 of 191.5 peak)
    plan = plan_training(load_config("huginn-3.5b").model, tokens=800e9, gpus=4096, gpu="mi250x", mfu=0.3)
    assert 1e23 < plan.total_flops < 1e24
    assert 3 < plan.days < 30
    assert plan.gpu_hours == pytest.approx(plan.seconds * 4096 / 3600)
    with pytest.raises(ValueError, match="--gpu"):
        plan_training(load_config("huginn-3.5b").model, 1e9, 8, "tpu-v9", 0.4)
