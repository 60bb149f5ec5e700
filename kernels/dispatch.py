"""Picks the implementation of each fused op: Triton where it can run, the PyTorch
reference elsewhere. The model reaches kernels only through `get_ops`."""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from rdp.kernels import reference

OP_NAMES = ("rms_norm", "add_rms_norm", "silu_mul", "bias_rope", "attention", "injection",
            "injection_embedding", "injection_with_embedding", "linear_cross_entropy")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take this tensor: a CUDA tensor, or a CPU tensor under the
    interpreter (TRITON_INTERPRET=1, which must be set before triton is first imported)."""
    if t.device.type == "cuda":
        return triton_available()
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and triton_available()


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
        from rdp.kernels import triton_ops as impl  # imported lazily: Triton is heavy to import
    ops = {name: getattr(impl, name, getattr(reference, name)) for name in OP_NAMES}
    return SimpleNamespace(backend=backend, **ops)


# ---- the two public, stable entry points ---------------------------------------------------
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on (batch, heads, seq, head_dim), SDPA semantics; with fewer
    queries than keys the causal mask is aligned bottom-right (the KV-cache decode case).
    Runs the Triton kernel whenever Triton can run on q's device, else the reference."""
    if triton_runs_on(q):
        from rdp.kernels.triton_attention import flash_attention as triton_flash_attention
        return triton_flash_attention(q, k, v, causal)
    return reference.attention(q, k, v, causal)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight with fp32 statistics; Triton whenever it can run on x's device."""
    if triton_runs_on(x):
        from rdp.kernels.triton_norm import rms_norm as triton_rms_norm
        return triton_rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)
