"""FLOPs accounting for recurrent depth: per depth, per training step (n, k), in
expectation over the depth sampler, and the MFU that follows from them.

The usual 6N per token is wrong here by an order of magnitude: the core block's
parameters are used r times per token. Everything is counted from the blocks' own
`flops_per_token` (matmuls only, as torch's FlopCounterMode counts them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rdp.pretrain.config import ConfigError, ModelConfig
from rdp.pretrain.sampler import DepthSampler

# dense bf16 peak per device (per die for MI250X), FLOP/s
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "mi250x": 191.5e12}


@dataclass(frozen=True)
class FlopsModel:
    """Forward FLOPs per token of each part; core and adapter for one iteration."""

    prelude: int
    core: int
    adapter: int
    coda: int
    head: int
    exit_gate: int = 0
    low_level: int = 0  # one update of HRM's low-level block (pretrain/hrm.py)
    low_level_steps: int = 0
    adapter_embedding: int = 0  # the embedding's half of the adapter: once per pass through the recurrence

    @classmethod
    def from_config(cls, cfg: ModelConfig, seq_len: Optional[int] = None, causal_skip: bool = False) -> "FlopsModel":
        from rdp.pretrain.model import build_model

        model = build_model(cfg, device="meta")
        return cls(**model.flops_per_token(seq_len or cfg.max_seq_len, causal_skip))

    @property
    def outside_core(self) -> int:
        return self.prelude + self.coda + self.head

    @property
    def per_iteration(self) -> int:
        return self.core + self.adapter + self.low_level_steps * self.low_level

    @property
    def per_iteration_backward(self) -> int:
        """Forward FLOPs of what one grad iteration backpropagates through: all of it, or for
        HRM's core the last low-level update and the high-level one (one-step gradient)."""
        return self.core + self.adapter + (self.low_level if self.low_level_steps else 0)

    def forward(self, depth: int, gated: bool = False) -> int:
        """One forward at `depth`; `gated`: the exit gate read after every iteration
        (evaluation with the learned exit, which decodes only once)."""
        return self.outside_core + self.adapter_embedding + depth * (self.per_iteration + (self.exit_gate if gated else 0))

    def train(self, n: int, k: int, recompute: bool = False, objective=None) -> int:
        """n no-grad iterations (forward only), k grad iterations (forward + 2x backward),
        plus one more forward of each grad iteration when activation checkpointing recomputes it.
        A training objective (pretrain.objectives.Objective) repeats this per segment (the
        prelude once), decodes (coda + head) after every grad iteration it supervises and runs
        the exit gate (forward 1x, backward 2x) on the states it weighs."""
        segments = objective.segments if objective is not None else 1
        decoded = objective.decoded(k) if objective is not None else 1
        gated = objective.gated(k) if objective is not None else 0
        decode = self.coda + self.head
        forward = self.adapter_embedding + (n + k) * self.per_iteration + decoded * decode + gated * self.exit_gate
        backward = 2 * ((self.adapter_embedding if k else 0) + k * self.per_iteration_backward
                        + decoded * decode + gated * self.exit_gate)
        recomputed = k * self.per_iteration if recompute else 0
        return 3 * self.prelude + segments * (forward + backward + recomputed)

    def expected_train(self, sampler: DepthSampler, recompute: bool = False, objective=None) -> float:
        """E[train FLOPs] over the sampler's distribution of depths (not at the mean depth;
        after any curriculum's ramp)."""
        s = sampler.backprop_depth
        return sum(prob * self.train(max(p - s, 0), min(s, p), recompute, objective)
                   for p, prob in sampler.distribution().items())


def device_peak_flops(override: float = 0.0) -> Optional[float]:
    """Peak dense bf16 FLOP/s of this process's device: the configured value, else the table."""
    if override > 0:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def throughput_metrics(flops: FlopsModel, n: int, k: int, tokens: int, seconds: float, recompute: bool,
                       peak: Optional[float], world_size: int = 1, objective=None) -> dict:
    """Per-device model FLOP/s, MFU and hardware FLOPs utilisation (recompute counted) of one step."""
    model_rate = flops.train(n, k, objective=objective) * tokens / seconds / world_size
    hardware_rate = flops.train(n, k, recompute, objective) * tokens / seconds / world_size
    record = {"model_flops_per_s": model_rate, "hardware_flops_per_s": hardware_rate}
    if peak:
        record.update(mfu=model_rate / peak, hfu=hardware_rate / peak)
    return record


def flops_report(cfg: ModelConfig, depths: list[int], seq_len: Optional[int] = None, objective_cfg=None) -> dict:
    """`objective_cfg` (config.objective): training FLOPs of that objective, not of plain
    truncated backprop."""
    from rdp.pretrain.model import build_model, materialized_parameters, parameter_counts
    from rdp.pretrain.objectives import Objective

    seq_len = seq_len or cfg.max_seq_len
    counts = parameter_counts(build_model(cfg, device="meta"))
    full = FlopsModel.from_config(cfg, seq_len)
    causal = FlopsModel.from_config(cfg, seq_len, causal_skip=True)
    sampler = DepthSampler.from_config(cfg, seed=0)
    recompute = cfg.activation_checkpointing
    objective = Objective.from_config(objective_cfg) if objective_cfg is not None else None
    materialized = {r: materialized_parameters(counts, r, cfg.low_level_steps) for r in depths}
    forward = {r: full.forward(r) for r in depths}
    report = {
        "seq_len": seq_len,
        "params_total": counts["total"],
        "params_by_part": {k: v for k, v in counts.items() if k != "total"},
        "params_materialized": materialized,
        "forward_flops_per_token": forward,
        "forward_flops_per_token_causal": {r: causal.forward(r) for r in depths},
        "flops_per_param": {r: forward[r] / counts["total"] for r in depths},
        "flops_per_materialized_param": {r: forward[r] / materialized[r] for r in depths},
        "train_flops_per_token": {f"{n},{k}": full.train(n, k, recompute, objective) for n, k in _training_points(cfg)},
        "train_flops_per_token_expected": full.expected_train(sampler, objective=objective),
        "train_flops_per_token_expected_with_recompute": full.expected_train(sampler, True, objective),
        "train_objective": objective_cfg.loss if objective_cfg is not None else "last",
        "train_segments": objective.segments if objective is not None else 1,
        "activation_checkpointing": recompute,
        "six_n_per_token": 6 * counts["total"],
    }
    if cfg.exit_gate:  # learned-exit evaluation reads the gate after every iteration
        report["forward_flops_per_token_gated"] = {r: full.forward(r, gated=True) for r in depths}
    return report


def _training_points(cfg: ModelConfig) -> list[tuple[int, int]]:
    k = cfg.mean_backprop_depth
    return [(0, k), (max(cfg.mean_recurrence - k, 0), k), (max(2 * cfg.mean_recurrence - k, 0), k)]


@dataclass
class TrainingPlan:
    total_flops: float
    seconds: float
    gpu_hours: float

    @property
    def days(self) -> float:
        return self.seconds / 86400


def plan_training(cfg: ModelConfig, tokens: float, gpus: int, gpu: str, mfu: float,
                  seq_len: Optional[int] = None, peak: float = 0.0, objective_cfg=None) -> TrainingPlan:
    if gpu.lower() not in PEAK_FLOPS and peak <= 0:
        raise ConfigError(f"--gpu {gpu!r}: unknown device (known: {', '.join(PEAK_FLOPS)}); give --peak-flops")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    from rdp.pretrain.objectives import Objective

    objective = Objective.from_config(objective_cfg) if objective_cfg is not None else None
    per_token = FlopsModel.from_config(cfg, seq_len).expected_train(DepthSampler.from_config(cfg, seed=0),
                                                                    objective=objective)
    total = per_token * tokens
    seconds = total / (gpus * (peak or PEAK_FLOPS[gpu.lower()]) * mfu)
    return TrainingPlan(total_flops=total, seconds=seconds, gpu_hours=seconds * gpus / 3600)
