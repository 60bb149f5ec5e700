"""Import and export of the Huginn (huginn-0125) checkpoint layout: config.json plus
safetensors weights, single-file or sharded with model.safetensors.index.json.

Our module names are the Huginn names, so the mapping is the identity except for the
tied head (stored again as lm_head.weight; an untied model has its own) and the stored RoPE
table (ignored on import).
A learned exit gate (model.exit_gate) has no counterpart in huginn-0125: it is written as
`transformer.exit_gate.{weight,bias}` with `"rdp_exit_gate": true` in config.json, read back
by this importer; Huginn's own modelling code ignores both (it exits by its own criteria).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rdp.pretrain.config import ModelConfig, RunConfig, validate
from rdp.pretrain.model import RecurrentDepthModel, build_model, model_from_state_dict

HF_FIELDS = {  # Huginn config.json field -> ModelConfig field
    "n_embd": "hidden_size",
    "n_heads": "num_heads",
    "vocab_size": "vocab_size",
    "block_size": "max_seq_len",
    "intermediate_size": "intermediate_size",
    "n_layers_in_prelude": "prelude_layers",
    "n_layers_in_recurrent_block": "core_layers",
    "n_layers_in_coda": "coda_layers",
    "mean_recurrence": "mean_recurrence",
    "mean_backprop_depth": "mean_backprop_depth",
    "rope_base": "rope_base",
    "norm_eps": "norm_eps",
    "qk_bias": "qk_bias",
    "tie_embeddings": "tie_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "end_turn_token_id": "end_turn_token_id",
}
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "end_turn_token_id")
# fields of the reference config that select another architecture than the one implemented
# here; a file that sets one of them otherwise is refused, not imported as a different function
ARCHITECTURE = {
    "bias": False,
    "injection_type": "linear",
    "block_class_name": "SandwichBlock",
    "norm_class_name": "RMSNorm_llama",
    "mlp_class_name": "GatedMLP",
    "nonlin_name": "SiLU",
    "state_init": "like-init",
    "test_time_noise": 0,
}
IGNORED_WEIGHTS = ("freqs_cis",)


class ConversionError(ValueError):
    user_facing = True


def huginn_config(cfg: ModelConfig) -> dict:
    out = {hf: getattr(cfg, ours) for hf, ours in HF_FIELDS.items()}
    out.update({
        "architectures": ["RavenForCausalLM"],
        "model_type": "huginn_raven",
        "n_layers": cfg.prelude_layers + cfg.core_layers + cfg.coda_layers,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "effective_expected_depth": cfg.effective_depth,
        "init_values": {"std": (2 / (5 * cfg.hidden_size)) ** 0.5, "embed_scale": cfg.hidden_size ** 0.5},
        "padded_vocab_size": cfg.vocab_size,
        **ARCHITECTURE,
        "torch_dtype": "float32",
    })
    if cfg.exit_gate:
        out["rdp_exit_gate"] = True
    return {k: v for k, v in out.items() if v is not None}  # an unset special id is left out


def model_config_from_huginn(data: dict, source: Path) -> ModelConfig:
    """Our ModelConfig for a Huginn config.json (as the reference `save_pretrained` writes it).

    A special-token id the file does not give (the reference writes none for a custom model)
    takes the huginn-0125 value only where that fits the vocabulary, else stays unset."""
    cfg = ModelConfig()
    for hf, ours in HF_FIELDS.items():
        if data.get(hf) is not None:
            kind = float if ours in ("rope_base", "norm_eps") else bool if ours in ("qk_bias", "tie_embeddings") else int
            setattr(cfg, ours, kind(data[hf]))
        elif hf in ("n_embd", "n_heads", "vocab_size", "intermediate_size"):
            raise ConversionError(f"{source}: config.json lacks the field {hf!r}")
        elif ours in SPECIAL_IDS:
            default = getattr(cfg, ours)
            setattr(cfg, ours, default if default is not None and default < cfg.vocab_size else None)
    for hf, implemented in ARCHITECTURE.items():
        if hf in data and data[hf] != implemented:
            raise ConversionError(f"{source}: field {hf!r} is {data[hf]!r}; this model implements only "
                                  f"{implemented!r} (the huginn-0125 architecture)")
    if data.get("padded_vocab_size", cfg.vocab_size) != cfg.vocab_size:
        raise ConversionError(f"{source}: field 'padded_vocab_size' {data['padded_vocab_size']} differs from "
                              f"vocab_size {cfg.vocab_size}")
    cfg.exit_gate = bool(data.get("rdp_exit_gate", False))
    if data.get("num_key_value_heads", cfg.num_heads) != cfg.num_heads:
        raise ConversionError(f"{source}: field 'num_key_value_heads' must equal n_heads (no GQA in this family)")
    validate(run_config_for(cfg))
    return cfg


def run_config_for(cfg: ModelConfig) -> RunConfig:
    """A valid run config around an imported model (a gate implies an objective that trains it)."""
    run = RunConfig(model=cfg)
    run.data.seq_len = min(run.data.seq_len, cfg.max_seq_len)
    if cfg.exit_gate:
        run.objective.loss = "expected_exit"
    return run


def read_safetensors(directory: Path, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{directory}: no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def load_huginn(path: str | Path, device: str | torch.device = "cpu",
                dtype: Optional[torch.dtype] = None) -> RecurrentDepthModel:
    """A ready model from a Huginn-layout directory (config.json + safetensors)."""
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{directory}: no config.json (not a Huginn-layout checkpoint)")
    cfg = model_config_from_huginn(json.loads(config_path.read_text()), config_path)
    state = read_safetensors(directory, dtype)
    # tied: the head may be stored again (as released) and must then equal the embedding
    head = state.pop("lm_head.weight", None) if cfg.tie_embeddings else None
    for key in IGNORED_WEIGHTS:
        state.pop(key, None)
    expected = set(build_model(cfg, device="meta").state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        untied = " (config.json says tie_embeddings=false: a separate lm_head.weight is needed)" \
            if "lm_head.weight" in missing else ""
        raise ConversionError(f"{directory}: weights do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}{untied}")
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise ConversionError(f"{directory}: lm_head.weight differs from transformer.wte.weight, "
                              "but config.json says tie_embeddings")
    for name, tensor in state.items():
        if name == "transformer.wte.weight" and tensor.shape[0] != cfg.vocab_size:
            raise ConversionError(f"{directory}: {name} has {tensor.shape[0]} rows, config vocab_size={cfg.vocab_size}")
    return model_from_state_dict(cfg, state, device).eval()


def save_huginn(model: RecurrentDepthModel, path: str | Path) -> Path:
    if model.config.low_level_steps:
        raise ConversionError(f"model.low_level_steps={model.config.low_level_steps}: the Huginn layout has no "
                              "two-timescale (HRM) core; this model cannot be exported to it")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # tied, stored twice as released
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(huginn_config(model.config), indent=2))
    return directory


def export_huginn(checkpoint: str | Path, output: str | Path) -> Path:
    """The weights, and the run's tokenizer with a tokenizer_config.json saying whether
    training put BOS before each document (config data.add_bos)."""
    from rdp.data_pipeline.tokenizer import export_tokenizer, find_checkpoint_tokenizer
    from rdp.pretrain.checkpoint import CONFIG_FILE, load_model, resolve_checkpoint
    from rdp.pretrain.config import load_config

    directory = resolve_checkpoint(checkpoint)
    model = load_model(directory)
    save_huginn(model, output)
    tokenizer = find_checkpoint_tokenizer(directory)
    if tokenizer is not None:
        m = model.config
        export_tokenizer(tokenizer, output, bool(load_config(directory / CONFIG_FILE).data.add_bos),
                         m.bos_token_id, m.eos_token_id, m.pad_token_id)
    return Path(output)


def import_huginn(source: str | Path, output: str | Path) -> Path:
    from rdp.data_pipeline.tokenizer import import_tokenizer
    from rdp.pretrain.checkpoint import save_model_weights

    model = load_huginn(source)
    config = run_config_for(model.config)
    Path(output).mkdir(parents=True, exist_ok=True)
    config.data.add_bos = import_tokenizer(source, output)  # evaluation frames text as huginn was trained
    save_model_weights(model, Path(output), config)
    return Path(output)
