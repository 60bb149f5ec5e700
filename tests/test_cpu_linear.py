"""The CPU linear layer through oneDNN (kernels/cpu_linear.py): F.linear's values and gradients
to fp32 rounding, eager and compiled, F.linear itself wherever oneDNN does not apply, and the
model's linears running it (tests/test_evals_generation.py: the lean decoder's too, bit for bit)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import rdp.kernels.cpu_linear as cpu_linear
from rdp.kernels.cpu_linear import HAVE_ONEDNN, linear, onednn_applies
from rdp.pretrain.layers import Linear
from rdp.pretrain.model import build_model

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


def _count_calls(monkeypatch) -> list:
    calls, real = [], cpu_linear._onednn
    monkeypatch.setattr(cpu_linear, "_onednn", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
    return calls


@pytest.mark.parametrize("shape", [(512, 256), (4, 128, 256), (2, 4, 64, 256)])
def test_values_and_gradients_match_f_linear(shape, monkeypatch):
    torch.manual_seed(0)
    calls = _count_calls(monkeypatch)
    _check(torch.randn(shape), torch.randn(320, 256) / 16)
    assert len(calls) == 2  # forward, and the input gradient in the backward


def test_non_contiguous_inputs_and_weights():
    torch.manual_seed(0)
    x = torch.randn(256, 4, 128).permute(1, 2, 0)  # (4, 128, 256), strided
    weight = (torch.randn(640, 300) / 16)[::2, 16:272]  # (320, 256) slice
    assert not x.is_contiguous() and not weight.is_contiguous() and onednn_applies(x, weight)
    _check(x, weight)


def test_compiled_matches_eager_and_runs_the_op(monkeypatch):
    torch.manual_seed(0)
    calls = _count_calls(monkeypatch)
    x, weight = torch.randn(4, 128, 256), torch.randn(320, 256) / 16
    _check(x, weight, torch.compile(linear, fullgraph=True))  # fullgraph: no graph break on the way in
    assert calls == [(4, 128, 256), (4, 128, 320)]


def test_flop_counter_counts_it_as_f_linear():
    from torch.utils.flop_counter import FlopCounterMode

    x, weight = torch.randn(4, 128, 256, requires_grad=True), torch.randn(320, 256, requires_grad=True)
    counts = []
    for fn in (linear, F.linear):
        with FlopCounterMode(display=False) as counter:
            fn(x, weight).sum().backward()
            with torch.no_grad():  # the direct oneDNN call
                fn(x, weight)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 4 * 2 * 512 * 320 * 256


def test_without_autograd_it_is_the_same_arithmetic():
    torch.manual_seed(0)
    x, weight = torch.randn(4, 128, 256), torch.nn.Parameter(torch.randn(320, 256))
    with_grad = linear(x, weight)
    with torch.no_grad():
        assert torch.equal(linear(x, weight), with_grad)


def test_f_linear_wherever_onednn_does_not_apply():
    x, weight = torch.randn(512, 256), torch.randn(320, 256)
    assert onednn_applies(x, weight)
    small = x[:8]  # too small a product to gain: token-by-token decoding stays on F.linear
    for a, b in [(x.bfloat16(), weight.bfloat16()), (x[0], weight), (small, weight), (x.to("meta"), weight.to("meta"))]:
        assert not onednn_applies(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_applies(x, weight) and linear(x, weight).dtype == torch.bfloat16
    bf = linear(x.bfloat16(), weight.bfloat16())
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, F.linear(x.bfloat16(), weight.bfloat16()))
    assert torch.equal(linear(small, weight), F.linear(small, weight))


def test_the_model_linear_uses_it(monkeypatch):
    calls = _count_calls(monkeypatch)
    layer = Linear(256, 320, 0.02)
    layer.reset_parameters()
    x = torch.randn(2, 256, 256)
    out = layer(x)
    assert calls == [(2, 256, 256)] and torch.allclose(out, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


def test_compiled_training_step_with_onednn_linears_equals_f_linear(micro_model_config, monkeypatch):
    """A micro model with every linear on oneDNN (threshold lowered): eager and compiled
    training steps give F.linear's loss and gradients to fp32 rounding."""
    cfg = replace(micro_model_config, compile=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(model):
        torch.manual_seed(1)
        loss = model(tokens, labels=tokens, num_steps=(2, 2), return_logits=False).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    expected = step(build_model(replace(cfg, compile=False), seed=0))  # F.linear: products below MIN_MACS
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(cpu_linear, "MIN_MACS", 0)
    torch._dynamo.reset()
    for compiled in (False, True):
        calls.clear()
        loss, grads = step(build_model(replace(cfg, compile=compiled), seed=0))
        assert len(calls) > 0, compiled
        torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[1][name], rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()  # the graphs above were traced with the lowered threshold
