"""`rdp eval` says what it measured: every result names the checkpoint step and a sha256 of
its weights, a sweep never reuses results of other weights, custom lm-eval tasks come from
--include_path or a YAML path, and an unknown task name fails before anything is loaded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rdp.evals.testing import publish_step, weights_sha256
from rdp.launch.cli import main as rdp

EVAL = ["--depths", "1,2", "--reasoning-examples", "4", "--no-progress"]


@pytest.fixture
def run_dir(tmp_path):
    from rdp.evals.testing import write_tiny_tokenizer

    run = tmp_path / "run"
    publish_step(run, 1, seed=0)
    write_tiny_tokenizer(run / "tokenizer.json")
    return run


def test_results_name_their_weights_and_are_never_reused_for_other_weights(run_dir, capsys):
    assert rdp(["eval", str(run_dir), "--tasks", "parity", *EVAL]) == 0
    first = run_dir / "eval" / "step_00000001" / "results.json"  # the default --out names the step
    document = json.loads(first.read_text())
    step1 = weights_sha256(run_dir / "checkpoints" / "step_00000001")
    assert (document["step"], document["weights_sha256"]) == (1, step1)
    assert document["checkpoint_dir"] == str((run_dir / "checkpoints" / "step_00000001").resolve())
    for per_depth in document["results"].values():
        assert {(e["step"], e["weights_sha256"]) for e in per_depth.values()} == {(1, step1)}
    before = first.read_bytes()

    # the run trains on: the same command measures the new checkpoint, into its own folder
    step2 = weights_sha256(publish_step(run_dir, 2, seed=1))
    assert step2 != step1
    capsys.readouterr()
    assert rdp(["eval", str(run_dir), "--tasks", "parity", *EVAL, "--out", str(first.parent)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"(step 1, weights sha256 {step1[:12]})" in error[0]
    assert f"step 2, weights sha256 {step2[:12]}" in error[0] and "never reused" in error[0]
    assert first.read_bytes() == before
    assert rdp(["eval", str(run_dir), "--tasks", "parity", *EVAL]) == 0
    second = json.loads((run_dir / "eval" / "step_00000002" / "results.json").read_text())
    assert (second["step"], second["weights_sha256"]) == (2, step2)
    # an eval array task pinned to other weights refuses to run
    capsys.readouterr()
    assert rdp(["eval", str(run_dir), "--tasks", "parity", *EVAL, "--weights-sha256", step1,
                "--out", str(run_dir / "pinned")]) == 2
    assert "not the ones this job was submitted for" in capsys.readouterr().err
    assert not (run_dir / "pinned" / "results.json").exists()


def test_unknown_task_fails_in_one_line_before_loading_anything(run_dir, capsys, monkeypatch):
    from rdp.evals import lm_adapter, tokenizer

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the task names were checked")

    monkeypatch.setattr(lm_adapter, "load_checkpoint", must_not_load)
    monkeypatch.setattr(tokenizer, "load_eval_tokenizer", must_not_load)
    out = run_dir / "typo"
    assert rdp(["eval", str(run_dir), "--tasks", "parity,hellaswagg_typo", *EVAL, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"rdp eval: error: unknown task 'hellaswagg_typo': not an lm-eval task, a task YAML file, "
                     f"humaneval or a reasoning task (see `lm_eval ls tasks`)"]
    assert rdp(["eval", str(run_dir), "--tasks", str(run_dir / "missing.yaml"), *EVAL, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"rdp eval: error: task file {run_dir / 'missing.yaml'}: no such file"
    assert not out.exists()


def write_custom_task(directory: Path) -> Path:
    """A two-question multiple-choice task on local rows: an lm-eval task YAML of the user's own."""
    directory.mkdir(parents=True)
    rows = [{"question": "Tom has 3 apples and buys 4 more. How many?", "choices": ["7", "12"], "answer": 0},
            {"question": "A box holds 6 pens. How many pens are in 2 boxes?", "choices": ["6", "12"], "answer": 1}]
    (directory / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = directory / "tiny_choice.yaml"
    path.write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'rows.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return path


def test_custom_tasks_from_include_path_or_yaml_path(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task_file = write_custom_task(tmp_path / "my_tasks")
    by_dir, by_file = tmp_path / "by_dir", tmp_path / "by_file"
    assert rdp(["eval", str(run_dir), "--tasks", "tiny_choice", "--include_path", str(task_file.parent),
                *EVAL, "--out", str(by_dir)]) == 0
    assert rdp(["eval", str(run_dir), "--tasks", str(task_file), *EVAL, "--out", str(by_file)]) == 0
    results = [json.loads((out / "results.json").read_text())["results"] for out in (by_dir, by_file)]
    assert list(results[0]) == list(results[1]) == ["tiny_choice"]
    for depth in ("1", "2"):
        entries = [r["tiny_choice"][depth] for r in results]
        assert entries[0]["metric"] == "acc,none" and entries[0]["score"] in (0.0, 0.5, 1.0)
        assert entries[0]["score"] == entries[1]["score"]
