"""The Triton backend of kernels.dispatch: one name per op of kernels.reference, same
signatures and semantics, each a Triton kernel with an autograd wrapper.

Import this module only where Triton can run (a CUDA device, or TRITON_INTERPRET=1 set
before the first `import triton` for the CPU interpreter).
"""
from __future__ import annotations

from kernels.triton_attention import flash_attention
from kernels.triton_linear import (injection, injection_embedding, injection_with_embedding,
                                   linear_cross_entropy)
from kernels.triton_norm import add_rms_norm, rms_norm
from kernels.triton_pointwise import bias_rope, silu_mul

attention = flash_attention

__all__ = ["rms_norm", "add_rms_norm", "silu_mul", "bias_rope", "attention", "flash_attention",
           "injection", "injection_embedding", "injection_with_embedding", "linear_cross_entropy"]
