"""Plain PyTorch references for every kernel. They define the semantics the Triton
kernels must match, and they are what runs wherever Triton cannot."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in fp32, result back in the input dtype, then the learnable scale
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def add_rms_norm(x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The sandwich step: norm(x + update)."""
    return rms_norm(x + update, weight, eps)


def silu_mul(fused: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused fc output laid out as [gate | up]."""
    gate, up = fused.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_cos_sin(head_dim: int, seq_len: int, base: float, device=None) -> torch.Tensor:
    """(seq_len, head_dim // 2, 2) table of (cos, sin) for interleaved pairs, fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_real(t: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of t (batch, seq, heads, head_dim) in fp32:
    (even*cos - odd*sin, odd*cos + even*sin), back in t's dtype."""
    cos, sin = cos_sin[None, :, None, :, 0], cos_sin[None, :, None, :, 1]
    pairs = t.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2).type_as(t)


def rope_complex(t: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """rope_real as one complex multiply per pair (one kernel instead of eight elementwise ops
    and a stack, forward and backward): the same fp32 products and sums, bit for bit on CPU
    when head_dim / 2 fills whole SIMD vectors (8 pairs: every preset). In a shorter scalar tail
    the compiler may fuse a product and sum (FMA): one rounding apart."""
    rotation = torch.view_as_complex(cos_sin.float().contiguous())[None, :, None, :]
    pairs = t.float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs whole pairs in memory
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2).type_as(t)


def bias_rope(q: torch.Tensor, k: torch.Tensor, qk_bias: torch.Tensor | None, cos_sin: torch.Tensor):
    """Add the learned q/k bias, then rotate interleaved pairs (2i, 2i+1) in fp32.

    q, k: (batch, seq, heads, head_dim); qk_bias: (2, 1, heads, head_dim);
    cos_sin: (seq, head_dim // 2, 2) for the positions of q and k.
    """
    if qk_bias is not None:
        q = (q + qk_bias[0]).to(q.dtype)
        k = (k + qk_bias[1]).to(k.dtype)
    # eager: the complex form; traced by torch.compile: the real form, which Inductor fuses
    # (it generates no code for complex ops)
    rotate = rope_real if torch.compiler.is_compiling() else rope_complex
    return rotate(q, cos_sin), rotate(k, cos_sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (batch, heads, seq, head_dim); with fewer queries than
    keys the causal mask is aligned bottom-right (query i sees keys up to i + Sk - Sq)."""
    sq, sk = q.shape[-2], k.shape[-2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def injection(state: torch.Tensor, embedding: torch.Tensor, adapter_weight: torch.Tensor) -> torch.Tensor:
    """adapter(concat([state, embedding])) with the adapter a bias-free Linear(2h -> h)."""
    return F.linear(torch.cat([state, embedding], dim=-1), adapter_weight)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def injection_embedding(embedded: torch.Tensor, adapter_weight: torch.Tensor) -> torch.Tensor:
    """The embedding's half of the injection, e @ W_e^T (W = [W_s | W_e]), in fp32. The prelude
    output e is the same at every recurrence step, so this is computed once per forward."""
    hidden = embedded.shape[-1]
    return F.linear(_at_least_fp32(embedded), _at_least_fp32(adapter_weight[:, hidden:]))


def injection_with_embedding(state: torch.Tensor, projected: torch.Tensor, adapter_weight: torch.Tensor) -> torch.Tensor:
    """injection(state, e, W) given projected = injection_embedding(e, W): s @ W_s^T + P,
    summed in fp32 and rounded once to the state's dtype."""
    hidden = state.shape[-1]
    return (F.linear(_at_least_fp32(state), _at_least_fp32(adapter_weight[:, :hidden])) + projected).to(state.dtype)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy of fp32 logits x @ weight^T."""
    logits = F.linear(x, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=ignore_index)
