"""Small helpers shared by the Triton kernels."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides interpret mode when it is imported; we read the same variable once.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def dot_upcast(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot computes bf16 through numpy, which has no bf16, and returns
    garbage; products of bf16 are exact in fp32, so upcasting the operands there keeps the
    kernel's semantics (bf16 inputs, fp32 accumulation) without touching the GPU path."""
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. fp32 operands use IEEE products (torch's default for
    fp32 matmuls), not TF32; UPCAST is dot_upcast() for the interpreter."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


def triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: Triton kernels take fp32/fp16/bf16 tensors, got {t.dtype}")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N) with a unit stride on the last dim (a view when possible)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])
