"""Tensor parallelism through megatron-core: the LayerKit the model is built with at TP > 1
(and in the trainer at TP = 1 too, so there is one code path), and the mapping between a
full (single-device) state dict and each rank's shard.

Layout (the blocks read the same at any TP degree):
- attention Wqkv: column-parallel; the full output is [all q | all k | all v], rank r holds
  [q_r | k_r | v_r] for its heads, so sharding permutes rows (interleave=3);
- MLP fc: column-parallel, rank r holds [gate_r | up_r] (interleave=2);
- attention proj and MLP proj: row-parallel (input split, output all-reduced);
- embedding and head (tied, or untied with the same split): vocab-parallel, loss: vocab-parallel
  cross-entropy;
- qk_bias: split by heads; norms and the adapter: replicated.

Only the number of heads must divide by the TP degree. The intermediate size and the
vocabulary are padded up to a multiple of it: padded MLP channels are zero in and out (so
they get zero gradient and stay zero) and padded vocabulary logits are masked out of the
softmax, so a padded model computes exactly the function of the unpadded one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rdp.pretrain.config import ConfigError, ModelConfig
from rdp.pretrain.layers import trunc_normal_


# ---- which TP degrees a model admits --------------------------------------------------------
def valid_tensor_parallel_degrees(cfg: ModelConfig) -> list[int]:
    return [d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0 and cfg.hidden_size % d == 0]


def check_tensor_parallel(cfg: ModelConfig, tp: int, world_size: int | None = None) -> None:
    """Fail at start, naming the field and the degrees that would work."""
    works = valid_tensor_parallel_degrees(cfg)
    if tp not in works:
        raise ConfigError(
            f"config field 'parallel.tensor_parallel': {tp} cannot split model.num_heads={cfg.num_heads} "
            f"(hidden {cfg.hidden_size}) into equal parts; degrees that work: {', '.join(map(str, works))}")
    if world_size is not None and world_size % tp != 0:
        raise ConfigError(f"config field 'parallel.tensor_parallel': {tp} does not divide the "
                          f"{world_size} launched processes (world size must be a multiple of it)")


def padded(size: int, tp: int) -> int:
    return math.ceil(size / tp) * tp


# ---- how a full tensor maps onto ranks -------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """A tensor split along `dim`, made of `parts` equal blocks of `part_size` rows each (e.g.
    [q|k|v]); every block is zero-padded to `padded_size` and rank r holds slice r of every
    block, concatenated."""
    dim: int
    part_size: int
    padded_size: int
    parts: int = 1

    def shard(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        if full.shape[self.dim] != self.parts * self.part_size:
            raise ValueError(f"expected size {self.parts * self.part_size} along dim {self.dim}, got {tuple(full.shape)}")
        local = self.padded_size // tp
        pieces = []
        for block in full.chunk(self.parts, dim=self.dim):
            pad = self.padded_size - self.part_size
            if pad:
                shape = list(block.shape)
                shape[self.dim] = pad
                block = torch.cat([block, block.new_zeros(shape)], dim=self.dim)
            pieces.append(block.narrow(self.dim, rank * local, local))
        return torch.cat(pieces, dim=self.dim).contiguous()

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        split = [s.chunk(self.parts, dim=self.dim) for s in shards]
        blocks = [torch.cat([rank_parts[i] for rank_parts in split], dim=self.dim).narrow(self.dim, 0, self.part_size)
                  for i in range(self.parts)]
        return torch.cat(blocks, dim=self.dim).contiguous()


def shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """Parameter name -> how it is split; names not listed are replicated."""
    specs = {}
    for name, module in model.named_modules():
        spec = getattr(module, "shard_spec", None)
        if spec is not None:
            specs[f"{name}.weight"] = spec
    heads = model.config.num_heads
    for name, _ in model.named_parameters():
        if name.endswith("attn.qk_bias"):
            specs[name] = ShardSpec(dim=2, part_size=heads, padded_size=heads)
    return specs


def shard_state_dict(full: dict[str, torch.Tensor], specs: dict[str, ShardSpec], rank: int, tp: int) -> dict[str, torch.Tensor]:
    return {name: specs[name].shard(t, rank, tp) if name in specs else t for name, t in full.items()}


def unshard_state_dicts(shards: list[dict[str, torch.Tensor]], specs: dict[str, ShardSpec]) -> dict[str, torch.Tensor]:
    first = shards[0]
    return {name: specs[name].unshard([s[name] for s in shards]) if name in specs else t for name, t in first.items()}


def mark_tensor_parallel(model: nn.Module) -> None:
    """Tag sharded parameters the way megatron-core does, so DeepSpeed (through the mpu)
    counts them once per TP rank and replicated ones once per TP group in the grad norm."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    specs = shard_specs(model)
    for name, param in model.named_parameters():
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(param, attr):
                delattr(param, attr)
        spec = specs.get(name)
        set_tensor_model_parallel_attributes(param, spec is not None, spec.dim if spec else -1, 1)


# ---- the kit -----------------------------------------------------------------------------------
def _init_method(std: float):
    return lambda tensor: trunc_normal_(tensor, std)


class MegatronLayers:
    """LayerKit over megatron-core tensor-parallel layers for the current parallel_state."""

    def __init__(self, params_dtype: torch.dtype = torch.float32, use_cpu_initialization: bool | None = None):
        from megatron.core import ModelParallelConfig, parallel_state

        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if use_cpu_initialization is None:
            use_cpu_initialization = not torch.cuda.is_available()
        # weights are loaded from the full model's shard afterwards (same init at any TP),
        # so megatron's own initialisation would be wasted work
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size, params_dtype=params_dtype,
            use_cpu_initialization=use_cpu_initialization, perform_initialization=False,
            gradient_accumulation_fusion=False)
        self.vocab_size: int | None = None

    def column_linear(self, in_features: int, out_features: int, init_std: float, interleave: int = 1) -> nn.Module:
        part = out_features // interleave
        spec = ShardSpec(dim=0, part_size=part, padded_size=padded(part, self.tp_size), parts=interleave)
        layer = _ColumnLinear(in_features, spec.padded_size * interleave, config=self.config,
                              init_method=_init_method(init_std), bias=False, gather_output=False)
        layer.shard_spec, layer.init_std = spec, init_std
        return layer

    def row_linear(self, in_features: int, out_features: int, init_std: float) -> nn.Module:
        spec = ShardSpec(dim=1, part_size=in_features, padded_size=padded(in_features, self.tp_size))
        layer = _RowLinear(spec.padded_size, out_features, config=self.config, init_method=_init_method(init_std),
                           bias=False, input_is_parallel=True, skip_bias_add=False)
        layer.shard_spec, layer.init_std = spec, init_std
        return layer

    def embedding(self, vocab_size: int, hidden_size: int, init_std: float) -> nn.Module:
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.vocab_size = vocab_size
        spec = ShardSpec(dim=0, part_size=vocab_size, padded_size=padded(vocab_size, self.tp_size))
        layer = VocabParallelEmbedding(spec.padded_size, hidden_size, init_method=_init_method(init_std), config=self.config)
        layer.shard_spec, layer.init_std = spec, init_std
        return layer

    def head(self, vocab_size: int, hidden_size: int, init_std: float) -> nn.Module:
        """An untied output head: a vocab-parallel weight split exactly like the embedding's."""
        return self.embedding(vocab_size, hidden_size, init_std)

    def head_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the fp32 logits (padding masked to -inf)."""
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        logits = F.linear(copy_to_tensor_model_parallel_region(x), weight).float()
        local = weight.shape[0]
        first = self.tp_rank * local
        if self.vocab_size is not None and first + local > self.vocab_size:
            keep = max(0, self.vocab_size - first)
            logits = torch.cat([logits[..., :keep], torch.full_like(logits[..., keep:], float("-inf"))], dim=-1)
        return logits

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        valid = labels != -100
        per_token = vocab_parallel_cross_entropy(logits, labels.masked_fill(~valid, 0))
        return (per_token * valid).sum() / valid.sum()

    def token_losses(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy (0 where not scored) and whether the label's logit is the
        largest over the whole vocabulary (maxima all-reduced over the TP group)."""
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = self.head_logits(x, weight)
        valid = labels != -100
        with torch.no_grad():  # before the cross-entropy, which may shift the logits in place
            local = logits.shape[-1]
            index = labels - self.tp_rank * local
            mine = valid & (index >= 0) & (index < local)
            label_logit = logits.gather(-1, index.clamp(0, local - 1)[..., None])[..., 0]
            label_logit = label_logit.masked_fill(~mine, float("-inf"))
            best = logits.max(-1).values
            if self.tp_size > 1:
                group = parallel_state.get_tensor_model_parallel_group()
                both = torch.stack([label_logit, best])
                dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
                label_logit, best = both.unbind(0)
            correct = label_logit >= best
        per_token = vocab_parallel_cross_entropy(logits, labels.masked_fill(~valid, 0))
        return per_token * valid, correct

    def loss(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ops) -> torch.Tensor:
        """At TP=1 the kernel backend's chunked head + cross-entropy (no full fp32 logits);
        with the vocabulary split, megatron's vocab-parallel cross-entropy."""
        if self.tp_size == 1 and weight.shape[0] == self.vocab_size:
            return ops.linear_cross_entropy(x, weight, labels)
        return self.cross_entropy(self.head_logits(x, weight), labels)


@functools.cache
def _column_linear_class():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        """Returns the tensor alone: blocks see what a plain nn.Linear gives them."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    return ColumnLinear


@functools.cache
def _row_linear_class():
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowLinear(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    return RowLinear


def _ColumnLinear(*args, **kwargs):  # noqa: N802 - built lazily: importing megatron costs seconds
    return _column_linear_class()(*args, **kwargs)


def _RowLinear(*args, **kwargs):  # noqa: N802
    return _row_linear_class()(*args, **kwargs)


# ---- building a sharded model with the single-device init ------------------------------------------
def local_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without megatron's empty `_extra_state` entries."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def build_parallel_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu",
                         full_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The model on megatron layers for the current parallel_state, holding this rank's shard
    of the model `build_model(cfg, seed=seed)` creates, at any TP degree. It is built on the
    meta device and only the local shard is allocated and drawn (pretrain/init_weights.py):
    no rank ever holds the full model. With `full_state`, the shard is cut from it instead."""
    from megatron.core import parallel_state

    from rdp.kernels.reference import rope_cos_sin
    from rdp.pretrain.init_weights import initialize
    from rdp.pretrain.model import build_model

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    check_tensor_parallel(cfg, tp)
    model = build_model(cfg, "meta", kit=MegatronLayers(use_cpu_initialization=True))  # tensors follow the device
    model.to_empty(device=device)
    specs = shard_specs(model)
    if full_state is None:
        initialize(model, seed, specs, rank, tp)
    else:
        local = shard_state_dict(full_state, specs, rank, tp)
        missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in local.items()}, strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    model.cos_sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, device)
    mark_tensor_parallel(model)
    return model


def gather_full_state_dict(tensors: Iterable[tuple[str, torch.Tensor]], specs: dict[str, ShardSpec],
                           device: torch.device | str = "cpu", keep: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """All ranks of the TP group call this. Returns the full (single-device) fp32 tensors on
    the CPU, kept only where `keep` (one writer needs them, not every rank: a full 3.5B copy
    per rank would not fit a node's memory), and whether every tensor was finite. One tensor
    at a time, so a rank never holds more than one full tensor on the device."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    full, finite = {}, True
    for name, source in tensors:
        tensor = source.detach().float()
        if name in specs and tp > 1:
            local = tensor.to(device).contiguous()  # NCCL gathers device tensors only
            pieces = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(pieces, local, group=group)
            tensor = specs[name].unshard(pieces)
        finite = finite and bool(torch.isfinite(tensor).all())
        if keep:
            tensor = tensor.cpu()
            # a copy, never the live weight: the checkpoint is written while training goes on
            full[name] = tensor.clone() if tensor.data_ptr() == source.data_ptr() else tensor
    return full, finite
