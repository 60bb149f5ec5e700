"""`rdp demo` end to end with a tiny step count (the full demo's figures come from
benchmarks/bench_demo.py, not from a test)."""
from __future__ import annotations

import json

from rdp.launch.cli import main as rdp


def test_demo_trains_sweeps_plots_and_runs_the_text_smoke_path(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "3", "--examples", "8", "--text-steps", "2", "--no-progress",
            "train.micro_batch_size=8", "train.eval_every=0"]
    assert rdp(argv) == 0
    printed = capsys.readouterr().out
    document = json.loads((out / "pointer_chasing.json").read_text())
    assert set(document["exact_match"]) == {"easy", "hard6", "hard8"}
    assert all(set(curve) == {str(d) for d in range(1, 33)} for curve in document["exact_match"].values())
    assert document["difficulty"] == {"easy": 4, "hard6": 6, "hard8": 8}
    assert (out / "pointer_chasing.png").stat().st_size > 0
    assert (out / "pointer_chasing" / "train" / "checkpoints" / "latest").exists()
    assert "The plot shows exact match" in printed and document["summary"] in printed
    assert "smoke run of the text path" in printed and "validation loss on held-out shards" in printed
    assert (out / "text" / "shards" / "validation" / "manifest.json").exists()
    # the same --out with other settings is refused before anything is trained
    assert rdp(argv[:4] + ["4"] + argv[5:]) == 2
    assert "other settings (steps)" in capsys.readouterr().err
