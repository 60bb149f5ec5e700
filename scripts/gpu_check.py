"""The first thing to run on a GPU machine (scripts/gpu_check.sh calls this): one JSON report of

1. checks: the Triton kernels compiled on this GPU against the PyTorch references, forward and
   backward, fp32/fp16/bf16 (tests/kernels/interpreted_checks.py, without the interpreter);
2. timings: each kernel against SDPA / eager torch / torch.compile at the huginn-3.5b shapes,
   bf16 (benchmarks/bench_kernels.py);
3. train_step: training steps of the huginn-3.5b shape on the PyTorch path (bf16 autocast, fp32
   weights, fused AdamW, activation checkpointing) at (n, k) = (24, 8), with tokens/s and MFU;
   if the full model does not fit, fewer layers, said in the report (FLOPs are those of the
   model actually built);
4. verdicts: per op, correct (every check touching it passed) and faster (Triton beat every
   other implementation in every timed mode); `validated_ops` lists the ops with both.

`model.kernels=auto` uses Triton on CUDA exactly for the ops in `VALIDATED_TRITON_OPS`
(kernels/dispatch.py); a person copies `validated_ops` from a report there.

Without CUDA it refuses in one line: nothing here says anything about a GPU it did not run on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
OPS = ("rms_norm", "add_rms_norm", "silu_mul", "bias_rope", "attention", "injection",
       "injection_embedding", "injection_with_embedding", "linear_cross_entropy")
# which ops a check of tests/kernels/interpreted_checks.py exercises (by test function name)
CHECK_OPS = {
    "test_flash_attention": ("attention",),
    "test_rms_norm": ("rms_norm",),
    "test_add_rms_norm": ("add_rms_norm",),
    "test_silu_mul": ("silu_mul",),
    "test_bias_rope": ("bias_rope",),
    "test_injection_reused_embedding": ("injection_embedding", "injection_with_embedding"),
    "test_injection": ("injection",),
    "test_reference_injection_split": (),
    "test_linear_cross_entropy": ("linear_cross_entropy",),
    "test_public_entry_points": ("attention", "rms_norm"),
    # the model calls every op but the split injection (kernels/triton_linear.py, not wired in)
    "test_tiny_model": tuple(op for op in OPS if op not in ("injection_embedding", "injection_with_embedding")),
}
# bench_kernels rows: (op, impl) whose time stands for an op's Triton kernel
TIMED_AS = {("injection", "triton_reused_e"): "injection_with_embedding"}


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "run it on a GPU node -- nothing was checked or written", file=sys.stderr)
        sys.exit(2)


def ops_of_check(name: str) -> tuple[str, ...]:
    base = name.split("[")[0]
    for prefix, ops in sorted(CHECK_OPS.items(), key=lambda item: -len(item[0])):
        if base.startswith(prefix):
            return ops
    raise ValueError(f"gpu_check: check {name!r} maps to no op; add it to CHECK_OPS in scripts/gpu_check.py")


def parse_junit(path: Path) -> list[dict]:
    """One record per test case of a pytest --junitxml file: name, passed, message."""
    records = []
    for case in ET.parse(path).getroot().iter("testcase"):
        failure = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        records.append(dict(name=case.get("name"), passed=failure is None,
                            message=None if failure is None else f"{failure.tag}: {failure.get('message', '')}"[:500]))
    return records


def verdicts(checks: Optional[list[dict]], timings: Optional[list[dict]]) -> dict[str, dict]:
    """Per op: correct (checks ran, every one touching it passed), faster (Triton timed and
    faster than every other implementation in every mode it was timed in)."""
    result = {}
    for op in OPS:
        touching = [c for c in checks or [] if op in ops_of_check(c["name"])]
        correct = bool(touching) and all(c["passed"] for c in touching)
        speedups = []
        for mine in (r for r in timings or [] if _is_triton(r) and _op_of(r) == op):
            others = [r["seconds"] for r in timings if not _is_triton(r)
                      and (r["op"], r["mode"]) == (mine["op"], mine["mode"])]
            # a run that failed (OOM: None) counts as not faster
            speedups.append(min(others) / mine["seconds"] if mine["seconds"] and others and all(others) else 0.0)
        faster = bool(speedups) and min(speedups) > 1.0
        result[op] = dict(checks=len(touching), failed=sum(not c["passed"] for c in touching), correct=correct,
                          min_speedup=min(speedups) if speedups else None, faster=faster)
    return result


def _op_of(row: dict) -> str:
    return TIMED_AS.get((row["op"], row["impl"]), row["op"])


def _is_triton(row: dict) -> bool:
    return row["impl"].startswith("triton")


def train_step(preset: str, steps: int, n: int, k: int, layers: str, seq: Optional[int], device: str) -> dict:
    """Time `steps` optimizer steps (after one warm-up) of the preset's shape on the PyTorch path."""
    import torch

    from rdp.pretrain.config import load_config
    from rdp.pretrain.flops import FlopsModel, device_peak_flops
    from rdp.pretrain.model import build_model

    overrides = ["model.kernels=torch", "model.activation_checkpointing=true"]
    full = load_config(preset, overrides).model
    if layers == "reduced":
        overrides += ["model.prelude_layers=1", "model.core_layers=1", "model.coda_layers=1"]
    cfg = load_config(preset, overrides).model
    seq = seq or cfg.max_seq_len
    model = build_model(cfg, device=device, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def one_step():
        with autocast:
            loss = model(tokens[:, :-1], labels=tokens[:, 1:], num_steps=(n, k), return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    one_step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    losses = [one_step() for _ in range(steps)]
    seconds = (time.perf_counter() - started) / steps
    flops = FlopsModel.from_config(cfg, seq)
    peak = device_peak_flops() if device == "cuda" else None
    model_flops = flops.train(n, k) * seq / seconds
    record = dict(preset=preset, layers=dict(prelude=cfg.prelude_layers, core=cfg.core_layers, coda=cfg.coda_layers),
                  full_layers=dict(prelude=full.prelude_layers, core=full.core_layers, coda=full.coda_layers),
                  reduced=layers == "reduced", hidden_size=cfg.hidden_size, seq_len=seq, batch=1, num_steps=[n, k],
                  precision="bf16 autocast, fp32 weights, AdamW" + (" (fused)" if device == "cuda" else ""),
                  kernels="torch", activation_checkpointing=True, steps_timed=steps, seconds_per_step=seconds,
                  tokens_per_s=seq / seconds, model_flops_per_token=flops.train(n, k),
                  model_flops_per_s=model_flops, peak_flops=peak, mfu=model_flops / peak if peak else None,
                  losses=losses, device=torch.cuda.get_device_name() if device == "cuda" else device)
    if device == "cuda":
        record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return record


def run_part(command: list[str], timeout: int, log: Path) -> dict:
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with open(log, "w") as out:
        try:
            rc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return dict(command=" ".join(command), returncode=rc, seconds=time.perf_counter() - started, log=str(log))


def assemble(checks: Optional[list[dict]], timings: Optional[dict], train: Optional[dict], parts: dict,
             device: str) -> dict:
    table = verdicts(checks, (timings or {}).get("rows"))
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=device, parts=parts,
        checks=checks, timings=timings, train_step=train, verdicts=table,
        validated_ops=sorted(op for op, v in table.items() if v["correct"] and v["faster"]),
        rule="model.kernels=auto uses Triton on CUDA for the ops in kernels/dispatch.py VALIDATED_TRITON_OPS; "
             "copy validated_ops there")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for report.json and the logs "
                        "(default gpu_check/<date>)")
    parser.add_argument("--preset", default="huginn-3.5b")
    parser.add_argument("--layers", choices=("full", "reduced", "auto"), default="auto",
                        help="auto: all layers, fewer (1 + 1 + 1) if the full model runs out of memory")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-steps", default="24,8", help="(n, k) of the timed training steps")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: checks,timings,train")
    parser.add_argument("--checks-timeout", type=int, default=210)
    parser.add_argument("--timings-timeout", type=int, default=180)
    args = parser.parse_args(argv)
    require_cuda()
    import torch

    out = args.out or ROOT / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    python = sys.executable
    parts, checks, timings, train = {}, None, None, None

    def save() -> dict:  # after every part: a later part that fails or is killed keeps the earlier ones
        report = assemble(checks, timings, train, parts, torch.cuda.get_device_name())
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return report

    if "checks" not in skip:
        xml = out / "checks.xml"
        parts["checks"] = run_part([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                                    "tests/kernels/interpreted_checks.py"], args.checks_timeout, out / "checks.log")
        checks = parse_junit(xml) if xml.exists() else None
        save()
    if "timings" not in skip:
        path = out / "timings.json"
        parts["timings"] = run_part([python, "benchmarks/bench_kernels.py", "--json", str(path)],
                                    args.timings_timeout, out / "timings.log")
        timings = json.loads(path.read_text()) if path.exists() else None
        save()
    if "train" not in skip:
        n, k = (int(v) for v in args.num_steps.split(","))
        started = time.perf_counter()
        for layers in (["full", "reduced"] if args.layers == "auto" else [args.layers]):
            try:
                train = train_step(args.preset, args.steps, n, k, layers, args.seq, "cuda")
                break
            except torch.OutOfMemoryError as exc:
                parts.setdefault("train_oom", []).append(f"{layers}: {str(exc).splitlines()[0]}")
                torch.cuda.empty_cache()
        parts["train"] = dict(seconds=time.perf_counter() - started)
    report = save()
    print(f"gpu_check: wrote {out / 'report.json'}; validated_ops = {report['validated_ops']}")
    if train:
        print(f"gpu_check: train step {train['layers']} of {train['full_layers']}: "
              f"{train['tokens_per_s']:.0f} tokens/s, MFU {train['mfu'] if train['mfu'] is None else round(train['mfu'], 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
