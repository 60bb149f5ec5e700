"""HumanEval through the real sandbox: all 164 canonical solutions pass, known-wrong ones fail,
results say how samples ran, and `rdp eval` refuses to run generated code without a sandbox
unless --unsafe-no-sandbox is given (which the results then record)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from rdp.evals.humaneval import execute_completions, load_problems, pass_at_k, run_humaneval
from rdp.evals.sandbox import SandboxLimits, bubblewrap
from rdp.evals.testing import write_tiny_checkpoint
from rdp.launch.cli import main as rdp


class Answers:
    """Stands in for the model: answers each HumanEval prompt with a fixed completion."""

    def __init__(self, completions: dict[str, str]):
        self.completions = completions

    def generate_until(self, requests):
        return [self.completions[request.args[0]] for request in requests]


def test_all_canonical_solutions_pass_in_the_sandbox(tmp_path):
    problems = load_problems()
    assert len(problems) == 164
    lm = Answers({p["prompt"]: p["canonical_solution"] for p in problems})
    started = time.monotonic()
    scores = run_humaneval(lm, workers=8, samples_path=tmp_path / "samples.jsonl")
    print(f"164 canonical solutions in the sandbox, 8 workers: {time.monotonic() - started:.1f}s")
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    failed = [(s["task_id"], s["status"], s["stderr_tail"]) for s in samples if not s["passed"]]
    assert failed == [] and scores["pass@1"] == 1.0 and scores["num_problems"] == 164
    assert scores["execution"] == {**bubblewrap().record(), "limits": asdict(SandboxLimits())}
    assert scores["execution"]["sandbox"] == "bubblewrap" and not scores["execution"]["unsafe_no_sandbox"]


def test_known_wrong_solutions_fail():
    problems = {p["task_id"]: p for p in load_problems()}
    wrong = {"HumanEval/0": "    return False\n", "HumanEval/2": "    return number\n",
             "HumanEval/13": "    return a * b\n", "HumanEval/23": "    return len(string) - 1\n",
             "HumanEval/53": "    return x - y\n", "HumanEval/1": "    return paren_string.split()\n"}
    chosen = [problems[task] for task in wrong]
    outcomes = execute_completions(chosen, [[wrong[p["task_id"]]] for p in chosen], SandboxLimits(), bubblewrap(), 6)
    for problem, (outcome,) in zip(chosen, outcomes):
        assert not outcome["passed"] and outcome["status"] == "failed", (problem["task_id"], outcome)
        assert "AssertionError" in outcome["stderr_tail"], (problem["task_id"], outcome)


def test_rdp_eval_refuses_without_sandbox_unless_unsafe(tmp_path, monkeypatch, capsys):
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not os.path.exists(os.path.join(p, "bwrap"))))
    argv = ["eval", str(checkpoint), "--tasks", "parity,humaneval", "--depths", "1", "--out", str(tmp_path / "eval"),
            "--limit", "1", "--max-gen-toks", "2", "--reasoning-examples", "2", "--no-progress"]
    assert rdp(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("rdp eval: error: sandbox: `bwrap` not found on PATH")
    assert "--unsafe-no-sandbox" in error
    assert not (tmp_path / "eval" / "results.json").exists()  # nothing ran, not even parity

    assert rdp(argv + ["--unsafe-no-sandbox"]) == 0
    entry = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["humaneval"]["1"]
    assert {k: entry["all"]["execution"][k] for k in ("sandbox", "unsafe_no_sandbox")} == \
        {"sandbox": "none", "unsafe_no_sandbox": True}


def test_unbiased_pass_at_k():
    # n=5 samples, c=2 correct: pass@1 = 2/5, pass@2 = 1 - C(3,2)/C(5,2) = 0.7
    assert pass_at_k([5, 5], [2, 0], 1)[0] == pytest.approx(0.2)
    assert pass_at_k([5], [2], 2)[0] == pytest.approx(0.7)
    assert pass_at_k([5], [5], 5)[0] == 1.0


def test_many_samples_need_a_temperature():
    with pytest.raises(ValueError, match="temperature"):
        run_humaneval(SimpleNamespace(), num_samples=2, temperature=0.0)
