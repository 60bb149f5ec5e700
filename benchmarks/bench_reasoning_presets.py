"""How the choice of reasoning preset was made: trains pointer chasing (chains <= 4) through
the real trainer once per variant of configs/reasoning.yaml, then scores exact match at every
depth 1..32 (one pass, deterministic state) on the trained difficulty and the two harder
splits, and prints depth 1, the best depth, depth 32 and their ratio per split; a variant that
trains an exit gate is also scored with the learned exit (q = --exit-threshold, capped at 32
steps): exact match, its ratio to the best depth and the mean steps per scored position. Every
variant also gets the state's relative change at the last iteration, ||s_32 - s_31|| / ||s_31||
averaged over positions (0 = settled at a fixed point; objective.fixed_point_weight).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_reasoning_presets.py --runs runs/presets \\
        base= mean12-curriculum=model.mean_recurrence=12,objective.curriculum_steps=2000

Each variant is NAME=OVERRIDE,OVERRIDE,... (empty: the preset as it is). Runs resume
(train.resume=auto), so an interrupted variant continues where its last checkpoint left it;
its scores go to RUNS/NAME.json. The train time printed is wall time since this start (a
resumed run counts only the rest), with the load average beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEPTHS = list(range(1, 33))


def state_change(model, task, split: str, examples: int, seed: int) -> float:
    """Mean over positions of ||s_D - s_{D-1}|| / ||s_{D-1}|| at the deepest depth D, from the
    deterministic initial state."""
    import torch

    batch = task.batch(split, 0, examples, seed)
    with torch.no_grad():
        cos_sin = model.cos_sin[:batch.inputs.shape[1]]
        embedded = model.encode(batch.inputs, cos_sin)  # embedding and prelude
        state = model.initial_state(embedded, 0.0)
        for step in range(DEPTHS[-1]):
            state, previous = model.core_step(state, embedded, cos_sin, step=step), state
        return float(((state - previous).norm(dim=-1) / previous.norm(dim=-1)).mean())


def run_variant(name: str, overrides: list[str], runs: Path, examples: int, seed: int, exit_threshold: float) -> dict:
    from rdp.data_pipeline.tasks import load_task
    from rdp.evals.lm_adapter import load_checkpoint
    from rdp.evals.reasoning import score_split_depths
    from rdp.pretrain.task_sizing import load_task_config
    from rdp.pretrain.train import train

    run_dir = runs / name
    config = load_task_config("reasoning", [f"train.run_dir={run_dir}", "train.resume=auto", "train.eval_depths=[]",
                                            *overrides])
    started, cpu = time.perf_counter(), time.process_time()
    train(config, progress=False)
    result = {"overrides": overrides, "train_seconds": time.perf_counter() - started,
              "train_cpu_seconds": time.process_time() - cpu, "load_average": os.getloadavg()[1]}
    model = load_checkpoint(run_dir, "cpu", "float32")
    task = load_task(config.data.source.split(":", 1)[1])
    for split in task.test_splits():
        scores = score_split_depths(model, task, split, DEPTHS, examples, 256, seed=seed)
        result[split] = {str(d): s["exact_match"] for d, s in scores.items()}
        result.setdefault("state_change", {})[split] = state_change(model, task, split, min(examples, 256), seed)
        if config.model.exit_gate:
            learned = score_split_depths(model, task, split, [DEPTHS[-1]], examples, 256, seed=seed,
                                         exit_threshold=exit_threshold)[DEPTHS[-1]]
            result[f"{split} learned exit"] = {"q": exit_threshold, "cap": DEPTHS[-1],
                                               "exact_match": learned["exact_match"],
                                               "mean_steps": learned["mean_steps"]}
    (runs / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def summary(name: str, result: dict) -> str:
    parts = []
    for split, curve in result.items():
        if not isinstance(curve, dict) or split.endswith(" learned exit") or split == "state_change":
            continue
        best = max(curve, key=lambda d: (curve[d], -int(d)))
        ratio = curve["32"] / curve[best] if curve[best] else 0.0
        part = f"{split}: d1 {curve['1']:.2f} best {curve[best]:.2f}@{best} d32 {curve['32']:.2f} ({ratio:.2f})"
        learned = result.get(f"{split} learned exit")
        if learned:
            part += (f" exit {learned['exact_match']:.3f} ({learned['exact_match'] / curve[best] if curve[best] else 0:.2f},"
                     f" {learned['mean_steps']:.1f} steps)")
        parts.append(part + f" change@32 {result['state_change'][split]:.3f}")
    return (f"{name} ({' '.join(result['overrides']) or 'preset'}; train {result['train_seconds']:.0f} s wall, "
            f"{result['train_cpu_seconds']:.0f} s CPU, load {result['load_average']:.1f})\n    " + " | ".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=OVERRIDES")
    parser.add_argument("--runs", default="runs/presets")
    parser.add_argument("--examples", type=int, default=512, help="held-out examples per (split, depth)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out examples")
    parser.add_argument("--exit-threshold", type=float, default=0.5,
                        help="q of the learned exit, for variants with an exit gate (the demo's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        name, _, overrides = variant.partition("=")
        result = run_variant(name, [o for o in overrides.split(",") if o], runs, args.examples, args.seed,
                             args.exit_threshold)
        print(summary(name, result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
