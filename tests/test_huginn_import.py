"""Checkpoints written by the reference huginn-0125 code import, and rdp's exports keep its layout.

`reference_config_json` is the config.json the reference `RavenConfig.save_pretrained` writes for
a small custom model (seen with transformers 4.57): no special-token ids at all, `dtype` instead
of `torch_dtype`, the RoPE table stored as `freqs_cis`, and `lm_head.weight` stored only when the
head is untied. (Logits of such an import equal the reference model's up to float rounding,
about 1e-6: rdp sums the adapter's state and embedding halves separately; that check needs the
reference code, see benchmarks/bench_reference.py --reference-dir.)
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from rdp.launch.cli import main as rdp
from rdp.pretrain.checkpoint import load_model
from rdp.pretrain.convert import ConversionError, load_huginn, model_config_from_huginn, save_huginn
from rdp.pretrain.model import build_model
from rdp.kernels.reference import rope_cos_sin
from test_model import spec_forward


def reference_config_json(cfg, tie: bool) -> dict:
    return {
        "activation_checkpoint_impl": "per-iteration", "architecture_class_name": "RecurrentGPT",
        "architectures": ["RavenForCausalLM"],
        "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                     "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
        "bias": False, "block_class_name": "SandwichBlock", "block_size": cfg.max_seq_len, "dtype": "float32",
        "effective_expected_depth": cfg.effective_depth, "head_dim": cfg.head_dim, "init_orthogonal": False,
        "init_strategy": "takase", "init_values": {"embed_scale": cfg.hidden_size ** 0.5},
        "injection_type": "linear", "intermediate_size": cfg.intermediate_size,
        "mean_backprop_depth": cfg.mean_backprop_depth, "mean_recurrence": cfg.mean_recurrence,
        "mlp_class_name": "GatedMLP", "model_type": "huginn_raven", "n_embd": cfg.hidden_size,
        "n_heads": cfg.num_heads, "n_layers": cfg.prelude_layers + cfg.core_layers + cfg.coda_layers,
        "n_layers_in_coda": cfg.coda_layers, "n_layers_in_prelude": cfg.prelude_layers,
        "n_layers_in_recurrent_block": cfg.core_layers, "nonlin_name": "SiLU", "norm_class_name": "RMSNorm_llama",
        "norm_eps": 1e-06, "num_key_value_heads": cfg.num_heads, "padded_vocab_size": cfg.vocab_size,
        "padding_multiple": 4096, "qk_bias": True, "rope_base": 50000,
        "sampling_scheme": "poisson-lognormal-filling", "state_init": "like-init", "test_time_noise": 0,
        "test_time_noise_type": "fixed", "tie_embeddings": tie, "transformers_version": "4.57.6",
        "vocab_size": cfg.vocab_size,
    }


@pytest.fixture
def small_config(micro_model_config):
    # 512 tokens: the huginn-0125 special ids (65504 ...) do not fit
    return replace(micro_model_config, vocab_size=512, bos_token_id=None, eos_token_id=None,
                   end_turn_token_id=None, pad_token_id=None)


def write_reference_layout(directory, cfg, tie: bool) -> dict[str, torch.Tensor]:
    model = build_model(replace(cfg, tie_embeddings=tie), seed=5)
    with torch.no_grad():  # norms and q/k bias away from their init, so the test sees them act
        for name, p in model.named_parameters():
            if "norm" in name or "qk_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    directory.mkdir(parents=True)
    # the reference stores its RoPE table as (1, seq, 1, head_dim / 2, 2); import ignores it
    freqs_cis = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, 50000.0)[None, :, None].contiguous()
    save_file({**weights, "freqs_cis": freqs_cis},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(reference_config_json(cfg, tie), indent=2))
    return weights


@pytest.mark.parametrize("tie", [True, False])
def test_reference_layout_without_special_ids_imports_with_spec_logits(tmp_path, small_config, tie):
    weights = write_reference_layout(tmp_path / "hf", small_config, tie)
    assert rdp(["convert", "from-huginn", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    imported, converted = load_huginn(tmp_path / "hf"), load_model(tmp_path / "run")
    for model in (imported, converted):
        m = model.config
        assert (m.bos_token_id, m.eos_token_id, m.end_turn_token_id, m.pad_token_id) == (None, None, None, None)
        assert m.tie_embeddings is tie and (model.lm_head is None) is tie
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = spec_forward(weights, replace(small_config, tie_embeddings=tie), tokens, 3)
    with torch.no_grad():
        for model in (imported, converted):
            torch.testing.assert_close(model(tokens, num_steps=3, init_scale=0.0).logits, expected,
                                       rtol=1e-5, atol=1e-5)
    # and back out in the same layout: the untied head is its own tensor, the tied one equals wte
    assert rdp(["convert", "to-huginn", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["tie_embeddings"] is tie and "bos_token_id" not in config
    assert torch.equal(back["lm_head.weight"], weights["lm_head.weight" if not tie else "transformer.wte.weight"])


def test_special_ids_are_filled_only_where_they_fit(micro_model_config, tmp_path):
    def ids(vocab: int, **given):
        data = {**reference_config_json(replace(micro_model_config, vocab_size=vocab), True), **given}
        m = model_config_from_huginn(data, tmp_path / "config.json")
        return m.bos_token_id, m.eos_token_id, m.end_turn_token_id, m.pad_token_id

    assert ids(65536) == (65504, 65505, 65508, 65509)
    assert ids(65506) == (65504, 65505, None, None)
    assert ids(512) == (None, None, None, None)
    assert ids(512, bos_token_id=1, eos_token_id=2, pad_token_id=None) == (1, 2, None, None)
    with pytest.raises(Exception, match="model.eos_token_id.*outside the vocabulary"):
        ids(512, eos_token_id=600)


@pytest.mark.parametrize("field,value", [("injection_type", "add"), ("bias", True), ("nonlin_name", "GELU"),
                                         ("padded_vocab_size", 1024)])
def test_another_architecture_is_refused_not_imported(tmp_path, small_config, field, value):
    write_reference_layout(tmp_path / "hf", small_config, True)
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**data, field: value}))
    with pytest.raises(ConversionError, match=f"'{field}'"):
        load_huginn(tmp_path / "hf")


def test_untied_config_without_a_head_is_refused(tmp_path, small_config):
    write_reference_layout(tmp_path / "hf", small_config, False)
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError, match="tie_embeddings=false: a separate lm_head.weight is needed"):
        load_huginn(tmp_path / "hf")


def test_tied_export_still_stores_the_head_twice(tmp_path, small_config):
    save_huginn(build_model(small_config, seed=0), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
