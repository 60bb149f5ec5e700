"""Scoring reasoning tasks across test-time depths (the "easy-to-hard" setting: train on easy
instances, test on harder ones with more test-time iterations).

The tasks themselves (built-in generators and task directories) are data and live in
`data_pipeline.tasks`; here a model is scored on one split at one depth: whole-answer exact
match (every scored position right), per-position accuracy, and exact match per difficulty.
"""
from __future__ import annotations

import math

import torch

from rdp.data_pipeline.builtin_tasks import BUILTIN_TASKS
from rdp.data_pipeline.tasks import Task, TaskScore, load_task

TASKS = BUILTIN_TASKS  # names `rdp eval --tasks` knows as reasoning tasks


def is_reasoning_task(name: str) -> bool:
    """A built-in task name or a task directory path."""
    from pathlib import Path

    return name in BUILTIN_TASKS or (Path(name).is_dir() and (Path(name) / "train.jsonl").exists())


def examples_in(task: Task, split: str, wanted: int) -> int:
    """Generated splits give `wanted` examples; a file split all of its lines, or `wanted` if fewer."""
    available = task.num_examples(split)
    return wanted if available is None else min(wanted, available)


def depth_logits(model, input_ids: torch.Tensor, depths: list[int]):
    """(depth, logits) for every depth in `depths`, from one pass of max(depths) iterations.
    With the deterministic initial state (init_scale 0) the state at depth d + 1 is one more
    iteration of the state at depth d, so each is what `model(ids, num_steps=(d, 0))` gives,
    for the cost of the deepest alone (a sweep of depths 1..32 runs 32 iterations, not 528)."""
    wanted = set(depths)
    cos_sin = model.cos_sin[:input_ids.shape[1]]
    embedded = model.embed(input_ids)
    for block in model.transformer.prelude:
        embedded = block(embedded, cos_sin)
    state = model.initial_state(embedded, 0.0)
    for step in range(max(depths)):
        state = model.core_step(state, embedded, cos_sin, step=step)
        if step + 1 in wanted:
            yield step + 1, model.kit.head_logits(model.decode(state, cos_sin), model.head_weight)


@torch.no_grad()
def score_split_depths(model, task: Task | str, split: str, depths: list[int], num_examples: int = 256,
                       batch_size: int = 64, seed: int = 0, exit_threshold: float | None = None) -> dict[int, dict]:
    """depth -> exact_match (+ its binomial stderr), position_accuracy, loss,
    accuracy_by_difficulty and mean_steps of `model` on one split, with the deterministic
    initial state. With `exit_threshold` q each depth is a cap and every position stops where
    the model's exit gate says (`--exit-criterion learned`); mean_steps is then the mean
    number of iterations over the scored positions."""
    from rdp.evals.adaptive import learned_exit_depths

    task = load_task(task) if isinstance(task, str) else task
    config = getattr(model, "config", None)
    if config is not None:  # ids outside the model's vocabulary fail here, naming the file and line
        task.check_fits(config.vocab_size, config.max_seq_len, "the model's max_seq_len")
    count = examples_in(task, split, num_examples)
    device = next(model.parameters()).device
    scores = {depth: TaskScore() for depth in sorted(set(depths))}
    steps_used, scored = dict.fromkeys(scores, 0), 0
    for first in range(0, count, batch_size):
        batch = task.batch(split, first, min(batch_size, count - first), seed)
        inputs, mask = batch.inputs.to(device), batch.labels != -100
        scored += int(mask.sum())
        if exit_threshold is None:
            passes = ((depth, logits, None) for depth, logits in depth_logits(model, inputs, list(scores)))
        else:
            passes = learned_exit_depths(model, inputs, list(scores), exit_threshold)
        for depth, logits, steps in passes:
            logits = logits.float().cpu()
            scores[depth].add(logits.argmax(-1), batch.labels, batch.difficulty, logits)
            steps_used[depth] += depth * int(mask.sum()) if steps is None else int(steps.cpu()[mask].sum())
    out = {}
    for depth, score in scores.items():
        out[depth] = score.summary()
        accuracy = out[depth]["exact_match"]
        out[depth]["stderr"] = math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(1, count))
        out[depth]["mean_steps"] = steps_used[depth] / max(1, scored)
    return out


def score_split(model, task: Task | str, split: str, depth: int, num_examples: int = 256, batch_size: int = 64,
                seed: int = 0, exit_threshold: float | None = None) -> dict:
    """score_split_depths at one depth."""
    return score_split_depths(model, task, split, [depth], num_examples, batch_size, seed, exit_threshold)[depth]


def train_and_sweep(task_spec: str, out: str | None, preset: str = "reasoning", overrides: list[str] | None = None,
                    steps: int | None = None, depths: list[int] | None = None, examples: int = 256,
                    progress: bool = True, echo: bool = True, exit_criterion: str | None = None,
                    exit_threshold: float | None = None):
    """`rdp reasoning`: train through the normal trainer (DeepSpeed engine, checkpoints,
    resume) on the task's train split, then sweep every test split at every depth."""
    from pathlib import Path

    from rdp.data_pipeline.manifest import DataError
    from rdp.evals.sweep import Sweep, SweepConfig
    from rdp.pretrain.task_sizing import load_task_config
    from rdp.pretrain.train import train

    task = load_task(task_spec)
    if not task.test_splits():
        raise DataError(f"{task_spec}: missing test split: nothing to sweep besides train.jsonl (add <split>.jsonl)")
    out = Path(out or f"runs/reasoning-{task.name}")
    run_dir = out / "train"
    settings = [f"data.source=task:{task_spec}", f"train.run_dir={run_dir}", "train.resume=auto"]
    if steps is not None:
        settings.append(f"train.max_steps={steps}")
    config = load_task_config(preset, settings + list(overrides or []))
    if exit_criterion == "learned" and not config.model.exit_gate:  # refused before training, not after
        from rdp.pretrain.config import ConfigError

        raise ConfigError("--exit-criterion learned needs model.exit_gate=true (with objective.loss=expected_exit "
                          "or objective.halting_weight > 0) in the training config")
    train(config, progress=progress)
    cfg = SweepConfig(checkpoint=str(run_dir), tasks=[task_spec], depths=list(depths or [1, 2, 4, 8, 16, 32]),
                      out_dir=str(out / "eval"), reasoning_examples=examples, seed=config.data.seed,
                      exit_criterion=exit_criterion, exit_threshold=exit_threshold)
    sweep = Sweep(cfg, progress=progress, echo=echo)
    sweep.run()
    return sweep
