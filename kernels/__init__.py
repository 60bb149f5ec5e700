"""Fused kernels for the recurrent-depth model, each with a PyTorch reference.

Public and stable: `flash_attention(q, k, v, causal=True)` and `rms_norm(x, weight, eps)`
(Triton wherever it can run, else the reference); `get_ops(choice)` for the model."""
from rdp.kernels.dispatch import flash_attention, get_ops, resolve_backend, rms_norm, triton_available, triton_runs_on

__all__ = ["flash_attention", "rms_norm", "get_ops", "resolve_backend", "triton_available", "triton_runs_on"]
