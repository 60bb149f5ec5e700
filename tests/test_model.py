"""The model is exactly the huginn-0125 function (docs/model.md)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rdp.pretrain.model import build_model


# ---- the spec, written out independently of pretrain/ and kernels/ -----------------------
def spec_rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def spec_rope(t, base):
    """Rotate interleaved pairs (2i, 2i+1) as complex numbers, in fp32."""
    seq, dim = t.shape[1], t.shape[-1]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq).float()
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    as_complex = torch.view_as_complex(t.float().reshape(*t.shape[:-1], dim // 2, 2))
    return torch.view_as_real(as_complex * rot).flatten(-2).to(t.dtype)


def spec_block(x, w, prefix, cfg):
    h, heads = cfg.hidden_size, cfg.num_heads
    hd = h // heads
    b, s, _ = x.shape

    def attn(y):
        qkv = y @ w[f"{prefix}.attn.Wqkv.weight"].T
        q, k, v = qkv[..., :h], qkv[..., h:2 * h], qkv[..., 2 * h:]
        q, k, v = (t.reshape(b, s, heads, hd) for t in (q, k, v))
        bias = w[f"{prefix}.attn.qk_bias"]
        q, k = spec_rope(q + bias[0], cfg.rope_base), spec_rope(k + bias[1], cfg.rope_base)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, h)
        return out @ w[f"{prefix}.attn.proj.weight"].T

    def mlp(y):
        fc = y @ w[f"{prefix}.mlp.fc.weight"].T
        gate, up = fc[..., :cfg.intermediate_size], fc[..., cfg.intermediate_size:]
        return (gate * torch.sigmoid(gate) * up) @ w[f"{prefix}.mlp.proj.weight"].T

    n = lambda i, y: spec_rms_norm(y, w[f"{prefix}.norm_{i}.weight"], cfg.norm_eps)  # noqa: E731
    x = n(2, x + attn(n(1, x)))
    return n(4, x + mlp(n(3, x)))


def spec_forward(w, cfg, tokens, depth):
    """Eval mode, init_scale 0 (state starts at zero)."""
    e = F.embedding(tokens, w["transformer.wte.weight"]) * math.sqrt(cfg.hidden_size)
    for i in range(cfg.prelude_layers):
        e = spec_block(e, w, f"transformer.prelude.{i}", cfg)
    s = torch.zeros_like(e)
    for _ in range(depth):
        s = torch.cat([s, e], dim=-1) @ w["transformer.adapter.weight"].T
        for i in range(cfg.core_layers):
            s = spec_block(s, w, f"transformer.core_block.{i}", cfg)
    x = spec_rms_norm(s, w["transformer.ln_f.weight"], cfg.norm_eps)
    for i in range(cfg.coda_layers):
        x = spec_block(x, w, f"transformer.coda.{i}", cfg)
    x = spec_rms_norm(x, w["transformer.ln_f.weight"], cfg.norm_eps)
    head = w["transformer.wte.weight"] if cfg.tie_embeddings else w["lm_head.weight"]  # tied in the spec
    return (x @ head.T).float()


@pytest.fixture
def model_and_weights(micro_model_config):
    model = build_model(micro_model_config, seed=0).eval()
    # non-trivial norm weights and q/k bias so the test sees them act
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "qk_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_eval_forward_equals_spec_written_out(model_and_weights, micro_model_config, depth):
    model, weights = model_and_weights
    tokens = torch.randint(0, micro_model_config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(depth))
    with torch.no_grad():
        ours = model(tokens, num_steps=depth, init_scale=0.0).logits
    expected = spec_forward(weights, micro_model_config, tokens, depth)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_depth_changes_the_output(model_and_weights, micro_model_config):
    model, _ = model_and_weights
    tokens = torch.randint(0, micro_model_config.vocab_size, (1, 8))
    with torch.no_grad():
        a, b = (model(tokens, num_steps=r, init_scale=0.0).logits for r in (1, 4))
    assert not torch.allclose(a, b)


def test_random_state_init_is_truncated_normal_times_sqrt_h(micro_model_config):
    model = build_model(micro_model_config, seed=0)
    e = torch.zeros(64, 32, micro_model_config.hidden_size)
    state = model.initial_state(e, init_scale=1.0)
    std = math.sqrt(2 / (5 * micro_model_config.hidden_size))
    scaled = state / math.sqrt(micro_model_config.hidden_size)
    assert scaled.abs().max() <= 3 * std + 1e-7
    assert abs(scaled.std().item() / std - 0.9866) < 0.02  # std of N(0, 1) truncated at +-3: 0.9866
    assert torch.count_nonzero(model.initial_state(e, init_scale=0.0)) == 0


def _loss_and_grads(model, tokens, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n,k", [(3, 2), (0, 3), (4, 1)])
def test_truncated_backprop_equals_full_backprop_through_last_k(micro_model_config, n, k):
    model = build_model(micro_model_config, seed=1)
    tokens = torch.randint(0, micro_model_config.vocab_size, (2, 9))
    labels = torch.roll(tokens, -1, 1)

    def ours():
        torch.manual_seed(7)
        return model(tokens, labels=labels, num_steps=(n, k)).loss

    def manual():
        # full autograd everywhere, the state detached after the first n iterations
        torch.manual_seed(7)
        cos_sin = model.cos_sin[:tokens.shape[1]]
        e = model.embed(tokens)
        for block in model.transformer.prelude:
            e = block(e, cos_sin)
        s = model.initial_state(e)
        for step in range(n):
            s = model.core_step(s, e, cos_sin, step=step)
        s = s.detach()
        for step in range(n, n + k):
            s = model.core_step(s, e, cos_sin, step=step)
        logits = model.kit.head_logits(model.decode(s, cos_sin), model.transformer.wte.weight)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    loss_a, grads_a = _loss_and_grads(model, tokens, ours)
    loss_b, grads_b = _loss_and_grads(model, tokens, manual)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


def _saved_tensor_count(model, tokens, num_steps) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels=tokens, num_steps=num_steps)
    return count


def test_no_autograd_graph_is_kept_for_the_no_grad_iterations(micro_model_config):
    model = build_model(micro_model_config, seed=2)
    tokens = torch.randint(0, micro_model_config.vocab_size, (1, 8))
    base = _saved_tensor_count(model, tokens, (0, 2))
    assert _saved_tensor_count(model, tokens, (20, 2)) == base
    assert _saved_tensor_count(model, tokens, (0, 4)) > base  # the count does see grad iterations


def test_activation_checkpointing_gives_the_same_gradients(micro_model_config):
    from dataclasses import replace

    tokens = torch.randint(0, micro_model_config.vocab_size, (2, 9))
    results = []
    for ckpt in (False, True):
        model = build_model(replace(micro_model_config, activation_checkpointing=ckpt), seed=3)
        results.append(_loss_and_grads(model, tokens, lambda: model(tokens, labels=tokens, num_steps=(2, 3)).loss))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)
    model = build_model(replace(micro_model_config, activation_checkpointing=True), seed=3)
    assert _saved_tensor_count(model, tokens, (0, 3)) < _saved_tensor_count(
        build_model(micro_model_config, seed=3), tokens, (0, 3))


def test_return_state_and_num_steps(micro_model_config):
    model = build_model(micro_model_config, seed=0)
    tokens = torch.randint(0, micro_model_config.vocab_size, (1, 5))
    out = model(tokens, num_steps=3, return_state=True, init_scale=0.0)
    assert out.num_steps == (3, 0) and out.state.shape == (1, 5, micro_model_config.hidden_size)
    with pytest.raises(ValueError, match="num_steps"):
        model(tokens, num_steps=(0, 0))


def test_untied_head_is_a_separate_lm_head(micro_model_config):
    from dataclasses import replace

    cfg = replace(micro_model_config, tie_embeddings=False)
    model = build_model(cfg, seed=4).eval()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert weights["lm_head.weight"].shape == weights["transformer.wte.weight"].shape
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        ours = model(tokens, num_steps=3, init_scale=0.0).logits
    torch.testing.assert_close(ours, spec_forward(weights, cfg, tokens, 3), rtol=1e-5, atol=1e-5)
    loss = model(tokens, labels=tokens, num_steps=(1, 2), return_logits=False).loss
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
