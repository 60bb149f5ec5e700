"""Fused kernels for the recurrent-depth model, each with a PyTorch reference."""
from kernels.dispatch import get_ops, resolve_backend, triton_available

__all__ = ["get_ops", "resolve_backend", "triton_available"]
