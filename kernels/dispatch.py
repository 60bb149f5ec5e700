"""Picks the implementation of each fused op: Triton where it can run, the PyTorch
reference elsewhere. The model reaches kernels only through `get_ops`."""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from rdp.kernels import reference

OP_NAMES = ("rms_norm", "add_rms_norm", "silu_mul", "bias_rope", "attention", "injection",
            "injection_embedding", "injection_with_embedding", "linear_cross_entropy")


# Ops whose compiled Triton kernels a GPU run of scripts/gpu_check.sh has shown correct (fwd + bwd,
# bf16) and faster than the PyTorch path. `model.kernels=auto` uses Triton on CUDA for these only;
# empty until such a report exists, so a first run on a GPU takes the PyTorch path (SDPA, torch ops).
VALIDATED_TRITON_OPS: frozenset[str] = frozenset()


class KernelBackendError(RuntimeError):
    """A kernel backend this machine cannot run; `rdp` prints it as one line."""

    user_facing = True


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
    """torch, triton, or (auto on CUDA with some ops validated) mixed."""
    if choice == "auto":
        if not (VALIDATED_TRITON_OPS and torch.cuda.is_available() and triton_available()):
            return "torch"
        return "triton" if VALIDATED_TRITON_OPS >= set(OP_NAMES) else "mixed"
    if choice not in ("torch", "triton"):
        raise ValueError(f"model.kernels must be auto, triton or torch, got {choice!r}")
    if choice == "triton" and not triton_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            raise KernelBackendError("model.kernels=triton: the triton package is not installed") from None
        raise KernelBackendError("model.kernels=triton: no CUDA GPU is visible on this machine (and TRITON_INTERPRET=1, "
                                 "the CPU interpreter, is not set); use model.kernels=auto or torch here")
    return choice


def get_ops(choice: str = "auto") -> SimpleNamespace:
    backend = resolve_backend(choice)
    if backend == "torch":
        ops = {name: getattr(reference, name) for name in OP_NAMES}
    else:
        from rdp.kernels import triton_ops  # imported lazily: Triton is heavy to import

        use_triton = set(OP_NAMES) if backend == "triton" else VALIDATED_TRITON_OPS
        ops = {name: getattr(triton_ops if name in use_triton else reference, name) for name in OP_NAMES}
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
