"""The bias-free linear layer x @ W^T on CPU through oneDNN, the library behind PyTorch's
`mkldnn` ops, instead of the MKL GEMM that `F.linear` calls.

Why: on the CPUs measured here (AMD EPYC, AVX-512, one thread) oneDNN runs the model's
forward and input-gradient products, (tokens x hidden) @ (hidden x 3h / 2i / h) and back,
at ~90-100 GFLOP/s where MKL's `F.linear` reaches ~55-85; the weight gradient, g^T x, is
as fast in MKL and stays there. Both are fp32 GEMMs: results agree to fp32 rounding (the
order of the sums differs), not bit for bit.

`linear` takes this path for fp32 CPU tensors when PyTorch was built with oneDNN and the
product is large enough to gain (MIN_MACS), and is `F.linear` everywhere else (CUDA, bf16,
meta tensors, CPU autocast, small products). Under autograd or torch.compile it runs as the
custom op `rdp::onednn_linear` (opaque to the compiler, with its own backward); without
autograd it calls oneDNN directly, sparing the custom op's Python dispatch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula


# read once: the build's capability (flag reads inside a compiled region would break its graph)
HAVE_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# Below about this many multiply-adds a oneDNN call's fixed cost (~30 us: it looks up its
# primitive each call) outweighs its faster GEMM, so small products (token-by-token decoding)
# stay on F.linear; the training step's products are 67M-370M here.
MIN_MACS = 1 << 25


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and weight.dim() == 2 and HAVE_ONEDNN
            and x.numel() * weight.shape[0] >= MIN_MACS
            and not torch.is_autocast_enabled("cpu"))  # autocast's own dtype rules apply to F.linear


@torch.library.custom_op("rdp::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T through oneDNN (fp32 CPU tensors; see `linear` for the general entry)."""
    return _onednn(x, weight)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """What FlopCounterMode counts for F.linear's matmul: 2 M N K."""
    return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]


# the custom op, and the direct call without autograd (torch registers no formula for it)
register_flop_formula(torch.ops.rdp.onednn_linear)(_flops)
if HAVE_ONEDNN:
    register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_flops)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t())  # oneDNN reads the transposed view in place
    if ctx.needs_input_grad[1]:
        grad_weight = grad.flatten(0, -2).t().mm(x.flatten(0, -2))  # MKL, as fast here
    return grad_x, grad_weight


onednn_linear.register_autograd(_backward, setup_context=_save_inputs)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias), through oneDNN for fp32 CPU tensors."""
    if not onednn_applies(x, weight):
        return F.linear(x, weight)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return onednn_linear(x, weight)
    return _onednn(x, weight)
