"""The DeepSpeed engine a run trains on: its JSON config from the typed RunConfig, the
optimizer (AdamW, decoupled decay except on norms and biases, able to skip a non-finite
step), and the watch on gradients that decides such a skip before any weight moves.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from rdp.pretrain.config import RunConfig


def no_decay(name: str) -> bool:
    # the spec decays matrices and the embedding, never norms or biases
    return "norm" in name or "ln_f" in name or "bias" in name


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warm-up, then constant or cosine down to min_lr_ratio at max_steps. A pure
    function of the step, so a resumed run follows the same schedule with no state."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SkippableAdamW(torch.optim.AdamW):
    """AdamW that leaves weights and moments untouched while `skip` is set. DeepSpeed (every
    ZeRO stage, bf16 or not) reaches the weights only through this step, so skipping here
    skips the update everywhere, with DeepSpeed's own bookkeeping still advancing."""

    skip = False

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        # a per-group step count (as DeepSpeed's own Adam keeps) lets ZeRO-1/2 save the
        # "elastic" optimizer state that can be re-split over another number of DP ranks
        for group in self.param_groups:
            group.setdefault("step", 0)

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip:
            return None
        loss = super().step(closure)
        for group in self.param_groups:
            group["step"] += 1
        return loss


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> SkippableAdamW:
    t = cfg.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": t.weight_decay},
              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return SkippableAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, fused=fused or None)


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    t, p = cfg.train, cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.zero_stage in (1, 2):
        # optimizer state saved unpadded per parameter group, so a resume may use another DP size
        zero["elastic_checkpoint"] = True
    if p.zero_stage == 3:
        # gather the tiny model's parameters in one go; the defaults suit billions
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # SkippableAdamW is torch's AdamW plus a guard
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL"},
    }


class GradientWatch:
    """Marks whether any gradient of this optimizer step was non-finite. Tensor hooks see each
    parameter's gradient as autograd produces it, before DeepSpeed reduces or partitions it,
    so the check is the same at every ZeRO stage and costs no host sync until `bad()`."""

    def __init__(self, model: torch.nn.Module):
        self.flags: list[torch.Tensor] = []
        self.handles = [p.register_hook(self._check) for p in model.parameters() if p.requires_grad]

    def _check(self, grad: torch.Tensor) -> None:
        self.flags.append(~torch.isfinite(grad).all())

    def bad_local(self, device: torch.device) -> torch.Tensor:
        bad = torch.stack(self.flags).any() if self.flags else torch.zeros((), dtype=torch.bool)
        self.flags.clear()
        return bad.to(device)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class LossOnly(torch.nn.Module):
    """What the engine wraps: the model, returning its loss as a plain tensor. ZeRO-3 hooks
    the module's outputs to know when backward reaches it, and it can only see tensors.
    In training mode the loss is the run's objective (pretrain.objectives); in eval mode the
    plain loss after the last iteration."""

    def __init__(self, model: torch.nn.Module, objective=None):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor], num_steps, init_scale: float = 1.0,
                generator: Optional[torch.Generator] = None, return_logits: bool = False) -> torch.Tensor:
        if return_logits:  # validation of reasoning tasks: this TP rank's vocabulary slice
            return self.model(input_ids, num_steps=num_steps, init_scale=init_scale, generator=generator).logits
        return self.model(input_ids, labels=labels, num_steps=num_steps, init_scale=init_scale,
                          return_logits=False, generator=generator,
                          objective=self.objective if self.training else None).loss


def build_engine(model: torch.nn.Module, cfg: RunConfig, dp_size: int, mpu):
    import deepspeed

    from rdp.pretrain.objectives import Objective

    optimizer = build_optimizer(model, cfg)
    wrapped = LossOnly(model, Objective.from_config(cfg.objective))
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, mpu=mpu,
                                           config=deepspeed_config(cfg, dp_size))
    if cfg.parallel.zero_stage == 3:
        # used outside their own module's forward (tied head, fused injection): ZeRO-3 must
        # keep them gathered for the whole forward and backward
        for param in {id(p): p for p in (model.head_weight, model.transformer.wte.weight,
                                          model.transformer.adapter.weight)}.values():
            deepspeed.zero.register_external_parameter(engine.module, param)
    return engine, optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def fp32_parameters(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) for every parameter, this TP rank's shard, complete over DP: the
    optimizer's fp32 master copy where one exists (bf16, ZeRO), else the weight itself.
    Lazy, and collective under ZeRO (every DP rank must consume it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in engine.module.model.named_parameters():
        full = safe_get_full_fp32_param(param)
        yield name, (full if full is not None else param.detach()).float()
