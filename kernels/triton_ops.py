"""The Triton backend of kernels.dispatch: one name per op of kernels.reference, same
signatures and semantics, each a Triton kernel with an autograd wrapper.

Import this module only where Triton can run (a CUDA device, or TRITON_INTERPRET=1 set
before the first `import triton` for the CPU interpreter). A call whose tensors Triton
cannot reach (CPU tensors without the interpreter, e.g. a CPU model on a GPU machine under
model.kernels=auto) runs the reference instead of failing inside Triton.
"""
from __future__ import annotations

import functools

import torch

from rdp.kernels import reference
from rdp.kernels._triton_utils import INTERPRET
from rdp.kernels import triton_attention, triton_linear, triton_norm, triton_pointwise


def _on_triton_device(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu")


def _with_fallback(triton_fn, reference_fn):
    @functools.wraps(triton_fn)
    def op(first: torch.Tensor, *args, **kwargs):
        if _on_triton_device(first):
            return triton_fn(first, *args, **kwargs)
        return reference_fn(first, *args, **kwargs)
    op.triton_impl = triton_fn
    return op


flash_attention = _with_fallback(triton_attention.flash_attention, reference.attention)
attention = flash_attention
rms_norm = _with_fallback(triton_norm.rms_norm, reference.rms_norm)
add_rms_norm = _with_fallback(triton_norm.add_rms_norm, reference.add_rms_norm)
silu_mul = _with_fallback(triton_pointwise.silu_mul, reference.silu_mul)
bias_rope = _with_fallback(triton_pointwise.bias_rope, reference.bias_rope)
injection = _with_fallback(triton_linear.injection, reference.injection)
injection_embedding = _with_fallback(triton_linear.injection_embedding, reference.injection_embedding)
injection_with_embedding = _with_fallback(triton_linear.injection_with_embedding, reference.injection_with_embedding)
linear_cross_entropy = _with_fallback(triton_linear.linear_cross_entropy, reference.linear_cross_entropy)

__all__ = ["rms_norm", "add_rms_norm", "silu_mul", "bias_rope", "attention", "flash_attention",
           "injection", "injection_embedding", "injection_with_embedding", "linear_cross_entropy"]
