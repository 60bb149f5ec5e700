"""`rdp demo` end to end with a tiny step count (the full demo's figures come from
benchmarks/bench_demo.py, not from a test)."""
from __future__ import annotations

import json
from pathlib import Path

from rdp.launch.cli import main as rdp


def tiny_demo(out, text_steps: int, *overrides: str) -> list[str]:
    """argv of a 3-step demo into `out` (8 examples per point)."""
    return ["demo", "--out", str(out), "--steps", "3", "--examples", "8", "--text-steps", str(text_steps),
            "--no-progress", "train.micro_batch_size=8", "train.eval_every=0", *overrides]


def run_demo(argv: list[str], capsys) -> tuple[str, dict]:
    """(what it printed, its pointer_chasing.json) of a demo that must succeed."""
    assert rdp(argv) == 0
    return capsys.readouterr().out, json.loads((Path(argv[2]) / "pointer_chasing.json").read_text())


def test_demo_trains_sweeps_plots_and_runs_the_text_smoke_path(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = tiny_demo(out, 2)
    printed, document = run_demo(argv, capsys)
    assert set(document["exact_match"]) == {"easy", "hard6", "hard8"}
    assert all(set(curve) == {str(d) for d in range(1, 33)} for curve in document["exact_match"].values())
    assert document["difficulty"] == {"easy": 4, "hard6": 6, "hard8": 8}
    assert set(document["learned_exit"]) == {"easy", "hard6", "hard8"}  # the preset trains an exit gate
    assert (out / "pointer_chasing.png").stat().st_size > 0
    assert (out / "pointer_chasing" / "train" / "checkpoints" / "latest").exists()
    assert "The plot shows exact match" in printed and document["summary"] in printed
    assert "smoke run of the text path" in printed and "validation loss on held-out shards" in printed
    assert (out / "text" / "shards" / "validation" / "manifest.json").exists()
    # the same --out with other settings is refused before anything is trained
    assert rdp(argv[:4] + ["4"] + argv[5:]) == 2
    assert "other settings (steps)" in capsys.readouterr().err


def test_demo_reports_the_learned_exit_only_for_a_model_with_an_exit_gate(tmp_path, capsys):
    printed, document = run_demo(tiny_demo(tmp_path / "demo", 0), capsys)
    exits = document["learned_exit"]
    assert set(exits) == {"easy", "hard6", "hard8"}
    for split, entry in exits.items():
        assert entry["cap"] == 32 and entry["q"] == 0.5
        assert 1 <= entry["mean_steps"] <= 32
        assert 0 <= entry["exact_match"] <= 1 and entry["exact_match"] * 8 == round(entry["exact_match"] * 8)
    assert "With its learned exit" in document["summary"] and document["summary"] in printed
    assert "smoke run of the text path" not in printed
    printed, document = run_demo(tiny_demo(tmp_path / "plain", 0, "model.exit_gate=false", "objective.loss=last"), capsys)
    assert "learned_exit" not in document
    assert "With its learned exit" not in printed
