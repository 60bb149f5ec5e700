"""The two matmul-shaped ops of the model, in Triton.

Input injection, `adapter(concat([s, e]))` with the adapter W = [W_s | W_e] (h x 2h):
computed as s @ W_s^T + e @ W_e^T in one GEMM kernel with a single fp32 accumulator (two
K loops), so the (tokens x 2h) concat never exists. Because the prelude output e is the
same at every recurrence step, its half P = e @ W_e^T can be computed once per forward
(`injection_embedding`, kept in fp32) and each step then only runs the state half into an
accumulator that starts from P (`injection_with_embedding`). That reuse is exact math; in
floating point it only changes the order in which the 2h products are summed.

Cross-entropy over a large vocabulary, `linear_cross_entropy(x, W, labels)`: tokens are
processed in chunks; for each chunk the fp32 logits are formed, a Triton kernel computes
the log-sum-exp and the loss and overwrites the logits in place with their gradient, and
the chunk's dx and dW contributions are taken right away (as in Liger-Kernel's fused linear
cross-entropy). Memory holds one chunk of logits, never tokens x vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rdp.kernels._triton_utils import INTERPRET, check_dtype, dot, dot_upcast, next_pow2, rows_view


# ---- injection GEMM: C = A1 @ B1^T (+ A2 @ B2^T) (+ INIT) ----------------------------------
@triton.jit
def _k_loop(acc, A, B, stride_am, stride_bn, offs_m, offs_n, M, N, K,
            BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(A + offs_m[:, None] * stride_am + kk[None, :],
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(B + offs_n[None, :] * stride_bn + kk[:, None],
                    mask=(offs_n[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc += dot(a, b, UPCAST)
    return acc


@triton.jit
def _injection_gemm_kernel(A1, B1, A2, B2, INIT, C, M, N, K1, K2,
                           stride_a1, stride_b1, stride_a2, stride_b2, stride_init, stride_c,
                           HAS_SECOND: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           UPCAST: tl.constexpr):
    # grouped ordering of output tiles so neighbouring programs share rows of A in L2
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_INIT:
        acc = tl.load(INIT + offs_m[:, None] * stride_init + offs_n[None, :], mask=c_mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc = _k_loop(acc, A1, B1, stride_a1, stride_b1, offs_m, offs_n, M, N, K1, BLOCK_K, UPCAST)
    if HAS_SECOND:
        acc = _k_loop(acc, A2, B2, stride_a2, stride_b2, offs_m, offs_n, M, N, K2, BLOCK_K, UPCAST)
    tl.store(C + offs_m[:, None] * stride_c + offs_n[None, :], acc.to(C.dtype.element_ty), mask=c_mask)


def _gemm(a1, b1, a2=None, b2=None, init=None, out_dtype=None) -> torch.Tensor:
    """(M, K1) x (N, K1)^T [+ (M, K2) x (N, K2)^T] [+ init (M, N) fp32] -> (M, N)."""
    M, N = a1.shape[0], b1.shape[0]
    out = torch.empty(M, N, dtype=out_dtype or a1.dtype, device=a1.device)
    if M == 0:
        return out
    if INTERPRET:
        bm, bn, bk, opts = 16, 16, 16, {}
    else:
        bm, bn = 128, 128
        bk = 32 if a1.dtype == torch.float32 else 64
        opts = dict(num_warps=8, num_stages=3)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _injection_gemm_kernel[grid](
        a1, b1, a2 if a2 is not None else a1, b2 if b2 is not None else b1,
        init if init is not None else out, out, M, N, a1.shape[1], a2.shape[1] if a2 is not None else 0,
        a1.stride(0), b1.stride(0), a2.stride(0) if a2 is not None else 0,
        b2.stride(0) if b2 is not None else 0, init.stride(0) if init is not None else 0, out.stride(0),
        HAS_SECOND=a2 is not None, HAS_INIT=init is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=8, UPCAST=dot_upcast(a1.dtype), **opts)
    return out


def _split_weight(weight: torch.Tensor, hidden: int, who: str):
    check_dtype("adapter weight", weight)
    if weight.dim() != 2 or weight.shape != (hidden, 2 * hidden):
        raise ValueError(f"{who}: adapter weight must be ({hidden}, {2 * hidden}), got {tuple(weight.shape)}")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    return weight[:, :hidden], weight[:, hidden:]


class Injection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, embedded, weight):
        hidden = state.shape[-1]
        w_s, w_e = _split_weight(weight, hidden, "injection")
        s2, e2 = rows_view(state), rows_view(embedded)
        ctx.save_for_backward(state, embedded, weight)
        return _gemm(s2, w_s, e2, w_e).view(state.shape)

    @staticmethod
    def backward(ctx, grad):
        state, embedded, weight = ctx.saved_tensors
        hidden = state.shape[-1]
        g = rows_view(grad)
        ds = de = dw = None
        if ctx.needs_input_grad[0]:
            ds = (g @ weight[:, :hidden]).view(state.shape)
        if ctx.needs_input_grad[1]:
            de = (g @ weight[:, hidden:]).view(embedded.shape)
        if ctx.needs_input_grad[2]:
            dw = torch.cat([g.t() @ rows_view(state), g.t() @ rows_view(embedded)], dim=1)
        return ds, de, dw


class InjectionEmbedding(torch.autograd.Function):
    """P = e @ W_e^T in fp32, the part of the injection that is the same at every step."""

    @staticmethod
    def forward(ctx, embedded, weight):
        _, w_e = _split_weight(weight, embedded.shape[-1], "injection_embedding")
        ctx.save_for_backward(embedded, weight)
        return _gemm(rows_view(embedded), w_e, out_dtype=torch.float32).view(embedded.shape)

    @staticmethod
    def backward(ctx, grad):
        embedded, weight = ctx.saved_tensors
        hidden = embedded.shape[-1]
        g = rows_view(grad).to(embedded.dtype)
        de = dw = None
        if ctx.needs_input_grad[0]:
            de = (g @ weight[:, hidden:]).view(embedded.shape)
        if ctx.needs_input_grad[1]:
            dw = torch.cat([torch.zeros_like(weight[:, :hidden]), g.t() @ rows_view(embedded)], dim=1)
        return de, dw


class InjectionWithEmbedding(torch.autograd.Function):
    """s @ W_s^T accumulated on top of the fp32 P from InjectionEmbedding."""

    @staticmethod
    def forward(ctx, state, projected, weight):
        hidden = state.shape[-1]
        w_s, _ = _split_weight(weight, hidden, "injection_with_embedding")
        if projected.shape != state.shape or projected.dtype != torch.float32:
            raise ValueError(f"injection_with_embedding: projected must be fp32 {tuple(state.shape)}, "
                             f"got {projected.dtype} {tuple(projected.shape)}")
        ctx.save_for_backward(state, weight)
        return _gemm(rows_view(state), w_s, init=rows_view(projected)).view(state.shape)

    @staticmethod
    def backward(ctx, grad):
        state, weight = ctx.saved_tensors
        hidden = state.shape[-1]
        g = rows_view(grad)
        ds = dw = None
        if ctx.needs_input_grad[0]:
            ds = (g @ weight[:, :hidden]).view(state.shape)
        if ctx.needs_input_grad[2]:
            dw = torch.cat([g.t() @ rows_view(state), torch.zeros_like(weight[:, hidden:])], dim=1)
        dp = grad.float() if ctx.needs_input_grad[1] else None
        return ds, dp, dw


def injection(state: torch.Tensor, embedded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if state.shape != embedded.shape:
        raise ValueError(f"injection: state {tuple(state.shape)} and embedding {tuple(embedded.shape)} differ")
    check_dtype("state", state)
    # under autocast the master weight may be fp32 while activations are bf16: F.linear would
    # run in the activations' dtype, so do we (the cast is differentiable)
    return Injection.apply(state, embedded.to(state.dtype), weight.to(state.dtype))


def injection_embedding(embedded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    check_dtype("embedded", embedded)
    return InjectionEmbedding.apply(embedded, weight.to(embedded.dtype))


def injection_with_embedding(state: torch.Tensor, projected: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    check_dtype("state", state)
    return InjectionWithEmbedding.apply(state, projected, weight.to(state.dtype))


# ---- chunked linear + cross-entropy ---------------------------------------------------------
@triton.jit
def _cross_entropy_kernel(LOGITS, LABELS, LOSS, stride_row, n_vocab, ignore_index,
                          WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: loss = logsumexp(x) - x[label]; optionally x <- softmax(x) - onehot(label)
    in place (the unscaled gradient of the summed loss)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    ignored = label == ignore_index
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        x = tl.load(base + start + offs, mask=start + offs < n_vocab, other=float("-inf"))
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    target = tl.load(base + tl.where(ignored, 0, label))
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - target))
    if WRITE_GRAD:
        keep = tl.where(ignored, 0.0, 1.0)
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < n_vocab, other=0.0)
            g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(base + cols, g * keep, mask=cols < n_vocab)


def _cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool):
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        block_v = 128 if INTERPRET else min(next_pow2(logits.shape[1]), 8192)
        _cross_entropy_kernel[(logits.shape[0],)](logits, labels, losses, logits.stride(0), logits.shape[1],
                                                   ignore_index, WRITE_GRAD=write_grad, BLOCK_V=block_v,
                                                   num_warps=1 if INTERPRET else 16)
    return losses


def default_chunk_rows(vocab: int) -> int:
    """About 256 MiB of fp32 logits per chunk."""
    return max(1, (64 * 2 ** 20) // vocab)


def _check_ce(x, weight, labels, ignore_index):
    check_dtype("x", x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} does not match hidden {x.shape[-1]}")
    if labels.shape != x.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} do not match tokens {tuple(x.shape[:-1])}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: label {int(labels[bad][0])} outside the vocabulary "
                         f"[0, {weight.shape[0]}) (ignore_index={ignore_index})")


def _chunked_loss(x, weight, labels, ignore_index, chunk_rows, want_grad):
    x2, lab = rows_view(x), labels.reshape(-1).contiguous()
    n_valid = (lab != ignore_index).sum()
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x2) if want_grad else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_grad else None
    for start in range(0, x2.shape[0], chunk_rows):
        xc, lc = x2[start:start + chunk_rows], lab[start:start + chunk_rows]
        logits = F.linear(xc, weight).float()  # the reference's fp32 logits, one chunk at a time
        total += _cross_entropy_rows(logits, lc, ignore_index, want_grad).sum()
        if want_grad:
            g = logits.to(x.dtype)
            dx[start:start + chunk_rows] = g @ weight.to(x.dtype)
            dw += (g.t() @ xc).float()
    scale = 1.0 / n_valid.float()  # mean over non-ignored tokens; 0 of them gives nan as torch does
    if want_grad:
        dx = (dx.float() * scale).to(x.dtype).view(x.shape)
        dw = dw * scale
    return total * scale, dx, dw


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index, chunk_rows):
        loss, dx, dw = _chunked_loss(x, weight, labels, ignore_index, chunk_rows, want_grad=True)
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        gx = (dx * grad_loss).to(dx.dtype) if ctx.needs_input_grad[0] else None
        gw = (dw * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean token cross-entropy of fp32 logits x @ weight^T, one chunk of tokens at a time."""
    _check_ce(x, weight, labels, ignore_index)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    weight = weight.to(x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, labels, ignore_index, chunk_rows)
    return _chunked_loss(x, weight, labels, ignore_index, chunk_rows, want_grad=False)[0]
