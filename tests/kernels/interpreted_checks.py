"""Triton kernels vs the PyTorch reference, run on CPU through Triton's interpreter, or
compiled on a CUDA device when one is present and TRITON_INTERPRET is not set:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels/interpreted_checks.py   # CPU
    .venv/bin/python -m pytest -q tests/kernels/interpreted_checks.py                      # GPU

Not collected by the main pytest run: tests/test_kernels.py runs this file in a separate
pytest process with TRITON_INTERPRET=1 (the variable must be set before triton is first
imported, and other test files import torch/triton in the main process).

Tolerances (relative to the largest magnitude of the float64 ground truth, which is the
reference run on float64 copies of the inputs):
  fp32: 2e-5   fp16: 4e-3   bf16: 4e-2
bf16 is looser than its 2**-8 precision because the interpreter (numpy has no bf16)
truncates fp32 -> bf16 instead of rounding to nearest even, so every bf16 rounding in
the interpreter may be off by one ulp where a GPU would be exact; bf16 dots are upcast to
fp32 in the kernels under the interpreter, which is exact (see kernels/_triton_utils.py).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
assert INTERPRET or torch.cuda.is_available(), "run me with TRITON_INTERPRET=1 (see tests/test_kernels.py) or on a GPU"
DEVICE = "cpu" if INTERPRET else "cuda"
if DEVICE == "cuda":
    torch.set_default_device(DEVICE)  # this file runs in its own process

from rdp import kernels  # noqa: E402
from rdp.kernels import reference as R  # noqa: E402
from rdp.kernels import triton_ops as T  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 4e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]


def assert_matches(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    tol = TOL[dtype]
    scale = max(truth.abs().max().item(), 1e-6)
    err = (actual.double() - truth.double()).abs().max().item()
    assert err <= tol * scale, f"{what} ({dtype}): max error {err:.3g} > {tol} * {scale:.3g}"


def grads_of(fn, inputs, grad_outs):
    """Run fn, backprop the given output gradients, return (outputs, input grads)."""
    for t in inputs:
        t.grad = None
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grad_outs)])
    return outs, [t.grad for t in inputs]


def compare(triton_fn, reference_fn, inputs, dtype, name):
    """Triton on `inputs` vs the reference on float64 copies: outputs and every input grad."""
    truth_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    with torch.no_grad():
        probe = reference_fn(*truth_inputs)
    probe = probe if isinstance(probe, tuple) else (probe,)
    grad_outs = [torch.randn_like(p) for p in probe]
    outs, grads = grads_of(triton_fn, inputs, grad_outs)
    truth_outs, truth_grads = grads_of(reference_fn, truth_inputs, grad_outs)
    for i, (o, t) in enumerate(zip(outs, truth_outs)):
        assert_matches(o, t, dtype, f"{name} output {i}")
    for i, (g, t, x) in enumerate(zip(grads, truth_grads, inputs)):
        if x.requires_grad:
            assert g is not None and g.dtype == x.dtype, f"{name}: grad {i} missing or wrong dtype"
            assert_matches(g, t, dtype, f"{name} grad of input {i}")
    return outs


# ---- attention ---------------------------------------------------------------------------
HEAD96, DECODE5, DECODE1 = (1, 2, 37, 37, 96, True), (1, 2, 5, 29, 64, True), (1, 1, 1, 17, 96, True)
ATTN_CASES = [  # (batch, heads, seq_q, seq_k, head_dim, causal)
    HEAD96,                      # the 3.5B head dim (block padded 96 -> 128), ragged tail
    (2, 1, 24, 24, 64, True),
    (1, 1, 19, 19, 128, True),
    DECODE5,                     # fewer queries than keys: bottom-right aligned mask
    DECODE1,                     # one-token decode against a KV cache
    (1, 2, 20, 33, 32, False),
]
# every case in fp32; fp16 / bf16 on the 96-dim and decode cases (interpreter time)
ATTN_PARAMS = [(c, torch.float32) for c in ATTN_CASES] + [
    (c, dt) for dt in (torch.float16, torch.bfloat16) for c in (HEAD96, DECODE5, DECODE1)]


def _attn_id(param):
    if isinstance(param, torch.dtype):
        return DT_IDS[DTYPES.index(param)]
    return "b{}h{}q{}k{}d{}{}".format(*param[:5], "c" if param[5] else "n")


@pytest.mark.parametrize("case,dtype", ATTN_PARAMS, ids=_attn_id)
def test_flash_attention(case, dtype):
    batch, heads, seq_q, seq_k, head_dim, causal = case
    torch.manual_seed(0)
    q = torch.randn(batch, heads, seq_q, head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, heads, seq_k, head_dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, heads, seq_k, head_dim, dtype=dtype, requires_grad=True)
    compare(lambda q, k, v: T.attention(q, k, v, causal=causal),
            lambda q, k, v: R.attention(q, k, v, causal=causal), [q, k, v], dtype, "attention")


def test_flash_attention_strided_inputs_and_no_grad():
    """q/k/v as transposed views of (B, S, H, D), the layout the model hands over."""
    torch.manual_seed(1)
    qkv = torch.randn(2, 21, 3, 2, 64)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    with torch.no_grad():
        out = T.attention(q, k, v, causal=True)
    assert_matches(out, R.attention(q.double(), k.double(), v.double(), causal=True), torch.float32, "strided")


def test_flash_attention_rejects_more_queries_than_keys():
    q, k = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="more queries"):
        T.attention(q, k, k, causal=True)


# ---- norms ---------------------------------------------------------------------------------
NORM_SHAPES = [(3, 5, 96), (7, 33), (2, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("weight_fp32", [True, False], ids=["w32", "wsame"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm(shape, weight_fp32, dtype):
    torch.manual_seed(2)
    x = (3 * torch.randn(shape)).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(shape[-1])).to(torch.float32 if weight_fp32 else dtype).requires_grad_()
    (out,) = compare(lambda x, w: T.rms_norm(x, w, 1e-6), lambda x, w: R.rms_norm(x, w, 1e-6), [x, w], dtype, "rms_norm")
    assert out.dtype == R.rms_norm(x, w, 1e-6).dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm(shape, dtype):
    torch.manual_seed(3)
    x = torch.randn(shape).to(dtype).requires_grad_()
    f = torch.randn(shape).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(shape[-1])).to(dtype).requires_grad_()
    compare(lambda x, f, w: T.add_rms_norm(x, f, w, 1e-6), lambda x, f, w: R.add_rms_norm(x, f, w, 1e-6),
            [x, f, w], dtype, "add_rms_norm")


def test_add_rms_norm_without_grad_matches_with_grad():
    torch.manual_seed(4)
    x, f, w = torch.randn(4, 40), torch.randn(4, 40), torch.rand(40) + 0.5
    with torch.no_grad():
        plain = T.add_rms_norm(x, f, w, 1e-6)
    tracked = T.add_rms_norm(x.requires_grad_(), f, w, 1e-6)
    assert torch.equal(plain, tracked.detach())


# ---- gated MLP middle ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(3, 5, 74), (2, 2200)], ids=["odd37", "twoblocks1100"])
def test_silu_mul(shape, dtype):
    torch.manual_seed(5)
    fused = (2 * torch.randn(shape)).to(dtype).requires_grad_()
    compare(T.silu_mul, R.silu_mul, [fused], dtype, "silu_mul")


# ---- q/k bias + RoPE -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("head_dim,with_bias", [(96, True), (64, False), (16, True)])
def test_bias_rope(head_dim, with_bias, dtype):
    torch.manual_seed(6)
    batch, seq, heads, offset = 1, 6, 3, 5
    qkv = torch.randn(batch, seq, 3, heads, head_dim).to(dtype).requires_grad_()
    bias = (0.3 * torch.randn(2, 1, heads, head_dim)).requires_grad_() if with_bias else None
    cos_sin = R.rope_cos_sin(head_dim, seq + offset, 50000.0)[offset:]  # a decode position offset

    def run(impl):
        def fn(qkv, *maybe_bias):
            q, k, _ = qkv.unbind(2)  # strided views of the fused projection, as in the model
            return impl.bias_rope(q, k, maybe_bias[0] if maybe_bias else None, cos_sin)
        return fn

    inputs = [qkv] + ([bias] if with_bias else [])
    compare(run(T), run(R), inputs, dtype, "bias_rope")


# ---- input injection -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_injection(dtype):
    torch.manual_seed(7)
    hidden = 24
    s = torch.randn(2, 7, hidden).to(dtype).requires_grad_()
    e = torch.randn(2, 7, hidden).to(dtype).requires_grad_()
    w = (0.2 * torch.randn(hidden, 2 * hidden)).to(dtype).requires_grad_()
    compare(T.injection, R.injection, [s, e, w], dtype, "injection")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_injection_reused_embedding_over_steps(dtype):
    """P = e @ W_e^T computed once and reused for three steps equals three full injections,
    and e / W get the gradient of every step (the recurrence's backprop through e)."""
    torch.manual_seed(8)
    hidden = 20
    s = torch.randn(3, 5, hidden).to(dtype).requires_grad_()
    e = torch.randn(3, 5, hidden).to(dtype).requires_grad_()
    w = (0.2 * torch.randn(hidden, 2 * hidden)).to(dtype).requires_grad_()

    def reused(s, e, w):
        projected = T.injection_embedding(e, w)
        for _ in range(3):
            s = torch.tanh(T.injection_with_embedding(s, projected, w))
        return s

    def full(s, e, w):
        for _ in range(3):
            s = torch.tanh(R.injection(s, e, w))
        return s

    compare(reused, full, [s, e, w], dtype, "injection reuse")


def test_reference_injection_split_is_exact_math():
    torch.manual_seed(9)
    s, e, w = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64), torch.randn(12, 24, dtype=torch.float64)
    split = R.injection_with_embedding(s, R.injection_embedding(e, w), w)
    torch.testing.assert_close(split, R.injection(s, e, w), rtol=1e-12, atol=1e-12)


# ---- cross-entropy -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_rows", [7, None], ids=["chunk7", "onechunk"])
def test_linear_cross_entropy(chunk_rows, dtype):
    torch.manual_seed(10)
    vocab, hidden = 300, 24  # vocab not a multiple of the kernel's vocab block
    x = torch.randn(3, 11, hidden).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(vocab, hidden)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (3, 11))
    labels[0, :4] = -100
    labels[2, -1] = vocab - 1
    compare(lambda x, w: T.linear_cross_entropy(x, w, labels, chunk_rows=chunk_rows) * 2.5,
            lambda x, w: R.linear_cross_entropy(x, w, labels) * 2.5, [x, w], dtype, "linear_cross_entropy")


def test_linear_cross_entropy_never_forms_full_logits(monkeypatch):
    """Every logits block the op materialises has at most chunk_rows tokens."""
    import rdp.kernels.triton_linear as L

    shapes = []
    real_linear = L.F.linear

    def recording_linear(x, w, *rest):
        out = real_linear(x, w, *rest)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(L.F, "linear", recording_linear)
    x, w = torch.randn(2, 9, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    T.linear_cross_entropy(x, w, torch.randint(0, 50, (2, 9)), chunk_rows=4).backward()
    assert shapes == [(4, 50), (4, 50), (4, 50), (4, 50), (2, 50)]
    assert x.grad is not None and w.grad is not None


def test_linear_cross_entropy_bad_labels_and_all_ignored():
    x, w = torch.randn(2, 4, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        T.linear_cross_entropy(x, w, torch.full((2, 4), 50))
    ignored = torch.full((2, 4), -100)
    assert torch.isnan(T.linear_cross_entropy(x, w, ignored)) and torch.isnan(R.linear_cross_entropy(x, w, ignored))


# ---- public entry points and dispatch ------------------------------------------------------
def test_public_entry_points_run_triton_under_the_interpreter():
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 2, 6, 16, requires_grad=True) for _ in range(3))
    out = kernels.flash_attention(q, k, v, causal=True)
    assert "FlashAttention" in out.grad_fn.name()
    assert_matches(out, R.attention(q.double(), k.double(), v.double()), torch.float32, "kernels.flash_attention")
    x, w = torch.randn(3, 40, requires_grad=True), torch.rand(40) + 0.5
    y = kernels.rms_norm(x, w, 1e-6)
    assert "RMSNorm" in y.grad_fn.name()
    assert_matches(y, R.rms_norm(x.double(), w.double(), 1e-6), torch.float32, "kernels.rms_norm")
    ops = kernels.get_ops("triton")
    assert ops.backend == "triton" and ops.attention is T.flash_attention and ops.rms_norm is T.rms_norm
    assert ops.attention.triton_impl.__module__ == "rdp.kernels.triton_attention"
    assert kernels.get_ops("auto").backend == "torch"  # until a GPU run validates the kernels


# ---- the whole tiny model ------------------------------------------------------------------
class ConcatCache:
    """A minimal KVCache: one growing entry per (layer, step)."""

    def __init__(self):
        self.entries = {}

    def update(self, key, k, v):
        if key in self.entries:
            k = torch.cat([self.entries[key][0], k], dim=2)
            v = torch.cat([self.entries[key][1], v], dim=2)
        self.entries[key] = (k, v)
        return k, v


def _tiny_models():
    from rdp.pretrain.config import load_config
    from rdp.pretrain.model import build_model

    cfg = load_config("tiny").model  # the configs/tiny.yaml shape
    torch_model = build_model(dataclasses.replace(cfg, kernels="torch"), device=DEVICE, seed=0)
    triton_model = build_model(dataclasses.replace(cfg, kernels="triton"), device=DEVICE, seed=1)
    triton_model.load_state_dict(torch_model.state_dict())
    with torch.no_grad():  # non-trivial norm weights and q/k biases, so their grads are exercised
        for model in (torch_model, triton_model):
            torch.manual_seed(12)
            for name, p in model.named_parameters():
                if "norm" in name or "qk_bias" in name:
                    p.add_(0.1 * torch.randn_like(p))
    assert torch_model.ops.backend == "torch" and triton_model.ops.backend == "triton"
    return cfg, torch_model, triton_model


def test_tiny_model_same_logits_and_grads():
    cfg, torch_model, triton_model = _tiny_models()
    torch.manual_seed(13)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13))
    labels = torch.randint(0, cfg.vocab_size, (2, 13))
    results = []
    for model in (torch_model, triton_model):
        out = model(tokens, labels=labels, num_steps=(1, 2), generator=torch.Generator(DEVICE).manual_seed(5))
        out.loss.backward()
        results.append((out.logits, out.loss, {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_loss, ref_grads), (tri_logits, tri_loss, tri_grads) = results
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tri_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == tri_grads.keys()
    for name, g in ref_grads.items():
        assert g is not None and tri_grads[name] is not None, name
        scale = max(g.abs().max().item(), 1e-6)
        torch.testing.assert_close(tri_grads[name], g, rtol=1e-3, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


def test_tiny_model_decode_with_kv_cache():
    """Prefill + one decoded token through a KV cache (Sq = 1 < Sk) matches the torch path."""
    cfg, torch_model, triton_model = _tiny_models()
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator(DEVICE).manual_seed(14))
    logits = []
    with torch.no_grad():
        for model in (torch_model, triton_model):
            cache = ConcatCache()
            model(tokens[:, :8], num_steps=3, init_scale=0.0, cache=cache)
            step = model(tokens[:, 8:], num_steps=3, init_scale=0.0, cache=cache, position_offset=8)
            logits.append(step.logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_tiny_model_bf16_runs_and_agrees():
    """The whole model cast to bf16 (weights, activations and the RoPE table) runs on the
    Triton path and agrees with the torch path within bf16 noise (loss to 1e-2, logits and
    adapter grad to 5e-2 of their largest magnitude; see the bf16 caveat at the top)."""
    cfg, torch_model, triton_model = _tiny_models()
    tokens = torch.randint(0, cfg.vocab_size, (1, 11), generator=torch.Generator(DEVICE).manual_seed(15))
    results = []
    for model in (torch_model.to(torch.bfloat16), triton_model.to(torch.bfloat16)):
        out = model(tokens, labels=tokens, num_steps=(1, 1), generator=torch.Generator(DEVICE).manual_seed(0))
        out.loss.backward()
        assert out.logits.dtype == torch.float32 and model.transformer.adapter.weight.grad.dtype == torch.bfloat16
        results.append((out.loss, out.logits, model.transformer.adapter.weight.grad.float()))
    (ref_loss, ref_logits, ref_grad), (tri_loss, tri_logits, tri_grad) = results
    assert abs(tri_loss.item() - ref_loss.item()) <= 1e-2 * ref_loss.item()
    assert (tri_logits - ref_logits).abs().max() <= 5e-2 * ref_logits.abs().max()
    assert (tri_grad - ref_grad).abs().max() <= 5e-2 * ref_grad.abs().max()
