"""The training loop: (n, k) = sampler(step); loss = model(batch, num_steps=(n, k));
backward; clip; step. Single process here; the distributed engine builds on it."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipeline import build_stream
from pretrain.checkpoint import (CONFIG_FILE, LATEST_POINTER, checkpoint_name, resolve_checkpoint,
                                 save_model_weights)
from pretrain.config import RunConfig, to_yaml
from pretrain.model import RecurrentDepthModel, build_model
from pretrain.sampler import DepthSampler

TRAINER_STATE_FILE = "trainer_state.pt"


class TrainingError(RuntimeError):
    user_facing = True


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    losses: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)


def no_decay(name: str) -> bool:
    # the spec decays matrices and the embedding, never norms or biases
    return "norm" in name or "ln_f" in name or "bias" in name


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    decay = [p for n, p in model.named_parameters() if not no_decay(n)]
    plain = [p for n, p in model.named_parameters() if no_decay(n)]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warm-up, then constant or cosine down to min_lr_ratio at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(cfg: RunConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")


class Trainer:
    def __init__(self, config: RunConfig, device: str | torch.device = "cpu", progress: bool = True):
        self.config = config
        self.device = torch.device(device)
        self.progress = progress
        self.run_dir = Path(config.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.model: RecurrentDepthModel = build_model(config.model, self.device, seed=config.train.seed)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.sampler = DepthSampler.from_config(config.model, config.train.seed)
        self.stream = build_stream(config.data, config.model.vocab_size, config.train.micro_batch_size)
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps_in_row = 0
        self.skipped_steps = 0

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write under a temporary name, publish by rename, move "latest" last."""
        final = self.ckpt_dir / checkpoint_name(self.step)
        staging = self.ckpt_dir / f".tmp-{final.name}"
        shutil.rmtree(staging, ignore_errors=True)
        save_model_weights(self.model, staging, self.config)
        torch.save({
            "step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "data": self.stream.state_dict(), "sampler_seed": self.sampler.seed,
            "rng": {"torch": torch.get_rng_state()},
        }, staging / TRAINER_STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = self.ckpt_dir / f".{LATEST_POINTER}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, self.ckpt_dir / LATEST_POINTER)
        self._prune_checkpoints()
        return final

    def _prune_checkpoints(self) -> None:
        t = self.config.train
        steps = sorted(int(p.name.split("_")[1]) for p in self.ckpt_dir.glob("step_*"))
        keep = set(steps[-t.keep_last:]) | {s for s in steps if t.keep_every and s % t.keep_every == 0}
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.ckpt_dir / checkpoint_name(s), ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        directory = resolve_checkpoint(path)
        self.model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
        state = torch.load(directory / TRAINER_STATE_FILE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def maybe_resume(self) -> None:
        resume = self.config.train.resume
        if resume == "none":
            return
        if resume == "auto":
            if not (self.ckpt_dir / LATEST_POINTER).exists():
                return
            resume = str(self.ckpt_dir)
        self.load_checkpoint(resume)

    # ---- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.config.train
        n, k = self.sampler(self.step)
        self.model.train()
        total_loss = 0.0
        for _ in range(cfg.grad_accum_steps):
            inputs, labels = (t.to(self.device) for t in self.stream.next_batch())
            with autocast(self.config, self.device):
                loss = self.model(inputs, labels=labels, num_steps=(n, k), return_logits=False).loss
            (loss / cfg.grad_accum_steps).backward()
            total_loss += loss.item() / cfg.grad_accum_steps
            self.tokens_seen += inputs.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        finite = math.isfinite(total_loss) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.bad_steps_in_row = 0
        else:
            self.skipped_steps += 1
            self.bad_steps_in_row += 1
            if self.bad_steps_in_row >= cfg.max_bad_steps:
                raise TrainingError(
                    f"step {self.step}: loss or gradient non-finite for {self.bad_steps_in_row} steps in a row "
                    f"(train.max_bad_steps={cfg.max_bad_steps}); stopping without checkpointing this state")
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "loss": total_loss, "tokens": self.tokens_seen, "n": n, "k": k,
                "lr": lr, "grad_norm": float(grad_norm), "skipped": not finite}

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.config.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(to_yaml(self.config))
        self.maybe_resume()
        result = TrainResult(self.run_dir, self.step)
        writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        with open(self.run_dir / "metrics.jsonl", "a") as metrics:
            while self.step < cfg.max_steps:
                started = time.perf_counter()
                record = self.train_step()
                record["tokens_per_s"] = (cfg.micro_batch_size * cfg.grad_accum_steps * self.config.data.seq_len
                                          / (time.perf_counter() - started))
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                result.losses.append(record["loss"])
                for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    writer.add_scalar(f"train/{key}", record[key], self.step)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                nk=f"({record['n']},{record['k']})")
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
        bar.close()
        writer.close()
        result.final_step = self.step
        return result

    @torch.no_grad()
    def evaluate_depths(self, depths: list[int], batches: int) -> dict[int, float]:
        """Held-out loss at each test-time depth (init_scale 0: the deterministic state)."""
        from dataclasses import replace

        held_out_cfg = replace(self.config.data, seed=self.config.data.seed + 1_000_003)
        self.model.eval()
        losses = {}
        for depth in depths:
            stream = build_stream(held_out_cfg, self.config.model.vocab_size, self.config.train.micro_batch_size)
            total = 0.0
            for _ in range(batches):
                inputs, labels = (t.to(self.device) for t in stream.next_batch())
                with autocast(self.config, self.device):
                    out = self.model(inputs, labels=labels, num_steps=depth, init_scale=0.0, return_logits=False)
                total += out.loss.item()
            losses[depth] = total / batches
        return losses


def train(config: RunConfig, progress: bool = True) -> TrainResult:
    trainer = Trainer(config, progress=progress)
    result = trainer.run()
    if config.train.eval_depths:
        result.eval_losses = trainer.evaluate_depths(config.train.eval_depths, config.train.eval_batches)
    return result
