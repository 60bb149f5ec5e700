"""Picks the implementation of each fused op: Triton where it can run, the PyTorch
reference elsewhere. The model reaches kernels only through `get_ops`."""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from kernels import reference

OP_NAMES = ("rms_norm", "add_rms_norm", "silu_mul", "bias_rope", "attention", "injection",
            "linear_cross_entropy")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(choice: str) -> str:
    if choice == "auto":
        return "triton" if torch.cuda.is_available() and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("model.kernels=triton needs a CUDA device or TRITON_INTERPRET=1 on CPU")
    if choice not in ("torch", "triton"):
        raise ValueError(f"model.kernels must be auto, triton or torch, got {choice!r}")
    return choice


def get_ops(choice: str = "auto") -> SimpleNamespace:
    backend = resolve_backend(choice)
    if backend == "torch":
        impl = reference
    else:
        from kernels import triton_ops as impl  # imported lazily: Triton is heavy to import
    ops = {name: getattr(impl, name, getattr(reference, name)) for name in OP_NAMES}
    return SimpleNamespace(backend=backend, **ops)
