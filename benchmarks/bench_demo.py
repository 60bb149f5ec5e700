"""The main job's figures: runs `rdp demo` as a user would (a fresh output directory), times
it, and checks the pointer-chasing curves against the targets:

- on every harder split (never trained): exact match at depth 1 <= 0.05 and at the best
  depth >= 0.9 (the model needs its iterations, and they suffice);
- no overthinking: exact match at depth 32 within 5% of the best depth's (>= 0.95 x best),
  or, when the model has a learned exit, the learned exit (capped at 32) reaching the best
  accuracy (>= 0.95 x best) with fewer mean steps than the best fixed depth.

    .venv/bin/python benchmarks/bench_demo.py [--out DIR] [demo options, e.g. --steps 3000]

Prints the load average and the CPU time next to the wall time: on a shared machine the
wall time is not the idle-machine figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE_DEPTHS = ("1", "2", "3", "4", "5", "6", "7", "8", "10", "12", "16", "20", "24", "28", "32")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="demo output (default: a temporary directory, removed after)")
    args, demo_args = parser.parse_known_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rdp-demo-")) / "demo"
    if out.exists():
        parser.error(f"--out {out} exists; the benchmark times a fresh demo run")
    rdp = Path(sys.executable).with_name("rdp")
    command = [str(rdp), "demo", "--out", str(out), "--no-progress", *demo_args]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = usage.ru_utime + usage.ru_stime
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        return done.returncode
    document = json.loads((out / "pointer_chasing.json").read_text())
    curves, levels = document["exact_match"], document["difficulty"]
    exits = document.get("learned_exit", {})
    print(f"command: {' '.join(command[1:])}")
    print(f"rdp demo wall time: {seconds:.0f} s on {os.cpu_count()} CPUs (CPU time {cpu_seconds:.0f} s); load average "
          f"before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min), {load_after[1]:.1f} (5 min)")
    print(f"pointer chasing, exact match by test-time depth ({document['examples_per_point']} held-out examples "
          f"per point):")
    print("depth " + "".join(f"{s + ' (' + str(levels[s]) + ')':>14}" for s in curves))
    for depth in TABLE_DEPTHS:
        print(f"{depth:>5} " + "".join(f"{curves[s][depth]:>14.3f}" for s in curves))
    ok = True
    for split, per_depth in curves.items():
        best_depth = max(per_depth, key=lambda d: (per_depth[d], -int(d)))
        best, first, last = per_depth[best_depth], per_depth["1"], per_depth["32"]
        line = (f"{split} (longest chain {levels[split]}): depth 1 {first:.3f}, best {best:.3f} at depth {best_depth}, "
                f"depth 32 {last:.3f} ({of_best(last, best)} of best)")
        exit_ok = False
        if split in exits:
            em, steps = exits[split]["exact_match"], exits[split]["mean_steps"]
            exit_ok = em >= 0.95 * best and steps < int(best_depth)
            line += f"; learned exit {em:.3f} ({of_best(em, best)} of best) in {steps:.2f} mean steps"
        if split != "easy":
            checks = {"depth 1 <= 0.05": first <= 0.05, "best >= 0.9": best >= 0.9,
                      "depth 32 >= 0.95 x best": last >= 0.95 * best}
            if exits:
                checks["learned exit >= 0.95 x best in fewer mean steps than the best depth"] = exit_ok
            ok &= checks["depth 1 <= 0.05"] and checks["best >= 0.9"] and (checks["depth 32 >= 0.95 x best"] or exit_ok)
            line += "  " + ", ".join(f"{name}: {'met' if met else 'MISSED'}" for name, met in checks.items())
        print(line)
    print(f"targets {'met' if ok else 'NOT met'}" + (" (no overthinking: depth 32 within 5% of the best, or the "
                                                      "learned exit)" if exits else ""))
    for line in done.stdout.splitlines():
        if line.startswith(("text smoke run", "  depth", "rdp demo: done")):
            print(line)
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0


def of_best(value: float, best: float) -> str:
    """value / best cut (not rounded) to 3 decimals, so a ratio just under a 0.95 target
    never prints as 0.950."""
    ratio = value / best if best else 0.0
    return f"{math.floor(ratio * 1000) / 1000:.3f}"


if __name__ == "__main__":
    sys.exit(main())
