"""Validation during training: held-out data at several test-time depths.

- Text from shards: `data.validation_paths`, or the `validation/` directory that
  `rdp data shard --validation-fraction` writes beside the training shards. Training reads
  only the shards in its own manifests, so these samples are never trained on.
- The built-in synthetic corpus: fresh samples from another seed (a generated stream has no
  held-out file; its sequences come from a small family, so this measures fit, not recall).
- Reasoning tasks: every test split, scored by exact match (all scored positions right).

The same examples every time (the first `train.eval_batches` micro-batches), so the curves
are comparable across steps. Every rank evaluates every batch: TP ranks need the same
inputs, ZeRO-3 needs every rank in each forward. Nothing here touches the training stream,
the sampler or a random generator (the state starts at init_scale 0), so validation leaves
an exact resume exact.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from rdp.data_pipeline import build_stream
from rdp.data_pipeline.tasks import EVAL_SEED_OFFSET, TaskScore, load_task, task_of_source
from rdp.pretrain.config import RunConfig


class Validator:
    def __init__(self, config: RunConfig, engine, device: torch.device, tp_size: int = 1):
        self.config, self.engine, self.device, self.tp_size = config, engine, device, tp_size
        self.depths = list(config.train.eval_depths)
        d = config.data
        spec = task_of_source(d.source)
        self.task = load_task(spec) if spec is not None else None
        self.validation_paths: list[str] = []
        self.unavailable: Optional[str] = None  # why there is nothing to validate on
        if self.task is not None:
            if not self.task.test_splits():
                self.unavailable = f"task {self.task.name} has no test split"
        elif d.source == "webdataset":
            from rdp.data_pipeline.validation_split import find_validation

            self.validation_paths = list(d.validation_paths) or find_validation(list(d.paths))
            if not self.validation_paths:
                self.unavailable = ("no validation split: the shards have no validation/ directory (write one with "
                                    "`rdp data shard --validation-fraction 0.01`) and data.validation_paths is empty")
        self._text: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    @property
    def what(self) -> str:
        if self.task is not None:
            return f"test splits of task {self.task.name} ({', '.join(self.task.test_splits())})"
        if self.validation_paths:
            return f"held-out shards {', '.join(self.validation_paths)}"
        return "fresh samples of the synthetic corpus (another seed)"

    # ---- data ------------------------------------------------------------------------------------
    def _text_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._text is None:
            d, t = self.config.data, self.config.train
            if self.validation_paths:
                weights = list(d.weights) if len(d.weights) == len(self.validation_paths) else []
                source = replace(d, paths=self.validation_paths, weights=weights, num_workers=0)
            else:
                source = replace(d, seed=d.seed + EVAL_SEED_OFFSET)
            stream = build_stream(source, self.config.model.vocab_size, t.micro_batch_size)
            batches = t.eval_batches
            if self.validation_paths:  # no wrap-around into a second epoch of a small split
                batches = min(batches, max(1, sum(stream.samples_per_epoch) // t.micro_batch_size))
            self._text = [stream.next_batch() for _ in range(batches)]
            if hasattr(stream, "close"):
                stream.close()
        return self._text

    def _task_examples(self, split: str) -> int:
        wanted = self.config.train.eval_batches * self.config.train.micro_batch_size
        available = self.task.num_examples(split)
        return wanted if available is None else min(wanted, available)

    # ---- forward ---------------------------------------------------------------------------------
    def _logits(self, inputs: torch.Tensor, depth: int) -> torch.Tensor:
        logits = self.engine(inputs.to(self.device), None, depth, init_scale=0.0, return_logits=True)
        if self.tp_size > 1:  # each TP rank holds a slice of the vocabulary (padding at -inf)
            import torch.distributed as dist
            from megatron.core import parallel_state

            pieces = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(pieces, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(pieces, dim=-1)
        return logits[..., :self.config.model.vocab_size].cpu()

    @torch.no_grad()
    def run(self) -> dict:
        """text: {"loss": {depth: mean loss}}; task: {split: {depth: {exact_match, ...}}}."""
        if self.unavailable:
            return {}
        self.engine.eval()
        mb, seed = self.config.train.micro_batch_size, self.config.data.seed
        if self.task is None:
            batches = self._text_batches()
            losses = {}
            for depth in self.depths:
                total = sum(float(self.engine(x.to(self.device), y.to(self.device), depth, init_scale=0.0))
                            for x, y in batches)
                losses[str(depth)] = total / len(batches)
            return {"loss": losses}
        results = {}
        for split in self.task.test_splits():
            count = self._task_examples(split)
            results[split] = {}
            for depth in self.depths:
                score = TaskScore()
                for first in range(0, count, mb):
                    batch = self.task.batch(split, first, min(mb, count - first), seed)
                    logits = self._logits(batch.inputs, depth)
                    score.add(logits.argmax(-1), batch.labels, batch.difficulty, logits)
                results[split][str(depth)] = score.summary()
        return results


def log_validation(writer, results: dict, step: int) -> None:
    """TensorBoard: one chart per metric (per split for tasks), one curve per depth."""
    if "loss" in results:
        writer.add_scalars("validation/loss", {f"depth_{d}": v for d, v in results["loss"].items()}, step)
        return
    for split, per_depth in results.items():
        for metric in ("exact_match", "position_accuracy"):
            writer.add_scalars(f"validation/{split}/{metric}",
                               {f"depth_{d}": v[metric] for d, v in per_depth.items()}, step)


def format_validation(results: dict) -> list[str]:
    """The end-of-run table, as printed by `rdp train`."""
    if "loss" in results:
        return [f"  depth {d:>3}: {loss:.4f}" for d, loss in results["loss"].items()]
    depths = list(next(iter(results.values())))
    lines = ["  split       " + "".join(f"{'r=' + d:>8}" for d in depths)]
    for split, per_depth in results.items():
        lines.append(f"  {split:<12}" + "".join(f"{per_depth[d]['exact_match']:>8.3f}" for d in depths))
    return lines
