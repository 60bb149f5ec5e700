"""Compile every Triton kernel for a GPU architecture without a GPU.

The interpreter checks semantics on the CPU but compiles nothing; this drives each real
launcher (the same tile sizes, warps and stages a GPU run would use) at the huginn-3.5B
shapes, captures the kernel launches instead of running them, and compiles each through
Triton's own pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas). It
catches what only the GPU compiler rejects (tile shapes tl.dot cannot take, type errors
in non-interpreted code paths, register/shared-memory blow-ups) and prints the shared
memory and spills of each kernel.

    .venv/bin/python -m rdp.kernels.aot_check              # sm_90 (H100), bf16 and fp32
    .venv/bin/python -m rdp.kernels.aot_check --arch 80 --dtypes bf16
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernels.aot_check compiles for a GPU: run it without TRITON_INTERPRET=1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rdp.kernels import triton_attention, triton_linear, triton_norm, triton_pointwise

MODULES = (triton_attention, triton_linear, triton_norm, triton_pointwise)
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                 torch.int64: "*i64", torch.int32: "*i32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
# opt-in shared memory per block; a kernel over it compiles but fails at launch
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` records the call."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((self.fn, args, meta))


@contextmanager
def recording():
    calls: list = []
    patches = [mock.patch.object(module, name, _Recorder(obj, calls))
               for module in MODULES for name, obj in vars(module).items()
               if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")]
    props = SimpleNamespace(multi_processor_count=132)
    patches.append(mock.patch.object(torch.cuda, "get_device_properties", lambda *_: props))
    for p in patches:
        p.start()
    try:
        yield calls
    finally:
        for p in patches:
            p.stop()


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2 ** 31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def compile_call(fn, args, meta, target: GPUTarget):
    names = fn.arg_names
    constexprs = {k: v for k, v in meta.items() if k not in LAUNCH_OPTIONS}
    signature = {}
    positional = iter(args)
    for name in names:
        signature[name] = "constexpr" if name in constexprs else _arg_type(next(positional))
    options = {k: v for k, v in meta.items() if k in LAUNCH_OPTIONS}
    return triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)


def launches(dtype: torch.dtype):
    """Drive every launcher, forward and backward, at the 3.5B shapes on meta-sized CPU
    tensors (only shapes, strides and dtypes reach the recorded launches)."""
    b, s, h, heads, inter, vocab = 1, 4096, 5280, 55, 17920, 65536
    d = h // heads

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt)

    with recording() as calls:
        q, k, v = (t(b, heads, s, d) for _ in range(3))
        out, lse = triton_attention.attention_forward(q, k, v, causal=True)
        triton_attention.attention_backward(q, k, v, out, lse, t(b, heads, s, d), causal=True)
        triton_attention.attention_forward(t(b, heads, 1, d), k, v, causal=True)  # decode
        x = t(b * s, h)
        for update in (None, t(b * s, h)):
            y, z, rstd = triton_norm._forward(x, update, t(h), 1e-6, save=True)
            triton_norm._backward(t(b * s, h), z, t(h), rstd, [dtype] * (1 if update is None else 2), True)
        fused = t(b * s, 2 * inter)
        triton_pointwise._silu_mul_forward(fused)
        triton_pointwise.SiluMul.backward(SimpleNamespace(saved_tensors=(fused,)), t(b * s, inter))
        qkv = t(b, s, 3, heads, d)
        cos_sin = t(s, d // 2, 2, dt=torch.float32)
        triton_pointwise._rope_forward(qkv[:, :, 0], qkv[:, :, 1], t(2, 1, heads, d), cos_sin)
        ctx = SimpleNamespace(saved_tensors=(cos_sin,), has_bias=False, dtypes=(dtype, dtype),
                              needs_input_grad=(True, True, False, False))
        triton_pointwise.BiasRope.backward(ctx, t(b, s, heads, d), t(b, s, heads, d))
        w = t(h, 2 * h)
        triton_linear._gemm(x, w[:, :h], x, w[:, h:])
        triton_linear._gemm(x, w[:, h:], out_dtype=torch.float32)
        triton_linear._gemm(x, w[:, :h], init=t(b * s, h, dt=torch.float32))
        logits = t(1024, vocab, dt=torch.float32)
        triton_linear._cross_entropy_rows(logits, t(1024, dt=torch.int64), -100, write_grad=True)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description="compile every Triton kernel for a GPU arch, no GPU needed")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dtype_name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        seen = set()
        for fn, call_args, meta in launches(dtype):
            key = (fn.__name__, tuple(_arg_type(a) for a in call_args), tuple(sorted(meta.items())))
            if key in seen or args.only not in fn.__name__:
                continue
            seen.add(key)
            label = f"sm_{args.arch} {dtype_name:4s} {fn.__name__:30s} " + " ".join(
                f"{k}={v}" for k, v in meta.items() if k.startswith(("BLOCK", "ROWS", "num_")))
            start = time.perf_counter()
            try:
                compiled = compile_call(fn, call_args, meta, target)
            except Exception as exc:  # report every kernel, then fail
                failures += 1
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}")
                continue
            shared, limit = compiled.metadata.shared, SHARED_LIMIT.get(args.arch, 101376)
            status = "ok  " if shared <= limit else "FAIL"
            failures += shared > limit
            print(f"{status} {label}  shared={shared}B (limit {limit})  ({time.perf_counter() - start:.1f}s)")
    if failures:
        sys.exit(f"{failures} kernel(s) failed to compile")


if __name__ == "__main__":
    main()
