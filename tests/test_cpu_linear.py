"""The CPU linear layer through oneDNN (kernels/cpu_linear.py): F.linear's values and gradients
to fp32 rounding, eager and compiled, F.linear itself wherever oneDNN does not apply, and the
model's linears running it (tests/test_evals_generation.py: the lean decoder's too, bit for bit)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rdp.kernels.cpu_linear import HAVE_ONEDNN, linear, onednn_applies
from rdp.pretrain.layers import Linear

pytestmark = pytest.mark.skipif(not HAVE_ONEDNN, reason="this PyTorch build has no oneDNN (mkldnn)")


def _check(x: torch.Tensor, weight: torch.Tensor, fn=linear) -> None:
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    grad = torch.randn(*x.shape[:-1], weight.shape[0])
    out = fn(x, weight)
    out.backward(grad)
    x_ref, w_ref = x.detach().requires_grad_(), weight.detach().requires_grad_()
    expected = F.linear(x_ref, w_ref)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 48), (3, 17, 48), (2, 3, 5, 48)])
def test_values_and_gradients_match_f_linear(shape):
    torch.manual_seed(0)
    _check(torch.randn(shape), torch.randn(80, 48) / 7)


def test_non_contiguous_inputs_and_weights():
    torch.manual_seed(0)
    x = torch.randn(48, 3, 17).permute(1, 2, 0)  # (3, 17, 48), strided
    weight = torch.randn(96, 80)[::2, 16:64]  # (48, 48) slice
    assert not x.is_contiguous() and not weight.is_contiguous()
    _check(x, weight)


def _count_calls(monkeypatch) -> list:
    import rdp.kernels.cpu_linear as cpu_linear

    calls, real = [], cpu_linear._onednn
    monkeypatch.setattr(cpu_linear, "_onednn", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
    return calls


def test_compiled_matches_eager_and_runs_the_op(monkeypatch):
    torch.manual_seed(0)
    calls = _count_calls(monkeypatch)
    x, weight = torch.randn(4, 9, 32), torch.randn(40, 32) / 6
    _check(x, weight, torch.compile(linear, fullgraph=True))  # fullgraph: no graph break on the way in
    assert calls == [(4, 9, 32), (4, 9, 40)]  # forward, and the input gradient in the backward


def test_without_autograd_it_is_the_same_arithmetic():
    torch.manual_seed(0)
    x, weight = torch.randn(5, 7, 32), torch.nn.Parameter(torch.randn(24, 32))
    with_grad = linear(x, weight)
    with torch.no_grad():
        assert torch.equal(linear(x, weight), with_grad)


def test_f_linear_wherever_onednn_does_not_apply():
    x, weight = torch.randn(4, 8), torch.randn(6, 8)
    assert onednn_applies(x, weight)
    for a, b in [(x.bfloat16(), weight.bfloat16()), (x[0], weight), (x[:0], weight),
                 (x.to("meta"), weight.to("meta"))]:
        assert not onednn_applies(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_applies(x, weight) and linear(x, weight).dtype == torch.bfloat16
    bf = linear(x.bfloat16(), weight.bfloat16())
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, F.linear(x.bfloat16(), weight.bfloat16()))
    assert torch.equal(linear(x[0], weight), F.linear(x[0], weight))


def test_the_model_linear_uses_it(monkeypatch):
    calls = _count_calls(monkeypatch)
    layer = Linear(16, 8, 0.02)
    layer.reset_parameters()
    x = torch.randn(2, 3, 16)
    out = layer(x)
    assert calls == [(2, 3, 16)] and torch.allclose(out, F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)
