"""Host memory of building a tensor-parallel model, per rank, against its local shard.

Each of TP CPU ranks (gloo, torchrun) builds CONFIG with `build_parallel_model` the way the
trainer does: on the meta device, then only its own shard allocated and initialised
(pretrain/init_weights.py). Per rank it prints the bytes of its local shard, the peak
resident memory the build added (VmHWM after the build minus VmRSS before it, with the
peak reset by /proc/self/clear_refs), their ratio, and the target: shard + largest single
full tensor + 1 GiB. `--full` measures the same for building the full model on the CPU
first and keeping a shard (what every rank did before), side by side; use it only on a
config whose full model fits in memory TP times.

    .venv/bin/python benchmarks/bench_build_memory.py                     # huginn-3.5b, TP=5 (~16 GB)
    .venv/bin/python benchmarks/bench_build_memory.py --config small --tp 2 --full \
        model.hidden_size=2048 model.intermediate_size=8192 model.vocab_size=32768      # 0.34B, side by side

huginn-3.5b's 55 heads admit TP 1, 5, 11, 55: TP=5 is the smallest split across ranks.
Check `free -g` first: all ranks together hold the whole model once (14.3 GB in fp32) plus
about 0.5 GB of libraries per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def measure(build) -> dict:
    import gc

    gc.collect()
    before = status_kib("VmRSS") * 1024
    reset_peak()
    started = time.perf_counter()
    model = build()
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM") * 1024
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"added_bytes": peak - before, "shard_bytes": shard, "seconds": seconds}


def worker(config_name: str, tp: int, full: bool, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from rdp.launch.distributed import init_distributed
    from rdp.pretrain.config import load_config
    from rdp.pretrain.model import build_model
    from rdp.pretrain.parallel import build_parallel_model, local_state_dict

    torch.set_num_threads(1)
    cfg = load_config(config_name, overrides).model
    ctx = init_distributed(tp, "gloo")
    largest = max(p.numel() * 4 for p in build_model(cfg, device="meta").parameters())
    rows = {"meta": measure(lambda: build_parallel_model(cfg, seed=0))}
    if full:
        def full_then_shard():
            state = local_state_dict(build_model(cfg, "cpu", seed=0))
            return build_parallel_model(cfg, seed=0, full_state=state)
        rows["full"] = measure(full_then_shard)
    gathered = [None] * ctx.world_size
    dist.gather_object({"rank": ctx.rank, "largest": largest, **rows}, gathered if ctx.is_main else None, dst=0)
    if ctx.is_main:
        print(json.dumps(gathered))


def report(results: list[dict], config_name: str, tp: int) -> None:
    print(f"{config_name} at TP={tp} on {tp} CPU ranks (gloo); bytes in GiB")
    print(f"{'rank':>4} {'how':>5} {'shard':>8} {'added peak':>11} {'peak/shard':>11} {'target':>8} {'ok':>4} {'seconds':>8}")
    for row in results:
        target = row["meta"]["shard_bytes"] + row["largest"] + GIB
        for how in ("meta", "full"):
            if how not in row:
                continue
            m = row[how]
            print(f"{row['rank']:>4} {how:>5} {m['shard_bytes'] / GIB:>8.2f} {m['added_bytes'] / GIB:>11.2f} "
                  f"{m['added_bytes'] / m['shard_bytes']:>11.2f} {target / GIB:>8.2f} "
                  f"{'yes' if m['added_bytes'] <= target else 'NO':>4} {m['seconds']:>8.1f}")
    print("target = shard + largest single full tensor "
          f"({results[0]['largest'] / GIB:.2f} GiB) + 1 GiB; 'full' = full model built first (the old way)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="huginn-3.5b")
    parser.add_argument("--tp", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="also measure building the full model first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.hidden_size=2048")
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.tp, args.full, args.overrides)
        return
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.tp),
               __file__, "--worker", "--config", args.config, "--tp", str(args.tp),
               *(["--full"] if args.full else []), *args.overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("[{")]
    if done.returncode != 0 or not lines:
        sys.exit(f"benchmark failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report(json.loads(lines[-1]), " ".join([args.config, *args.overrides]), args.tp)


if __name__ == "__main__":
    main()
