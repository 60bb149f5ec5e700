"""Typed run configuration: dataclasses, YAML presets, command-line overrides.

OmegaConf's structured configs do the merging and type checking; this module adds the
value checks (an impossible value names its field) and preset lookup by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


@dataclass
class ModelConfig:
    hidden_size: int = 5280
    num_heads: int = 55
    vocab_size: int = 65536
    max_seq_len: int = 4096
    intermediate_size: int = 17920
    prelude_layers: int = 2
    core_layers: int = 4
    coda_layers: int = 2
    mean_recurrence: int = 32
    mean_backprop_depth: int = 8
    depth_sigma: float = 0.5
    rope_base: float = 50000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True
    # false: a separate output head (lm_head.weight) instead of the embedding's transpose
    tie_embeddings: bool = True
    # special tokens; null = unset (e.g. imported from a Huginn config.json that names none
    # inside its vocabulary); evaluation needs BOS and EOS
    bos_token_id: Optional[int] = 65504
    eos_token_id: Optional[int] = 65505
    end_turn_token_id: Optional[int] = 65508
    pad_token_id: Optional[int] = 65509
    # "takase" init multiplies this into every std; 1.0 is the spec.
    init_std_scale: float = 1.0
    # recompute each grad iteration of the core block in backward instead of storing it
    activation_checkpointing: bool = False
    # torch.compile the core iteration (one graph per grad mode serves every sampled (n, k)),
    # the prelude and the decoder; the first steps of a run pay the compile time
    compile: bool = False
    # auto: the PyTorch path (SDPA, torch ops), except Triton on CUDA for the ops a GPU run of
    # scripts/gpu_check.sh validated (kernels/dispatch.py VALIDATED_TRITON_OPS); triton | torch force one
    kernels: str = "auto"
    # a learned exit gate on the latent state (docs/objectives.md); trained by
    # objective.loss=expected_exit and/or objective.halting_weight, used by --exit-criterion learned
    exit_gate: bool = False
    # HRM's two-timescale core (pretrain/hrm.py): a low-level block of low_level_layers
    # layers iterated low_level_steps times per core iteration; 0 = the plain core
    low_level_steps: int = 0
    low_level_layers: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def effective_depth(self) -> int:
        low = self.low_level_layers * self.low_level_steps
        return self.prelude_layers + self.coda_layers + (self.core_layers + low) * self.mean_recurrence


@dataclass
class DataConfig:
    # "synthetic" generates token sequences from the seed; "webdataset" streams shards
    source: str = "synthetic"
    # one or more shard directories (each with manifest.json), mixed by weights
    paths: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    seq_len: int = 128
    num_workers: int = 0
    seed: int = 1234
    skip_corrupt: bool = False
    # tokenizer .model whose sha256 every manifest must carry ("" = do not check)
    tokenizer: str = ""
    # check each shard's sha256 the first time a process opens it
    verify_checksums: bool = True
    # BOS before every document; null: as the shards' manifests say. The trainer writes the
    # value it found into the run's config, so checkpoints tell evaluation how text was framed.
    add_bos: Optional[bool] = None
    # held-out shard directories for validation; empty: each path's validation/ subdirectory
    # (written by `rdp data shard --validation-fraction`), if every path has one
    validation_paths: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    max_steps: int = 20
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    lr: float = 4e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 4096
    schedule: str = "constant"  # constant | cosine
    weight_decay: float = 4e-5
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 | fp32
    seed: int = 0
    # without a terminal (SLURM logs, --no-progress) rank 0 prints a log line every N steps
    log_every: int = 1
    checkpoint_every: int = 128
    keep_last: int = 2
    # write checkpoints in the background after a snapshot (pretrain/checkpointing.py)
    async_checkpoint: bool = True
    keep_every: int = 0
    max_bad_steps: int = 5
    resume: str = "none"  # none | auto | PATH
    # under SLURM: checkpoint and stop this many minutes before the job's time limit (0: off)
    save_before_end_minutes: float = 0.0
    run_dir: str = "runs/default"
    # validation on held-out data at these test-time depths: every eval_every steps (0: only
    # at the end) into metrics.jsonl and TensorBoard, and as a table after training
    eval_depths: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    eval_batches: int = 2
    eval_every: int = 0
    # peak dense FLOP/s of one device; 0 = look the device up
    peak_flops: float = 0.0
    # Weights & Biases, beside metrics.jsonl and TensorBoard: on when a project is named;
    # offline writes RUN_DIR/wandb/ without network (upload later with `wandb sync`)
    wandb_project: str = ""
    wandb_mode: str = "online"  # online | offline
    wandb_entity: str = ""
    wandb_run_name: str = ""  # default: the run dir's name


@dataclass
class ObjectiveConfig:
    """What a training step optimises (docs/objectives.md). The defaults are plain truncated
    backprop: one loss after the last of the k grad iterations."""
    # last: loss after the final iteration | every: mean of the losses after each of the k
    # grad iterations (deep supervision) | expected_exit: expected loss under the exit gate's
    # distribution over the k grad iterations, minus exit_entropy_weight x its entropy
    loss: str = "last"
    exit_entropy_weight: float = 0.01
    # BCE of the exit gate against "this iteration's prediction is right" (HRM/TRM halting),
    # at every iteration the loss looks at; 0 = off
    halting_weight: float = 0.0
    # weight of the mean relative squared change of the state between consecutive grad
    # iterations, a pull toward a fixed point (against overthinking at large test depths); 0 = off
    fixed_point_weight: float = 0.0
    # HRM-style segments: the (n, k) recurrence runs this many times per batch, the state
    # carried but detached between segments, a loss after each; one optimizer step per batch
    segments: int = 1
    # recurrence curriculum: the sampler's mean recurrence rises from curriculum_start to
    # model.mean_recurrence over the first curriculum_steps steps (0 = off)
    curriculum_steps: int = 0
    curriculum: str = "linear"  # linear | 1-sqrt
    curriculum_start: float = 1.0


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    zero_stage: int = 0
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


def resolve_preset(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r}: no such file and no preset of that name (presets: {known})")


def load_yaml(path: str | Path):
    """OmegaConf.load, with a syntax error reported as one line naming the file and line."""
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown line"
        problem = getattr(exc, "problem", None) or _first_line(exc)
        raise ConfigError(f"config {path}: YAML syntax error at {where}: {problem}") from None


def _from_overrides(overrides: list[str]):
    import yaml

    for item in overrides:
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or _first_line(exc)
            raise ConfigError(f"override {item!r}: YAML syntax error in its value: {problem}") from None
    return OmegaConf.from_dotlist(overrides)


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML preset <- `key=value` overrides, then value checks."""
    schema = OmegaConf.structured(RunConfig)
    try:
        layers = [schema]
        if name_or_path is not None:
            path = resolve_preset(name_or_path)
            layers.append(load_yaml(path))
        if overrides:
            layers.append(_from_overrides(list(overrides)))
        merged = OmegaConf.merge(*layers)
        config: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" (source: {name_or_path})" if name_or_path else ""
        raise ConfigError(f"config field {key!r}: {_first_line(exc)}{where}") from None
    validate(config)
    return config


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its saved dict form (checkpoints, run dirs)."""
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config field {getattr(exc, 'full_key', None)!r}: {_first_line(exc)}") from None
    validate(config)
    return config


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def to_dict(config: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field {field_name!r}: {message}")


def validate(config: RunConfig) -> None:
    m, t, d, p = config.model, config.train, config.data, config.parallel
    for name in ("hidden_size", "num_heads", "vocab_size", "max_seq_len", "intermediate_size",
                 "core_layers", "mean_recurrence"):
        _require(getattr(m, name) > 0, f"model.{name}", f"must be positive, got {getattr(m, name)}")
    for name in ("prelude_layers", "coda_layers", "mean_backprop_depth", "low_level_steps"):
        _require(getattr(m, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(m, name)}")
    _require(m.low_level_layers >= 1 or m.low_level_steps == 0, "model.low_level_layers",
             f"must be >= 1 with model.low_level_steps={m.low_level_steps}, got {m.low_level_layers}")
    _require(m.hidden_size % m.num_heads == 0, "model.hidden_size",
             f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    _require(m.head_dim % 2 == 0, "model.num_heads",
             f"head dim {m.head_dim} must be even for rotary embeddings")
    _require(m.mean_backprop_depth <= m.mean_recurrence, "model.mean_backprop_depth",
             f"{m.mean_backprop_depth} exceeds model.mean_recurrence={m.mean_recurrence}")
    _require(m.depth_sigma > 0, "model.depth_sigma", f"must be positive, got {m.depth_sigma}")
    _require(m.norm_eps > 0, "model.norm_eps", f"must be positive, got {m.norm_eps}")
    _require(m.kernels in ("auto", "triton", "torch"), "model.kernels",
             f"must be auto, triton or torch, got {m.kernels!r}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "end_turn_token_id"):
        value = getattr(m, name)
        _require(value is None or 0 <= value < m.vocab_size, f"model.{name}",
                 f"{value} is outside the vocabulary [0, {m.vocab_size})")
    _require(d.source in ("synthetic", "webdataset") or d.source.startswith(("task:", "reasoning:")), "data.source",
             f"must be synthetic, webdataset or task:<built-in task or task directory>, got {d.source!r}")
    _require(d.source != "webdataset" or bool(d.paths), "data.paths",
             "data.source=webdataset needs at least one shard directory or URL")
    _require(0 < d.seq_len <= m.max_seq_len, "data.seq_len",
             f"{d.seq_len} must be in 1..model.max_seq_len={m.max_seq_len}")
    _require(not d.weights or len(d.weights) == len(d.paths), "data.weights",
             f"{len(d.weights)} weights for {len(d.paths)} paths")
    _require(all(w > 0 and math.isfinite(w) for w in d.weights), "data.weights", "must be positive")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _require(t.max_steps >= 0, "train.max_steps", f"must be >= 0, got {t.max_steps}")
    _require(t.micro_batch_size > 0, "train.micro_batch_size", f"must be positive, got {t.micro_batch_size}")
    _require(t.grad_accum_steps > 0, "train.grad_accum_steps", f"must be positive, got {t.grad_accum_steps}")
    _require(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"must be positive, got {t.lr}")
    _require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _require(t.schedule in ("constant", "cosine"), "train.schedule",
             f"must be constant or cosine, got {t.schedule!r}")
    _require(t.precision in ("bf16", "fp32"), "train.precision", f"must be bf16 or fp32, got {t.precision!r}")
    _require(t.wandb_mode in ("online", "offline"), "train.wandb_mode", f"must be online or offline, got {t.wandb_mode!r}")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1", "betas must be in [0, 1)")
    _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    _require(t.checkpoint_every > 0, "train.checkpoint_every", f"must be positive, got {t.checkpoint_every}")
    _require(t.keep_last >= 1, "train.keep_last", f"must be >= 1, got {t.keep_last}")
    _require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _require(t.save_before_end_minutes >= 0, "train.save_before_end_minutes",
             f"must be >= 0, got {t.save_before_end_minutes}")
    _require(t.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    _require(all(r >= 1 for r in t.eval_depths), "train.eval_depths", "depths must be >= 1")
    _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _require(t.eval_batches >= 1, "train.eval_batches", f"must be >= 1, got {t.eval_batches}")
    validate_objective(config.objective, m)
    _require(p.tensor_parallel >= 1, "parallel.tensor_parallel", f"must be >= 1, got {p.tensor_parallel}")
    _require(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0..3, got {p.zero_stage}")
    _require(p.backend in ("auto", "nccl", "gloo"), "parallel.backend",
             f"must be auto, nccl or gloo, got {p.backend!r}")


OBJECTIVE_LOSSES = ("last", "every", "expected_exit")
CURRICULA = ("linear", "1-sqrt")


def validate_objective(o: ObjectiveConfig, m: ModelConfig) -> None:
    _require(o.loss in OBJECTIVE_LOSSES, "objective.loss", f"must be one of {', '.join(OBJECTIVE_LOSSES)}, got {o.loss!r}")
    _require(o.segments >= 1, "objective.segments", f"must be >= 1, got {o.segments}")
    _require(o.exit_entropy_weight >= 0 and math.isfinite(o.exit_entropy_weight), "objective.exit_entropy_weight",
             f"must be >= 0, got {o.exit_entropy_weight}")
    _require(o.halting_weight >= 0 and math.isfinite(o.halting_weight), "objective.halting_weight",
             f"must be >= 0, got {o.halting_weight}")
    _require(o.fixed_point_weight >= 0 and math.isfinite(o.fixed_point_weight), "objective.fixed_point_weight",
             f"must be >= 0, got {o.fixed_point_weight}")
    trains_gate = o.loss == "expected_exit" or o.halting_weight > 0
    _require(m.exit_gate or not trains_gate, "model.exit_gate",
             f"objective.loss={o.loss} / objective.halting_weight={o.halting_weight} train an exit gate; set model.exit_gate=true")
    _require(trains_gate or not m.exit_gate, "model.exit_gate",
             "the exit gate would never be trained: set objective.loss=expected_exit or objective.halting_weight > 0")
    _require(o.curriculum in CURRICULA, "objective.curriculum", f"must be linear or 1-sqrt, got {o.curriculum!r}")
    _require(o.curriculum_steps >= 0, "objective.curriculum_steps", f"must be >= 0, got {o.curriculum_steps}")
    _require(0 < o.curriculum_start <= m.mean_recurrence, "objective.curriculum_start",
             f"{o.curriculum_start} must be in (0, model.mean_recurrence={m.mean_recurrence}]")
