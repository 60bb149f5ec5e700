"""Elementwise kernels of the block, forward and backward in Triton:

- silu_mul: silu(gate) * up read straight from the fused fc output [gate | up]; the backward
  writes the fused gradient [d_gate | d_up] in one buffer, never two separate halves.
- bias_rope: q/k bias add and the interleaved-pair rotary embedding (fp32) for q and k in
  one pass; the backward rotates the gradient back and sums the bias gradient.

Rounding follows kernels.reference step by step (silu rounded to the input dtype before the
product; biased q/k rounded before the fp32 rotation) so the outputs match it bit for bit
up to the transcendental functions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rdp.kernels._triton_utils import INTERPRET, check_dtype, next_pow2, rows_view


# ---- silu(gate) * up ---------------------------------------------------------------------
@triton.jit
def _silu_mul_fwd_kernel(FUSED, OUT, stride_in, stride_out, n_rows, n_cols,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    gate_ptr = FUSED + rows[:, None] * stride_in + cols[None, :]
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + n_cols, mask=mask, other=0.0)
    silu = (gate * tl.sigmoid(gate)).to(up.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(FUSED, DOUT, DFUSED, stride_in, stride_dout, stride_din, n_rows, n_cols,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    gate_ptr = FUSED + rows[:, None] * stride_in + cols[None, :]
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + n_cols, mask=mask, other=0.0)
    dout = tl.load(DOUT + rows[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = dout * up.to(tl.float32) * sig * (1.0 + gate * (1.0 - sig))
    d_up = dout * silu.to(up.dtype).to(tl.float32)
    d_ptr = DFUSED + rows[:, None] * stride_din + cols[None, :]
    tl.store(d_ptr, d_gate.to(DFUSED.dtype.element_ty), mask=mask)
    tl.store(d_ptr + n_cols, d_up.to(DFUSED.dtype.element_ty), mask=mask)


def _tiles(n_rows: int, n_cols: int) -> tuple[int, int, tuple[int, int]]:
    """(rows, cols) per program and the grid; the interpreter pays per program, so it
    takes many rows at once, a GPU one row and 1024 columns (4 warps, 8 elements each)."""
    block = min(next_pow2(n_cols), 1024)
    rows = max(1, min(next_pow2(n_rows), 8192 // block)) if INTERPRET else 1
    return rows, block, (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block))


def _silu_mul_forward(fused: torch.Tensor) -> torch.Tensor:
    check_dtype("fused", fused)
    if fused.shape[-1] % 2:
        raise ValueError(f"silu_mul: the fused [gate | up] dim must be even, got {fused.shape[-1]}")
    x = rows_view(fused)
    n_cols = x.shape[1] // 2
    out = torch.empty(x.shape[0], n_cols, dtype=fused.dtype, device=fused.device)
    if x.shape[0]:
        rows, block, grid = _tiles(x.shape[0], n_cols)
        _silu_mul_fwd_kernel[grid](x, out, x.stride(0), out.stride(0), x.shape[0], n_cols,
                                   ROWS=rows, BLOCK=block, num_warps=1 if INTERPRET else 4)
    return out.view(*fused.shape[:-1], n_cols)


class SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fused):
        ctx.save_for_backward(fused)
        return _silu_mul_forward(fused)

    @staticmethod
    def backward(ctx, grad_out):
        (fused,) = ctx.saved_tensors
        x = rows_view(fused)
        dout = rows_view(grad_out)
        n_cols = x.shape[1] // 2
        dfused = torch.empty(x.shape, dtype=fused.dtype, device=fused.device)
        if x.shape[0]:
            rows, block, grid = _tiles(x.shape[0], n_cols)
            _silu_mul_bwd_kernel[grid](x, dout, dfused, x.stride(0), dout.stride(0), dfused.stride(0),
                                       x.shape[0], n_cols, ROWS=rows, BLOCK=block,
                                       num_warps=1 if INTERPRET else 4)
        return dfused.view(fused.shape)


def silu_mul(fused: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and fused.requires_grad:
        return SiluMul.apply(fused)
    return _silu_mul_forward(fused)


# ---- q/k bias + interleaved RoPE ---------------------------------------------------------
@triton.jit
def _rope_fwd_kernel(Q, K, BIAS, CS, QO, KO, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                     stride_kh, stride_cs, n_rows, seq, heads, half_dim,
                     HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # a "row" is one (batch, position, head): half_dim interleaved pairs
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = r % heads
    s = (r // heads) % seq
    b = r // (heads * seq)
    p = tl.arange(0, BLOCK_P)
    mask = (r[:, None] < n_rows) & (p[None, :] < half_dim)
    cs = CS + s[:, None] * stride_cs + p[None, :] * 2
    cos = tl.load(cs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cs + 1, mask=mask, other=0.0).to(tl.float32)
    out = r[:, None] * (2 * half_dim) + p[None, :] * 2  # outputs are contiguous (B, S, H, D)
    for which in tl.static_range(2):
        if which == 0:
            src = Q + (b * stride_qb + s * stride_qs + h * stride_qh)[:, None] + p[None, :] * 2
            dst = QO
        else:
            src = K + (b * stride_kb + s * stride_ks + h * stride_kh)[:, None] + p[None, :] * 2
            dst = KO
        x0 = tl.load(src, mask=mask, other=0.0)
        x1 = tl.load(src + 1, mask=mask, other=0.0)
        if HAS_BIAS:
            bias = BIAS + which * heads * 2 * half_dim + h[:, None] * (2 * half_dim) + p[None, :] * 2
            # q + bias rounds to q's dtype before the fp32 rotation, as in the reference
            x0 = (x0.to(tl.float32) + tl.load(bias, mask=mask, other=0.0).to(tl.float32)).to(x0.dtype)
            x1 = (x1.to(tl.float32) + tl.load(bias + 1, mask=mask, other=0.0).to(tl.float32)).to(x1.dtype)
        x0 = x0.to(tl.float32)
        x1 = x1.to(tl.float32)
        tl.store(dst + out, (x0 * cos - x1 * sin).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + out + 1, (x1 * cos + x0 * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_bwd_kernel(DQO, DKO, CS, DQ, DK, n_rows, seq, heads, half_dim, stride_cs,
                     BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # the rotation is orthogonal: its gradient is the inverse rotation; all buffers contiguous
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    s = (r // heads) % seq
    p = tl.arange(0, BLOCK_P)
    mask = (r[:, None] < n_rows) & (p[None, :] < half_dim)
    cs = CS + s[:, None] * stride_cs + p[None, :] * 2
    cos = tl.load(cs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cs + 1, mask=mask, other=0.0).to(tl.float32)
    off = r[:, None] * (2 * half_dim) + p[None, :] * 2
    for which in tl.static_range(2):
        if which == 0:
            src = DQO
            dst = DQ
        else:
            src = DKO
            dst = DK
        g0 = tl.load(src + off, mask=mask, other=0.0).to(tl.float32)
        g1 = tl.load(src + off + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + off, (g0 * cos + g1 * sin).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + off + 1, (g1 * cos - g0 * sin).to(dst.dtype.element_ty), mask=mask)


def _rope_blocks(n_rows: int, half_dim: int) -> tuple[int, int]:
    block_p = next_pow2(half_dim)
    budget = 8192 if INTERPRET else 2048
    return max(1, min(next_pow2(n_rows), budget // block_p)), block_p


def _check_rope(q, k, qk_bias, cos_sin):
    for name, t in (("q", q), ("k", k)):
        check_dtype(name, t)
        if t.dim() != 4 or t.stride(-1) != 1:
            raise ValueError(f"bias_rope: {name} must be (batch, seq, heads, head_dim) with unit last stride")
    if q.shape != k.shape:
        raise ValueError(f"bias_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    batch, seq, heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"bias_rope: head_dim must be even for interleaved pairs, got {head_dim}")
    if cos_sin.shape != (seq, head_dim // 2, 2):
        raise ValueError(f"bias_rope: cos_sin must be ({seq}, {head_dim // 2}, 2), got {tuple(cos_sin.shape)}")
    if qk_bias is not None and qk_bias.shape != (2, 1, heads, head_dim):
        raise ValueError(f"bias_rope: qk_bias must be (2, 1, {heads}, {head_dim}), got {tuple(qk_bias.shape)}")


def _rope_forward(q, k, qk_bias, cos_sin):
    batch, seq, heads, head_dim = q.shape
    cos_sin = cos_sin if cos_sin.stride(-1) == 1 and cos_sin.stride(-2) == 2 else cos_sin.contiguous()
    bias = qk_bias.contiguous() if qk_bias is not None else cos_sin
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    n_rows = batch * seq * heads
    block_r, block_p = _rope_blocks(n_rows, head_dim // 2)
    if n_rows:
        _rope_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
            q, k, bias, cos_sin, q_out, k_out, q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2), cos_sin.stride(0), n_rows, seq, heads, head_dim // 2,
            HAS_BIAS=qk_bias is not None, BLOCK_R=block_r, BLOCK_P=block_p,
            num_warps=1 if INTERPRET else 4)
    return q_out, k_out


class BiasRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, qk_bias, cos_sin):
        ctx.save_for_backward(cos_sin)
        ctx.has_bias = qk_bias is not None
        ctx.bias_dtype = qk_bias.dtype if qk_bias is not None else None
        ctx.dtypes = (q.dtype, k.dtype)
        return _rope_forward(q, k, qk_bias, cos_sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        (cos_sin,) = ctx.saved_tensors
        grad_q, grad_k = grad_q.contiguous(), grad_k.contiguous()
        batch, seq, heads, head_dim = grad_q.shape
        cos_sin = cos_sin.contiguous()
        dq = torch.empty(grad_q.shape, dtype=ctx.dtypes[0], device=grad_q.device)
        dk = torch.empty(grad_k.shape, dtype=ctx.dtypes[1], device=grad_k.device)
        n_rows = batch * seq * heads
        block_r, block_p = _rope_blocks(n_rows, head_dim // 2)
        if n_rows:
            _rope_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
                grad_q, grad_k, cos_sin, dq, dk, n_rows, seq, heads, head_dim // 2, cos_sin.stride(0),
                BLOCK_R=block_r, BLOCK_P=block_p, num_warps=1 if INTERPRET else 4)
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = torch.stack([dq.float().sum((0, 1)), dk.float().sum((0, 1))])[:, None].to(ctx.bias_dtype)
        return dq, dk, dbias, None


def bias_rope(q: torch.Tensor, k: torch.Tensor, qk_bias: torch.Tensor | None, cos_sin: torch.Tensor):
    """Same contract as kernels.reference.bias_rope; outputs are contiguous (B, S, H, D)."""
    _check_rope(q, k, qk_bias, cos_sin)
    tracked = (q, k) + ((qk_bias,) if qk_bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return BiasRope.apply(q, k, qk_bias, cos_sin)
    return _rope_forward(q, k, qk_bias, cos_sin)
