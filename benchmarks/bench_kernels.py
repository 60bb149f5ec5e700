"""Kernel benchmarks, measured side by side in one run (prints ratios, asserts nothing).

On a GPU, at the huginn-3.5B shapes (h=5280, 55 heads x 96, seq 4096, MLP 17920, vocab
65536, bf16), each Triton kernel is timed against the PyTorch eager reference
(kernels/reference.py), against torch.compile of that reference, and attention also
against torch.nn.functional.scaled_dot_product_attention. Printed per row: time, speed-up
over each baseline, achieved TFLOP/s (matmul-shaped ops) or GB/s (memory-bound ops), and the
fraction of the device's peak: dense bf16 TFLOP/s from pretrain.flops, and for bandwidth the
device-to-device copy bandwidth measured in this same run (the practical ceiling).

Without a GPU the script runs the same rows on tiny shapes through Triton's CPU interpreter
(TRITON_INTERPRET=1) so that every code path is exercised; those numbers are labelled and
say nothing about GPU performance.

    .venv/bin/python benchmarks/bench_kernels.py                 # GPU if present, else CPU tiny
    .venv/bin/python benchmarks/bench_kernels.py --batch 2 --no-compile --only attention,rms_norm
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

# decided before torch/triton are imported: the interpreter is read at import time
_HAS_GPU = os.path.exists("/dev/nvidia0") or os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")
if "--cpu" in sys.argv or not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import torch  # noqa: E402

from rdp.kernels import reference as R  # noqa: E402
from rdp.pretrain.flops import device_peak_flops  # noqa: E402


@dataclass
class Shapes:
    batch: int
    seq: int
    hidden: int
    heads: int
    inter: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


HUGINN_35B = Shapes(batch=1, seq=4096, hidden=5280, heads=55, inter=17920, vocab=65536)
CPU_TINY = Shapes(batch=1, seq=40, hidden=96, heads=1, inter=80, vocab=300)


def timer(device: str, reps: int) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: CUDA-event timing via triton.testing.do_bench on a GPU (it also
    flushes L2 between calls); wall clock over a few calls on the CPU."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=max(reps, 20)) / 1e3

    def cpu_time(fn):
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps

    return cpu_time


def copy_bandwidth(device: str, measure) -> float:
    """Bytes/s of a plain device copy (read + write), the practical memory ceiling."""
    numel = (512 * 2 ** 20) // 2 if device == "cuda" else 2 ** 20
    src = torch.empty(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / measure(lambda: dst.copy_(src))


def peak_extra_memory(device: str, fn: Callable[[], object]) -> float:
    """MiB allocated by one call above what was live before it (CUDA only): shows e.g.
    that chunked cross-entropy never holds tokens x vocab fp32 logits."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A closure that runs fn forward and backward with a fixed output gradient."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]

    def run():
        for t in inputs:
            t.grad = None
        res = fn(*inputs)
        torch.autograd.backward(res if isinstance(res, tuple) else (res,), grads)

    return run


def forward_only(fn: Callable, inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn(*inputs)
    return run


def rows(shapes: Shapes, dtype: torch.dtype, device: str, T):
    """(name, mode, work, unit, {impl: callable}) for every benchmarked op; work is FLOPs or
    bytes moved by one call, the minimum any implementation must do."""
    s, b, h = shapes, torch.tensor([], dtype=dtype).element_size(), shapes.hidden

    def rand(*shape, grad=True, scale=1.0):
        return (scale * torch.randn(*shape, device=device, dtype=torch.float32)).to(dtype).requires_grad_(grad)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def eager_attention(q, k, v):  # materialises the S x S scores, as unfused code does
        scores = (q @ k.transpose(-1, -2)).float() / s.head_dim ** 0.5
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype) @ v

    qkv = [rand(s.batch, s.heads, s.seq, s.head_dim) for _ in range(3)]
    attn_flops = 4 * s.batch * s.heads * s.seq * s.seq * s.head_dim / 2  # causal: half the square
    yield "attention", "fwd", attn_flops, "flop", dict(
        triton=forward_only(lambda q, k, v: T.attention(q, k, v, causal=True), qkv), sdpa=forward_only(sdpa, qkv),
        eager=forward_only(eager_attention, qkv))
    yield "attention", "fwd+bwd", 3.5 * attn_flops, "flop", dict(
        triton=fwd_bwd(lambda q, k, v: T.attention(q, k, v, causal=True), qkv), sdpa=fwd_bwd(sdpa, qkv),
        eager=fwd_bwd(eager_attention, qkv))

    x, f, w = rand(s.tokens, h), rand(s.tokens, h), rand(h, scale=0.1)
    norm_bytes = 2 * s.tokens * h * b
    yield "rms_norm", "fwd", norm_bytes, "byte", dict(
        triton=forward_only(lambda x, w: T.rms_norm(x, w, 1e-6), [x, w]),
        eager=forward_only(lambda x, w: R.rms_norm(x, w, 1e-6), [x, w]),
        compile=("compile", lambda x, w: R.rms_norm(x, w, 1e-6), [x, w], "fwd"))
    yield "rms_norm", "fwd+bwd", norm_bytes * 3, "byte", dict(
        triton=fwd_bwd(lambda x, w: T.rms_norm(x, w, 1e-6), [x, w]),
        eager=fwd_bwd(lambda x, w: R.rms_norm(x, w, 1e-6), [x, w]),
        compile=("compile", lambda x, w: R.rms_norm(x, w, 1e-6), [x, w], "fwd+bwd"))
    yield "add_rms_norm", "fwd", 2 * norm_bytes, "byte", dict(
        triton=forward_only(lambda x, f, w: T.add_rms_norm(x, f, w, 1e-6), [x, f, w]),
        eager=forward_only(lambda x, f, w: R.add_rms_norm(x, f, w, 1e-6), [x, f, w]),
        compile=("compile", lambda x, f, w: R.add_rms_norm(x, f, w, 1e-6), [x, f, w], "fwd"))
    yield "add_rms_norm", "fwd+bwd", 2 * norm_bytes + 4 * s.tokens * h * b, "byte", dict(
        triton=fwd_bwd(lambda x, f, w: T.add_rms_norm(x, f, w, 1e-6), [x, f, w]),
        eager=fwd_bwd(lambda x, f, w: R.add_rms_norm(x, f, w, 1e-6), [x, f, w]),
        compile=("compile", lambda x, f, w: R.add_rms_norm(x, f, w, 1e-6), [x, f, w], "fwd+bwd"))

    fused = rand(s.tokens, 2 * s.inter)
    silu_bytes = 3 * s.tokens * s.inter * b
    yield "silu_mul", "fwd", silu_bytes, "byte", dict(
        triton=forward_only(T.silu_mul, [fused]), eager=forward_only(R.silu_mul, [fused]),
        compile=("compile", R.silu_mul, [fused], "fwd"))
    yield "silu_mul", "fwd+bwd", silu_bytes + 5 * s.tokens * s.inter * b, "byte", dict(
        triton=fwd_bwd(T.silu_mul, [fused]), eager=fwd_bwd(R.silu_mul, [fused]),
        compile=("compile", R.silu_mul, [fused], "fwd+bwd"))

    wqkv = rand(s.batch, s.seq, 3, s.heads, s.head_dim)
    bias = rand(2, 1, s.heads, s.head_dim, scale=0.1)
    cos_sin = R.rope_cos_sin(s.head_dim, s.seq, 50000.0, device=device)

    def rope(impl):
        return lambda qkv, bias: impl.bias_rope(qkv[:, :, 0], qkv[:, :, 1], bias, cos_sin)

    yield "bias_rope", "fwd", 4 * s.tokens * h * b, "byte", dict(
        triton=forward_only(rope(T), [wqkv, bias]), eager=forward_only(rope(R), [wqkv, bias]),
        compile=("compile", rope(R), [wqkv, bias], "fwd"))

    state, emb, adapter = rand(s.batch, s.seq, h), rand(s.batch, s.seq, h), rand(h, 2 * h, scale=0.02)
    inj_flops = 2 * s.tokens * h * 2 * h
    with torch.no_grad():
        projected = T.injection_embedding(emb, adapter)
    yield "injection", "fwd", inj_flops, "flop", dict(
        triton=forward_only(T.injection, [state, emb, adapter]),
        eager=forward_only(R.injection, [state, emb, adapter]),
        triton_reused_e=forward_only(lambda s_, p_, w_: T.injection_with_embedding(s_, p_, w_), [state, projected, adapter]))

    xh, head = rand(s.tokens, h), rand(s.vocab, h, scale=0.02)
    labels = torch.randint(0, s.vocab, (s.tokens,), device=device)
    yield "linear_cross_entropy", "fwd+bwd", 3 * 2 * s.tokens * s.vocab * h, "flop", dict(
        triton=fwd_bwd(lambda x, w: T.linear_cross_entropy(x, w, labels), [xh, head]),
        eager=fwd_bwd(lambda x, w: R.linear_cross_entropy(x, w, labels), [xh, head]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="force the CPU interpreter run on tiny shapes")
    parser.add_argument("--batch", type=int, default=1, help="sequences per call at the 3.5B shapes")
    parser.add_argument("--reps", type=int, default=0, help="timed calls (default: 100 on GPU, 1 on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--only", default="", help="comma-separated op names")
    parser.add_argument("--json", default="", help="also write every timing to this file (scripts/gpu_check.sh)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cuda":
        shapes, dtype = Shapes(**{**HUGINN_35B.__dict__, "batch": args.batch}), torch.bfloat16
        label = f"{torch.cuda.get_device_name()}, huginn-3.5B shapes, bf16"
    else:
        shapes, dtype = CPU_TINY, torch.float32
        label = ("CPU, Triton INTERPRETER, tiny shapes, fp32 -- exercises the code paths only; "
                 "these timings say NOTHING about GPU performance")
        args.no_compile = True  # inductor's CPU backend compiles C++ for minutes on a tiny op
    import rdp.kernels.triton_ops as T

    measure = timer(device, args.reps or (100 if device == "cuda" else 1))
    bandwidth = copy_bandwidth(device, measure)
    peak_flops = device_peak_flops() if device == "cuda" else None
    print(f"# bench_kernels: {label}")
    print(f"# shapes: {shapes}  torch {torch.__version__}  date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s; peak dense bf16: "
          f"{peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else
          f"# measured copy bandwidth: {bandwidth / 1e9:.2f} GB/s; peak FLOP/s: unknown for this device")
    header = (f"{'op':22s} {'mode':8s} {'impl':16s} {'time':>11s} {'rate':>16s} {'of peak':>8s} "
              f"{'peak MiB':>9s}  speed-up of triton")
    print(header)
    print("-" * len(header))
    wanted = set(filter(None, args.only.split(",")))
    records = []
    for name, mode, work, unit, impls in rows(shapes, dtype, device, T):
        if wanted and name not in wanted:
            continue
        timings: dict[str, Optional[float]] = {}
        extra_mib: dict[str, float] = {}
        for impl, fn in impls.items():
            if isinstance(fn, tuple):  # ("compile", eager fn, inputs, mode): built lazily
                if args.no_compile:
                    continue
                _, eager_fn, inputs, how = fn
                compiled = torch.compile(eager_fn)
                fn = forward_only(compiled, inputs) if how == "fwd" else fwd_bwd(compiled, inputs)
            try:
                timings[impl] = measure(fn)
                extra_mib[impl] = peak_extra_memory(device, fn)
            except torch.OutOfMemoryError:
                timings[impl] = None
                torch.cuda.empty_cache()
        base = timings.get("triton")
        records += [dict(op=name, mode=mode, impl=impl, seconds=seconds, work=work, unit=unit)
                    for impl, seconds in timings.items()]
        for impl, seconds in timings.items():
            if seconds is None:
                print(f"{name:22s} {mode:8s} {impl:16s} {'OOM':>11s}")
                continue
            rate = work / seconds
            if unit == "flop":
                rate_s, frac = f"{rate / 1e12:9.2f} TFLOP/s", (rate / peak_flops if peak_flops else None)
            else:
                rate_s, frac = f"{rate / 1e9:10.1f} GB/s", rate / bandwidth
            frac_s = f"{100 * frac:7.1f}%" if frac is not None else f"{'-':>8s}"
            ratio = f"{seconds / base:6.2f}x" if base and impl != "triton" else ""
            mem = f"{extra_mib[impl]:9.0f}" if device == "cuda" else f"{'-':>9s}"
            print(f"{name:22s} {mode:8s} {impl:16s} {seconds * 1e3:8.3f} ms {rate_s:>16s} {frac_s} {mem}  {ratio}")
    print("# 'of peak': TFLOP/s rows vs the dense bf16 peak; GB/s rows vs the copy bandwidth above "
          "(bytes = the minimum the op must read + write).")
    print("# speed-up of triton = baseline time / triton time (> 1: Triton is faster); "
          "peak MiB = memory one call allocates above what was live before it.")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=label, dtype=str(dtype), shapes=shapes.__dict__,
                                                   rows=records), indent=1))


if __name__ == "__main__":
    main()
