"""`rdp eval` depth sweeps and the `rdp reasoning` command, end to end on tiny artefacts."""
from __future__ import annotations

import json

import pytest

from rdp.evals.testing import write_gsm8k_jsonl, write_tiny_checkpoint
from rdp.launch.cli import main as rdp


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("evals_sweep") / "ckpt")


def test_sweep_writes_json_table_plot_and_resumes(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "sweep"
    argv = ["eval", str(checkpoint), "--tasks", "gsm8k,humaneval,parity", "--depths", "1,2", "--out", str(out),
            "--gsm8k-path", str(write_gsm8k_jsonl(tmp_path / "gsm8k")), "--limit", "1", "--num-fewshot", "1",
            "--max-gen-toks", "6", "--reasoning-examples", "8", "--no-progress"]
    assert rdp(argv) == 0
    document = json.loads((out / "results.json").read_text())
    rows = ["gsm8k", "humaneval", "parity/easy", "parity/hard32", "parity/hard64"]
    assert list(document["results"]) == rows
    for row in rows:
        assert set(document["results"][row]) == {"1", "2"}
        for depth, entry in document["results"][row].items():
            assert 0.0 <= entry["score"] <= 1.0 and entry["mean_steps"] == float(depth)
    assert document["results"]["gsm8k"]["1"]["metric"] == "exact_match,flexible-extract"
    assert document["results"]["humaneval"]["1"]["metric"] == "pass@1"
    table = (out / "results.md").read_text()
    assert "| task | metric | r=1 | r=2 |" in table and "| parity/hard64 |" in table and " ± " in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()

    # a rerun with one more depth computes only the missing pairs
    before = (out / "results.json").read_text()
    assert rdp(argv[:5] + ["1,2,4"] + argv[6:]) == 0
    printed = capsys.readouterr().out
    assert "resuming, 10 of 15" in printed
    after = json.loads((out / "results.json").read_text())
    assert after["results"]["gsm8k"]["1"] == json.loads(before)["results"]["gsm8k"]["1"]
    assert set(after["results"]["parity/easy"]) == {"1", "2", "4"}
    # other settings must not be mixed into the same results
    assert rdp(argv + ["--init-scale", "1.0"]) == 2


def test_reasoning_command_trains_on_a_task_directory_and_sweeps_every_split(tmp_path, capsys):
    """`rdp reasoning DIR`: sized from the task, trained through the normal trainer, every
    test split swept; then `rdp eval --tasks DIR` scores the same checkpoint."""
    task = tmp_path / "copy"
    task.mkdir()
    rows = {"train": [([1, 2, 3], [-100, 2, 3], 1), ([4, 5], [-100, 5], 1)],
            "short": [([1, 2], [-100, 2], 1), ([6, 7], [-100, 7], 1)],
            "long": [([1, 2, 3, 4, 5], [-100, 2, 3, 4, 5], 2), ([8, 9, 10], [-100, -100, 10], 3)]}
    for split, lines in rows.items():
        (task / f"{split}.jsonl").write_text("".join(json.dumps({"input": x, "labels": y, "difficulty": d}) + "\n"
                                                     for x, y, d in lines))
    out = tmp_path / "run"
    assert rdp(["reasoning", str(task), "--steps", "2", "--depths", "1,2", "--out", str(out), "--no-progress",
                "train.micro_batch_size=4", "train.eval_every=1", "train.eval_depths=[1,2]"]) == 0
    assert (out / "train" / "checkpoints" / "latest").exists()
    config = (out / "train" / "config.yaml").read_text()
    assert "vocab_size: 11" in config and "seq_len: 5" in config
    document = json.loads((out / "eval" / "results.json").read_text())
    assert set(document["results"]) == {"copy/short", "copy/long"}
    entry = document["results"]["copy/long"]["2"]
    assert set(entry["all"]) == {"exact_match", "position_accuracy", "accuracy_by_difficulty", "examples", "loss"}
    assert set(entry["all"]["accuracy_by_difficulty"]) == {"2", "3"} and entry["all"]["examples"] == 2
    assert (out / "eval" / "results.png").exists() and "copy/long" in (out / "eval" / "results.md").read_text()
    # validation during training: each step, every test split at every eval depth
    records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [set(r["validation"]) for r in records] == [{"short", "long"}] * 2
    assert set(records[-1]["validation"]["long"]) == {"1", "2"}
    capsys.readouterr()
    assert rdp(["eval", str(out / "train"), "--tasks", str(task), "--depths", "2", "--out", str(tmp_path / "ev"),
                "--no-progress"]) == 0
    again = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]["copy/long"]["2"]
    assert again["all"] == entry["all"]
    # a directory without a test split cannot be swept
    (tmp_path / "only_train").mkdir()
    (tmp_path / "only_train" / "train.jsonl").write_text((task / "train.jsonl").read_text())
    assert rdp(["reasoning", str(tmp_path / "only_train"), "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "missing test split" in capsys.readouterr().err


def test_harness_cli_takes_lm_eval_flags(checkpoint, tmp_path, monkeypatch, capsys):
    from rdp.evals.gsm8k import write_local_tasks
    from rdp.evals.harness import main as harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_local_tasks(write_gsm8k_jsonl(tmp_path / "gsm8k"), tmp_path / "tasks")
    harness(["--model", "rdp", "--model_args", f"checkpoint={checkpoint},num_steps=2,exit_criterion=latent-diff,"
             "exit_threshold=0.3", "--tasks", "gsm8k_local", "--include_path", str(tmp_path / "tasks"),
             "--limit", "1", "--num_fewshot", "1", "--gen_kwargs", "max_gen_toks=4", "--batch_size", "1",
             "--output_path", str(tmp_path / "out"), "--local_tasks_only"])
    printed = capsys.readouterr().out
    assert "gsm8k_local" in printed and "exact_match" in printed
    assert "rdp: num_steps=2 exit=latent-diff mean recurrence steps per token:" in printed
    assert list((tmp_path / "out").rglob("results_*.json"))
