"""The depth draw, the configs and their error messages, parameter counts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rdp.launch.cli import main as rdp
from rdp.pretrain.config import ConfigError, load_config
from rdp.pretrain.model import build_model, materialized_parameters, parameter_counts
from rdp.pretrain.sampler import DepthSampler


def draws(sampler, steps):
    return np.array([sampler(step) for step in range(steps)])


def test_sampler_mean_matches_the_configured_mean():
    sampler = DepthSampler(mean_recurrence=32, backprop_depth=8, sigma=0.5, seed=0)
    nk = draws(sampler, 20_000)
    depth = nk.sum(axis=1)
    # the log-normal Poisson part has mean = mean_recurrence; p = Poisson + 1 (spec: "about 33")
    assert abs((depth - 1).mean() / 32 - 1) < 0.02
    assert abs(depth.mean() / 33 - 1) < 0.02
    assert (nk[:, 1] <= 8).all() and (nk[:, 1] >= 1).all() and (nk[:, 0] >= 0).all()
    assert ((nk[:, 0] == 0) | (nk[:, 1] == 8)).all()  # no-grad steps only once k is full


def test_sampler_is_a_pure_function_of_seed_and_step():
    a, b = DepthSampler(32, 8, seed=5), DepthSampler(32, 8, seed=5)
    assert [a(s) for s in range(200)] == [b(s) for s in reversed(range(200))][::-1]
    assert a(123) == a(123)
    assert [a(s) for s in range(200)] != [DepthSampler(32, 8, seed=6)(s) for s in range(200)]


def test_sampler_distribution_agrees_with_draws():
    sampler = DepthSampler(8, 4, seed=0)
    pmf = sampler.distribution(max_depth=200)
    assert abs(sum(pmf.values()) - 1) < 1e-6
    mean = sum(r * p for r, p in pmf.items())
    assert abs(mean - draws(sampler, 20_000).sum(axis=1).mean()) < 0.1


def test_huginn_preset_has_the_spec_parameter_counts():
    counts = parameter_counts(build_model(load_config("huginn-3.5b").model, device="meta"))
    assert counts["total"] == 3_564_976_800
    assert counts["core"] == 1_581_592_320
    assert counts["prelude"] == counts["coda"] == 790_796_160
    assert counts["adapter"] == 55_756_800 and counts["embedding"] == 346_030_080 and counts["final_norm"] == 5280
    assert materialized_parameters(counts, 32) == 1_983_384_480 + 32 * 1_581_592_320


def test_rdp_info_json(capsys):
    assert rdp(["info", "huginn-3.5b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_total"] == 3_564_976_800 and report["params_core"] == 1_581_592_320
    assert report["params_materialized"]["1"] == 1_983_384_480 + 1_581_592_320


def test_overrides_apply_with_types():
    cfg = load_config("tiny", ["model.mean_recurrence=8", "train.max_steps=50", "train.lr=1e-3"])
    assert cfg.model.mean_recurrence == 8 and cfg.train.max_steps == 50 and cfg.train.lr == 1e-3


@pytest.mark.parametrize("override,field", [
    ("model.hiden_size=3", "model.hiden_size"),          # unknown key
    ("train.max_steps=many", "train.max_steps"),          # wrong type
    ("model.num_heads=5", "model.hidden_size"),           # 64 not divisible by 5
    ("train.precision=fp8", "train.precision"),           # impossible value
    ("model.mean_backprop_depth=9", "model.mean_backprop_depth"),
    ("data.seq_len=100000", "data.seq_len"),
    ("model.eos_token_id=500", "model.eos_token_id"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny", [override])


def test_cli_reports_config_errors_in_one_line(capsys):
    assert rdp(["train", "tiny", "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err


def test_yaml_with_unknown_section_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\noptimiser:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="optimiser") as info:
        load_config(bad)
    assert "bad.yaml" in str(info.value)
