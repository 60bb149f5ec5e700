"""The training loop on a DeepSpeed engine over megatron-core tensor-parallel layers:
(n, k) = sampler(step); loss = model(batch, num_steps=(n, k)); backward; step.

The same code runs as one process on a laptop and as thousands of ranks under torchrun,
the deepspeed launcher, mpirun or srun (launch.env finds out which). Everything a resume
needs is in the checkpoint or a pure function of the step: the depth draw (sampler), the
learning rate (lr_factor) and the random initial state (seeded by the global index of the
micro-batch's first sample), so a resumed run repeats an uninterrupted one bit for bit on
CPU, and even on another data-parallel size it sees the same samples in the same order.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from rdp.data_pipeline import build_stream, document_bos
from rdp.data_pipeline.tokenizer import save_run_tokenizer
from rdp.launch.distributed import MegatronMPU, init_distributed
from rdp.pretrain.checkpoint import (CHECKPOINT_DIR, CONFIG_FILE, TRAINER_STATE_FILE, CheckpointError,
                                     load_rng_state, read_trainer_state, set_rng_state)
from rdp.pretrain.checkpointing import DEEPSPEED_TAG, Checkpointer
from rdp.pretrain.config import RunConfig, to_dict, to_yaml
from rdp.pretrain.flops import FlopsModel, device_peak_flops, throughput_metrics
from rdp.pretrain.engine import GradientWatch, build_engine, fp32_parameters, lr_factor, set_lr
from rdp.pretrain.preflight import preflight
from rdp.pretrain.parallel import build_parallel_model, check_tensor_parallel, gather_full_state_dict, shard_specs
from rdp.pretrain.objectives import Objective
from rdp.pretrain.progress import StepReporter
from rdp.pretrain.resume import check_layout, check_model_shape, reshard_zero_state
from rdp.pretrain.run_dir import FINISHED_MARKER, METRICS_FILE, check_fresh_start, remove_run
from rdp.pretrain.sampler import DepthSampler
from rdp.pretrain.wandb_sink import WandbSink
from rdp.pretrain.validation import Validator, log_validation
from rdp.pretrain.stopping import INTERRUPTED_EXIT_CODE, Deadline, StopRequests


class TrainingError(RuntimeError):
    user_facing = True


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    losses: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)  # text: held-out loss by depth
    validation: dict = field(default_factory=dict)  # the end-of-run validation (pretrain/validation.py)
    validation_note: str = ""  # what it was measured on, or why there is none
    stopped_by_signal: bool = False  # stopped early on request (a signal, or the job's time limit)
    stop_reason: Optional[str] = None
    is_main: bool = True
    exit_code: int = 0  # 130 after a Ctrl-C stop


def noise_seed(seed: int, first_sample: int) -> int:
    """Seed of the initial-state noise of the micro-batch starting at global sample
    `first_sample`: the same on every TP rank, independent of the DP size and of resumes."""
    return int(np.random.SeedSequence([seed, first_sample]).generate_state(1, np.uint64)[0] >> 1)


class Trainer:
    def __init__(self, config: RunConfig, progress: bool = True, overwrite: bool = False):
        self.config = config
        p, t = config.parallel, config.train
        self.run_dir = Path(t.run_dir)
        self.ckpt_root = self.run_dir / CHECKPOINT_DIR
        # before any process waits on another, and before anything is written
        check_fresh_start(self.run_dir, t.resume, overwrite)
        check_tensor_parallel(config.model, p.tensor_parallel)
        preflight(config)
        self.overwrite = overwrite
        self.ctx = init_distributed(p.tensor_parallel, p.backend)
        self.device = self.ctx.device
        self.progress = progress

        model = build_parallel_model(config.model, seed=t.seed, device=self.device)
        self.specs = shard_specs(model)
        self.engine, self.optimizer = build_engine(model, config, self.ctx.dp_size, MegatronMPU())
        self.checkpointer = Checkpointer(self.ctx, config, self.engine, self.ckpt_root, t.async_checkpoint)
        self._keep_rope_in_fp32()
        self.watch = GradientWatch(model)
        self.sampler = DepthSampler.from_config(config.model, t.seed, config.objective)
        self.objective = Objective.from_config(config.objective)
        self.flops = FlopsModel.from_config(config.model, config.data.seq_len)
        self.peak_flops = device_peak_flops(t.peak_flops)  # None on CPU: achieved FLOP/s only
        self.stream = build_stream(config.data, config.model.vocab_size, t.micro_batch_size,
                                   rank=self.ctx.dp_rank, world_size=self.ctx.dp_size)
        config.data.add_bos = document_bos(config, self.stream)  # checkpoints record how text was framed
        self.validator = Validator(config, self.engine, self.device, self.ctx.tp_size) if t.eval_depths else None
        if self.validator and t.eval_every and self.validator.unavailable:
            raise TrainingError(f"train.eval_every={t.eval_every}: {self.validator.unavailable}")
        torch.manual_seed(t.seed + self.ctx.rank)
        self.step = 0
        self.samples_seen = 0  # global: all DP ranks together
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.bad_steps_in_row = 0
        self.stops = StopRequests(announce=self.ctx.is_main)

    def _keep_rope_in_fp32(self) -> None:
        # DeepSpeed's bf16 mode casts every buffer; the spec computes RoPE in fp32
        from rdp.kernels.reference import rope_cos_sin

        m, module = self.config.model, self.engine.module.model
        module.cos_sin = rope_cos_sin(m.head_dim, m.max_seq_len, m.rope_base, self.device)

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> dict:
        t = self.config.train
        n, k = self.sampler(self.step)
        lr = t.lr * lr_factor(self.step, self.config)
        set_lr(self.optimizer, lr)
        self.engine.train()
        mb, dp = t.micro_batch_size, self.ctx.dp_size
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(t.grad_accum_steps):
            first = self.samples_seen + self.ctx.dp_rank * mb
            inputs, labels = (x.to(self.device) for x in self.stream.next_batch())
            generator = torch.Generator(self.device).manual_seed(noise_seed(t.seed, first))
            loss = self.engine(inputs, labels, (n, k), generator=generator)
            self.engine.backward(loss)
            loss_sum += loss.detach().double()
            self.samples_seen += dp * mb
            self.tokens_seen += dp * inputs.numel()
            if micro == t.grad_accum_steps - 1:
                # one collective decides for all ranks: mean loss, any non-finite, any stop request
                bad = self.watch.bad_local(self.device) | ~torch.isfinite(loss_sum)
                verdict = torch.stack([loss_sum / t.grad_accum_steps, bad.double(),
                                       torch.tensor(float(self.stops.requested), dtype=torch.float64, device=self.device)])
                dist.all_reduce(verdict)
                skip, stop = bool(verdict[1] > 0), bool(verdict[2] > 0)
                self.optimizer.skip = skip
                grad_norm = self._stage0_grad_norm()
            self.engine.step()
        self.optimizer.skip = False
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        self.step += 1
        self.skipped_steps += skip
        self.bad_steps_in_row = self.bad_steps_in_row + 1 if skip else 0
        mean_loss = float(verdict[0]) / self.ctx.world_size
        return {"step": self.step, "loss": mean_loss, "tokens": self.tokens_seen, "n": n, "k": k, "lr": lr,
                "grad_norm": float("nan") if skip or grad_norm is None else float(grad_norm),
                "skipped": skip, "skipped_total": self.skipped_steps, "data_position": self.samples_seen,
                "stop_requested": stop}

    def _stage0_grad_norm(self):
        """DeepSpeed reports the norm itself for ZeRO and bf16; plain fp32 stage 0 clips with
        it but throws it away, so take it here (same TP-aware formula, before clipping)."""
        if self.config.parallel.zero_stage > 0 or self.config.train.precision == "bf16":
            return None
        from deepspeed.runtime.utils import clip_grad_norm_

        # max_norm=inf: measure only (scales by exactly 1); DeepSpeed clips in engine.step()
        return clip_grad_norm_(list(self.engine.module.parameters()), float("inf"), mpu=MegatronMPU())

    # ---- checkpoints -------------------------------------------------------------------------------
    def client_state(self) -> dict:
        t = self.config.train
        return {"step": self.step, "tokens_seen": int(self.tokens_seen), "samples_seen": int(self.samples_seen),
                "data": self.stream.state_dict(), "sampler_seed": self.sampler.seed,
                "skipped_steps": self.skipped_steps, "bad_steps_in_row": self.bad_steps_in_row,
                "world_size": self.ctx.world_size, "tensor_parallel": self.ctx.tp_size,
                "data_parallel": self.ctx.dp_size, "zero_stage": self.config.parallel.zero_stage,
                "precision": t.precision, "config": to_dict(self.config)}

    def save_checkpoint(self) -> None:
        """Every rank: snapshot this step; the files are written in the background and the
        checkpoint published once all ranks have written theirs (pretrain/checkpointing.py)."""
        full, finite = gather_full_state_dict(fp32_parameters(self.engine), self.specs, self.device,
                                              keep=self.ctx.is_main)
        finite = torch.tensor([float(finite)], dtype=torch.float64, device=self.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite.item()):
            raise TrainingError(f"step {self.step}: weights are non-finite; refusing to checkpoint this state")
        self.checkpointer.save(self.step, full, self.client_state())

    def load_checkpoint(self, directory: Path) -> None:
        if not (directory / TRAINER_STATE_FILE).exists():
            raise CheckpointError(f"{directory}: has no {TRAINER_STATE_FILE}; only checkpoints written by "
                                  f"`rdp train` can be resumed (weights alone cannot restore the optimizer)")
        state = read_trainer_state(directory)
        check_model_shape(directory, state["config"], self.config)
        resharding = check_layout(directory, state, self.config, self.ctx.tp_size, self.ctx.dp_size)
        # DeepSpeed refuses any DP change up front, although its ZeRO-1/2 optimizer can merge
        # the partitions of an elastic checkpoint and re-split them; so load the weights alone,
        # then the fp32 master weights and Adam moments through that elastic path
        loaded, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_optimizer_states=not resharding,
                                                load_lr_scheduler_states=False, load_module_only=resharding)
        if loaded is None:
            raise CheckpointError(f"{directory}: DeepSpeed could not load {DEEPSPEED_TAG}/")
        if resharding:
            reshard_zero_state(self.engine, directory, DEEPSPEED_TAG, state["data_parallel"])
        self._keep_rope_in_fp32()
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.samples_seen = int(state["samples_seen"])
        self.skipped_steps, self.bad_steps_in_row = int(state["skipped_steps"]), int(state["bad_steps_in_row"])
        self.stream.load_state_dict(state["data"])
        rng_file = directory / "rng" / f"rank_{self.ctx.rank:05d}.pt"
        if rng_file.exists() and state["world_size"] == self.ctx.world_size:
            rng = load_rng_state(rng_file)
            if rng is not None:
                set_rng_state(rng)

    def maybe_resume(self) -> None:
        """Resume from the checkpoint rank 0 chose and every rank verified; each rank then
        checks that it holds that step."""
        resume = self.config.train.resume
        if resume == "none":
            return
        directory = self.checkpointer.agree_on_resume(resume)
        if directory is None:
            if self.ctx.is_main:
                print(f"train.resume=auto: no checkpoint in {self.ckpt_root}; starting at step 0", flush=True)
            return
        self.load_checkpoint(directory)
        self.checkpointer.check_loaded(directory, self.step)
        if self.ctx.is_main:
            print(f"resumed from {directory} at step {self.step}", flush=True)

    # ---- the run -------------------------------------------------------------------------------------
    def _start(self) -> None:
        """--overwrite, resume, then record the config: a refused start leaves the run dir as it was."""
        main = self.ctx.is_main
        save_run_tokenizer(self.config.data, self.run_dir, write=False)  # a different tokenizer: refused here
        if main and self.overwrite:
            removed = remove_run(self.run_dir)
            if removed:
                print(f"--overwrite: removed {', '.join(removed)} of the run in {self.run_dir}", flush=True)
        dist.barrier()
        self.maybe_resume()
        save_run_tokenizer(self.config.data, self.run_dir, write=main)  # `rdp eval RUN` finds it there
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(to_yaml(self.config))
        dist.barrier()

    def run(self) -> TrainResult:
        from torch.utils.tensorboard import SummaryWriter

        t = self.config.train
        main = self.ctx.is_main
        self._start()
        result = TrainResult(self.run_dir, self.step, is_main=main)
        if self.step >= t.max_steps:
            return result
        # rank 0 watches the job's end time; the stop request reaches the others in the step's all-reduce
        deadline = Deadline(t.save_before_end_minutes * 60) if main else None
        first_step = self.step
        self.stops.install()
        writer = SummaryWriter(str(self.run_dir / "tensorboard")) if main else None
        metrics = self._open_metrics() if main else None
        wandb = WandbSink.open(self.config, self.run_dir) if main else None
        reporter = StepReporter(t.max_steps, self.step, show=main, progress=self.progress, log_every=t.log_every)
        saved_at = None
        try:
            while self.step < t.max_steps:
                if deadline is not None and self.step > first_step and deadline.due():
                    self.stops.request(deadline.describe())
                started = time.perf_counter()
                record = self.train_step()
                seconds = time.perf_counter() - started
                step_tokens = t.micro_batch_size * t.grad_accum_steps * self.ctx.dp_size * self.config.data.seq_len
                record["tokens_per_s"] = step_tokens / seconds
                record.update(throughput_metrics(self.flops, record["n"], record["k"], step_tokens, seconds,
                                                 self.config.model.activation_checkpointing, self.peak_flops,
                                                 self.ctx.world_size, self.objective))
                result.losses.append(record["loss"])
                if self.validator and t.eval_every and self.step % t.eval_every == 0:
                    record["validation"] = self.validator.run()
                    if main:
                        log_validation(writer, record["validation"], self.step)
                if main:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "model_flops_per_s", "mfu", "hfu"):
                        if key in record:
                            writer.add_scalar(f"train/{key}", record[key], self.step)
                    if wandb:
                        wandb.log(record, self.step)
                reporter.update(record, step_tokens, seconds, self.peak_flops)
                self.checkpointer.poll()  # publishes a checkpoint once every rank has written it
                if self.bad_steps_in_row >= t.max_bad_steps:
                    self.checkpointer.finish()  # every rank is here: publish what is pending, then stop
                    raise TrainingError(
                        f"step {self.step}: loss or gradient non-finite for {self.bad_steps_in_row} steps in a row "
                        f"(train.max_bad_steps={t.max_bad_steps}); stopping without checkpointing this state "
                        f"(skipped steps never changed the weights; the last checkpoint is intact)")
                if self.step % t.checkpoint_every == 0 or self.step == t.max_steps or record["stop_requested"]:
                    self.save_checkpoint()
                    saved_at = self.step
                if self.step == t.max_steps or record["stop_requested"]:
                    self.checkpointer.finish()
                if record["stop_requested"]:
                    result.stopped_by_signal = True
                    result.stop_reason = self.stops.reason or "a stop request on another rank"
                    if main:
                        print(f"stop requested by {result.stop_reason}: checkpoint at step {saved_at} written, "
                              f"exiting", flush=True)
                    break
        finally:
            reporter.close()
            if main:
                metrics.close()
                writer.close()
                if wandb:
                    wandb.close()
            self.stops.restore()
        if self.stops.interrupted:
            result.exit_code = INTERRUPTED_EXIT_CODE
        result.final_step = self.step
        if self.step >= t.max_steps and main:
            (self.run_dir / FINISHED_MARKER).write_text(f"step {self.step}\n")
        return result

    def _open_metrics(self):
        """Append, dropping records past the resumed step (written after the checkpoint by a
        run that then died), so the file holds exactly one record per step."""
        path = self.run_dir / METRICS_FILE
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= self.step]
            path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")

    def close(self) -> None:
        self.checkpointer.writer.drain()  # a write still running finishes (unpublished) before exit
        self.watch.remove()
        self.engine.destroy()


def _step_of(line: str) -> float:
    """Step of one metrics line; a line torn by a crash counts as past any resume point."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def train(config: RunConfig, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train (or resume) a run as configured; see the module docstring. `overwrite` replaces a
    run already in train.run_dir (otherwise a fresh start there is refused)."""
    trainer = Trainer(config, progress=progress, overwrite=overwrite)
    try:
        result = trainer.run()
        validator = trainer.validator
        if validator and not result.stopped_by_signal:
            result.validation_note = validator.unavailable or validator.what
            result.validation = validator.run()  # every rank joins each forward
            if "loss" in result.validation:
                result.eval_losses = {int(d): v for d, v in result.validation["loss"].items()}
            if not trainer.ctx.is_main:
                result.validation, result.eval_losses = {}, {}
    finally:
        trainer.close()
    return result
