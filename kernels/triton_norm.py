"""RMSNorm and the sandwich step norm(x + f) in Triton, forward and backward.

Semantics are kernels.reference.rms_norm exactly: statistics in fp32, the normalised value
rounded to the input dtype, then multiplied by the weight in the promoted dtype. A
program owns whole rows of the hidden dim (a row fits in registers up to 64k).
Forward saves the per-row 1/rms (fp32) and, for the fused add, the sum z = x + f (the
one tensor both norm and its backward need); backward accumulates dW per program in fp32
and sums the partials in one small reduction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rdp.kernels._triton_utils import INTERPRET, check_dtype, next_pow2, rows_view, triton_dtype


@triton.jit
def _rms_fwd_kernel(X, F, W, Y, Z, RSTD, stride_x, stride_f, stride_y, stride_z, n_rows, n_cols, eps,
                    HAS_F: tl.constexpr, SAVE: tl.constexpr, Z_DTYPE: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_F:
        f = tl.load(F + rows[:, None] * stride_f + cols[None, :], mask=mask, other=0.0)
        # the residual add rounds to the stream's dtype, as `x + f` does in torch
        x = (x.to(tl.float32) + f.to(tl.float32)).to(Z_DTYPE)
        if SAVE:
            tl.store(Z + rows[:, None] * stride_z + cols[None, :], x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 1) / n_cols + eps)
    normed = (x32 * rstd[:, None]).to(x.dtype)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_bwd_kernel(DY, Z, W, RSTD, DX, DX2, DW_PART, stride_dy, stride_z, stride_dx, stride_dx2,
                    n_rows, n_cols, tiles_per_program,
                    TWO_OUT: tl.constexpr, NEED_DW: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    # int64 row offsets: rows * hidden can pass 2**31 at long sequences
    tile_start = pid.to(tl.int64) * tiles_per_program
    for tile in range(tile_start, tile_start + tiles_per_program):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = z.to(tl.float32) * rstd[:, None]
        if NEED_DW:
            # the reference multiplies the weight by the normalised value rounded to z's dtype
            dw += tl.sum(dy * x_hat.to(z.dtype).to(tl.float32), 0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, 1) / n_cols)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if TWO_OUT:
            tl.store(DX2 + rows[:, None] * stride_dx2 + cols[None, :], dx.to(DX2.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_mask)


def _rows_per_tile(block: int, n_rows: int) -> int:
    """Rows per program tile: one wide row on a GPU (h=5280 fills the registers), many in
    the interpreter, whose cost is per program and per op, not per element."""
    budget = 16384 if INTERPRET else 4096
    return max(1, min(next_pow2(n_rows), budget // block))


def _num_warps(block: int) -> int:
    return 1 if INTERPRET else min(max(block // 256, 1), 16)


def _forward(x: torch.Tensor, update: torch.Tensor | None, weight: torch.Tensor, eps: float, save: bool):
    check_dtype("x", x)
    check_dtype("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    n_cols = x.shape[-1]
    if next_pow2(n_cols) > 65536:
        raise ValueError(f"rms_norm: hidden size {n_cols} > 65536 does not fit one row per program")
    x2 = rows_view(x)
    z_dtype = x.dtype
    f2 = None
    if update is not None:
        if update.shape != x.shape:
            raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and update {tuple(update.shape)} differ")
        z_dtype = torch.result_type(x, update)
        f2 = rows_view(update)
    n_rows = x2.shape[0]
    out_dtype = torch.promote_types(z_dtype, weight.dtype)
    y = torch.empty(n_rows, n_cols, dtype=out_dtype, device=x.device)
    # backward needs the normalised input: x itself, or the sum z = x + f written here
    z = torch.empty(n_rows, n_cols, dtype=z_dtype, device=x.device) if update is not None and save else x2
    rstd = torch.empty(n_rows if save else 1, dtype=torch.float32, device=x.device)
    block = next_pow2(n_cols)
    if n_rows > 0:
        rows = _rows_per_tile(block, n_rows)
        _rms_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            x2, f2 if f2 is not None else x2, weight, y, z, rstd, x2.stride(0),
            f2.stride(0) if f2 is not None else 0, y.stride(0), z.stride(0), n_rows, n_cols, eps,
            HAS_F=update is not None, SAVE=save, Z_DTYPE=triton_dtype(z_dtype), ROWS=rows, BLOCK=block,
            num_warps=_num_warps(block * rows))
    return y.view(*x.shape[:-1], n_cols), z, rstd


def _backward(grad_y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
              dx_dtypes: list[torch.dtype], need_dw: bool):
    n_rows, n_cols = z.shape
    dy = rows_view(grad_y)
    outs = [torch.empty(n_rows, n_cols, dtype=dt, device=z.device) for dt in dx_dtypes]
    if n_rows == 0:
        return outs, torch.zeros_like(weight) if need_dw else None
    block = next_pow2(n_cols)
    rows = _rows_per_tile(block, n_rows)
    n_tiles = triton.cdiv(n_rows, rows)
    # a few programs per SM, each summing dW over its tiles in registers
    max_programs = 2 if INTERPRET else torch.cuda.get_device_properties(z.device).multi_processor_count * 4
    tiles_per_program = triton.cdiv(n_tiles, min(n_tiles, max_programs))
    num_programs = triton.cdiv(n_tiles, tiles_per_program)
    dw_part = torch.empty(num_programs, n_cols, dtype=torch.float32, device=z.device) if need_dw else rstd
    dx2 = outs[1] if len(outs) > 1 else outs[0]
    _rms_bwd_kernel[(num_programs,)](dy, z, weight, rstd, outs[0], dx2, dw_part, dy.stride(0), z.stride(0),
                                     outs[0].stride(0), dx2.stride(0), n_rows, n_cols, tiles_per_program,
                                     TWO_OUT=len(outs) > 1, NEED_DW=need_dw, ROWS=rows, BLOCK=block,
                                     num_warps=_num_warps(block * rows))
    dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
    return outs, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, z, rstd = _forward(x, None, weight, eps, save=True)
        ctx.save_for_backward(z, weight, rstd)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, weight, rstd = ctx.saved_tensors
        (dx,), dw = _backward(grad_y, z, weight, rstd, [ctx.x_dtype], ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, update, weight, eps):
        y, z, rstd = _forward(x, update, weight, eps, save=True)
        ctx.save_for_backward(z, weight, rstd)
        ctx.shape = x.shape
        ctx.dtypes = (x.dtype, update.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, weight, rstd = ctx.saved_tensors
        need_x, need_f, need_w = ctx.needs_input_grad[:3]
        # d(x + f)/dx = d(x + f)/df: one kernel writes both (two buffers, so autograd never
        # sees one tensor aliased into two gradients)
        wanted = [dt for dt, need in zip(ctx.dtypes, (need_x, need_f)) if need] or [ctx.dtypes[0]]
        outs, dw = _backward(grad_y, z, weight, rstd, wanted, need_w)
        grads = iter(outs)
        dx = next(grads).view(ctx.shape) if need_x else None
        df = next(grads).view(ctx.shape) if need_f else None
        return dx, df, dw, None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return _forward(x, None, weight, eps, save=False)[0]


def add_rms_norm(x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _needs_grad(x, update, weight):
        return AddRMSNormFunction.apply(x, update, weight, eps)
    return _forward(x, update, weight, eps, save=False)[0]
