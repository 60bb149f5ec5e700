"""Flash attention in Triton (FlashAttention-2 style): tiled, online softmax in fp32, the
S x S score matrix never exists in memory. Forward saves only the output and the per-row
log-sum-exp; backward recomputes the probabilities block by block (one kernel for dK/dV
over key blocks, one for dQ over query blocks, so there are no atomics and the result is
deterministic).

Shapes follow SDPA: q (B, H, Sq, D), k and v (B, H, Sk, D). The causal mask is aligned
bottom-right (query i sees keys j <= i + Sk - Sq), which is the decode case of a KV cache
and reduces to the usual mask when Sq == Sk. Any head dim up to 256 works; the head-dim
block is padded to the next power of two (96 -> 128) and masked.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rdp.kernels._triton_utils import INTERPRET, check_dtype, dot, dot_upcast, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_block(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                    start_n, seq_k, causal_offset, qk_scale, d_mask,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                    UPCAST: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = d_mask[None, :]
    if MASKED:
        kv_mask = kv_mask & (offs_n[:, None] < seq_k)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    s = dot(q, tl.trans(k), UPCAST) * qk_scale  # log2 domain
    if MASKED:
        valid = offs_n[None, :] < seq_k
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows that have seen no key yet keep m = -inf; guard the rescale against -inf - -inf
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                     num_heads, seq_q, seq_k, head_dim, qk_scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # batch * head offsets can pass 2**31
    b, h = bh // num_heads, bh % num_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    m_mask = offs_m < seq_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    causal_offset = seq_k - seq_q
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M + causal_offset)
        full_end = (tl.minimum(start_m + causal_offset + 1, seq_k) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_k
        full_end = (seq_k // BLOCK_N) * BLOCK_N
    full_end = tl.maximum(full_end, 0)
    # key blocks every query row of this block sees entirely: no mask work
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attn_fwd_block(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                        offs_m, offs_d, start_n, seq_k, causal_offset, qk_scale,
                                        d_mask, BLOCK_N, CAUSAL, False, UPCAST)
    # the diagonal and the ragged tail
    for start_n in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attn_fwd_block(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                        offs_m, offs_d, start_n, seq_k, causal_offset, qk_scale,
                                        d_mask, BLOCK_N, CAUSAL, True, UPCAST)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + bh * seq_q + offs_m, m_i + tl.math.log2(l_safe), mask=m_mask)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh,
                           stride_dom, num_heads, seq_q, head_dim,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # batch * head offsets can pass 2**31
    b, h = bh // num_heads, bh % num_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                          num_heads, seq_q, seq_k, head_dim, qk_scale, sm_scale,
                          CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)  # batch * head offsets can pass 2**31
    b, h = bh // num_heads, bh % num_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    n_mask = offs_n < seq_k
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    causal_offset = seq_k - seq_q
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        # the first query row that sees key start_n is start_n - causal_offset
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, seq_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seq_q
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :],
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(LSE + bh * seq_q + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + bh * seq_q + offs_m, mask=m_mask, other=0.0)
        s = dot(q, tl.trans(k), UPCAST) * qk_scale
        valid = m_mask[:, None] & n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dv += dot(tl.trans(p.to(do.dtype)), do, UPCAST)
        dp = dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dk += dot(tl.trans(ds.to(q.dtype)), q, UPCAST)
    # DK, DV are contiguous (B, H, Sk, D)
    out_off = bh * seq_k * head_dim + offs_n[:, None] * head_dim + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                        num_heads, seq_q, seq_k, head_dim, qk_scale, sm_scale,
                        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # batch * head offsets can pass 2**31
    b, h = bh // num_heads, bh % num_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    m_mask = offs_m < seq_q
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * seq_q + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(DELTA + bh * seq_q + offs_m, mask=m_mask, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    causal_offset = seq_k - seq_q
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M + causal_offset)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_k
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = dot(q, tl.trans(k), UPCAST) * qk_scale
        valid = m_mask[:, None] & n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, UPCAST)
    tl.store(DQ + bh * seq_q * head_dim + offs_m[:, None] * head_dim + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _launch_config(head_dim: int, seq_q: int, dtype: torch.dtype) -> dict:
    """Tile sizes. The interpreter runs each program through numpy, so small tiles there
    keep the tests exercising several blocks and ragged tails on tiny shapes. fp32 tiles
    are halved: twice the bytes per element would overflow shared memory."""
    if INTERPRET:
        return dict(fwd=(16, 16, {}), bwd=(16, 16, {}))
    block_m = 16 if seq_q <= 16 else (64 if seq_q <= 64 else 128)  # decode: few query rows
    big_d = next_pow2(head_dim) > 64
    warps = 8 if big_d else 4
    if dtype == torch.float32:
        return dict(fwd=(min(block_m, 64), 32, dict(num_warps=warps, num_stages=2)),
                    bwd=(min(block_m, 32), 32, dict(num_warps=warps, num_stages=1)))
    fwd = (block_m, 64, dict(num_warps=warps, num_stages=3 if big_d else 4))
    bwd = (min(block_m, 64), 64, dict(num_warps=warps, num_stages=2))
    return dict(fwd=fwd, bwd=bwd)


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))  # tl.dot needs every tile dim >= 16


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be (batch, heads, seq, head_dim), got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if q.shape[-1] > 256:
        raise ValueError(f"flash_attention: head_dim {q.shape[-1]} > 256 is not supported")
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"flash_attention: causal with more queries ({q.shape[-2]}) than keys "
                         f"({k.shape[-2]}) leaves queries with nothing to attend to")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(q, k, v, causal: bool):
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch * heads, seq_q, dtype=torch.float32, device=q.device)
    block_m, block_n, opts = _launch_config(head_dim, seq_q, q.dtype)["fwd"]
    sm_scale = 1.0 / math.sqrt(head_dim)
    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    _attn_fwd_kernel[grid](q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                           heads, seq_q, seq_k, head_dim, sm_scale * LOG2E,
                           CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
                           UPCAST=dot_upcast(q.dtype), **opts)
    return out, lse


def attention_backward(q, k, v, out, lse, grad_out, causal: bool):
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    grad_out = _unit_last(grad_out)
    block_m, block_n, opts = _launch_config(head_dim, seq_q, q.dtype)["bwd"]
    block_d = _block_d(head_dim)
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(seq_q, block_m), batch * heads)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, seq_q, head_dim,
        BLOCK_M=block_m, BLOCK_D=block_d)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    sm_scale = 1.0 / math.sqrt(head_dim)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
              heads, seq_q, seq_k, head_dim, sm_scale * LOG2E, sm_scale)
    meta = dict(CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                UPCAST=dot_upcast(q.dtype), **opts)
    _attn_bwd_dkdv_kernel[(triton.cdiv(seq_k, block_n), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, *common, **meta)
    _attn_bwd_dq_kernel[(triton.cdiv(seq_q, block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, *common, **meta)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal):
        out, lse = attention_forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, grad_out, ctx.causal)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """SDPA semantics (default 1/sqrt(D) scale, bottom-right causal mask when Sq < Sk)."""
    _check_inputs(q, k, v, causal)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttention.apply(q, k, v, causal)
    return attention_forward(q, k, v, causal)[0]
