"""`rdp eval` depth sweeps and the `rdp reasoning` command, end to end on tiny artefacts."""
from __future__ import annotations

import json

import pytest

from rdp.evals.reasoning import TASKS, ReasoningStream, composition_table
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


def test_reasoning_tasks_are_exact_running_states():
    parity = TASKS["parity"]
    inputs, labels = parity.batch(seed=3, first_index=0, count=4, length=16)
    assert (labels == inputs.cumsum(-1) % 2).all()
    s3 = TASKS["s3"]
    table = composition_table(3)
    inputs, labels = s3.batch(seed=3, first_index=0, count=2, length=8)
    for row_in, row_out in zip(inputs.tolist(), labels.tolist()):
        state = row_in[0]
        for item, label in zip(row_in[1:], row_out[1:]):
            state = table[state, item]
            assert label == state
    inputs, labels = TASKS["squaring"].batch(seed=3, first_index=0, count=2, length=6)
    for r, row in zip(inputs[:, 0].tolist(), labels.tolist()):
        assert row == [pow(r, 2 ** (i + 1), 107) for i in range(6)]
    # the stream's position is global: two ranks together see what one rank sees
    one = ReasoningStream("s5", 8, 128, micro_batch_size=4, seed=1)
    ranks = [ReasoningStream("s5", 8, 128, micro_batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    whole = one.next_batch()[0]
    assert (whole[:2] == ranks[0].next_batch()[0]).all() and (whole[2:] == ranks[1].next_batch()[0]).all()
    assert ranks[0].state_dict()["position"] == one.state_dict()["position"] == 4


def test_reasoning_command_trains_with_the_normal_trainer_and_sweeps(tmp_path):
    out = tmp_path / "parity"
    assert rdp(["reasoning", "parity", "--steps", "2", "--depths", "1,2", "--examples", "8", "--out", str(out),
                "--no-progress", "train.micro_batch_size=4"]) == 0
    assert (out / "train" / "checkpoints" / "latest").exists()
    document = json.loads((out / "eval" / "results.json").read_text())
    assert set(document["results"]) == {"parity/easy", "parity/hard32", "parity/hard64"}
    assert (out / "eval" / "results.png").exists()


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
