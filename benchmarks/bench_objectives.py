"""Which training objective makes depth generalise? Trains the same small model on pointer
chasing (chains of at most 4 nodes) once per objective, then prints exact match (all 12
answers right) by test-time depth on the trained difficulty and on longer, never-trained
chains, plus the learned exit's accuracy and mean steps where the model has a gate.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_objectives.py --steps 5000 > objectives.log
    python benchmarks/bench_objectives.py --steps 300 --variants last,every   # a quick look

The loop is the model's own forward with the objective (pretrain/objectives.py), the depth
sampler with its curriculum and AdamW in one fp32 process: the math of `rdp train` at one
rank, without DeepSpeed's per-step overhead (tiny steps are dominated by it). Results go to
stdout and, as JSON, to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rdp.data_pipeline.builtin_tasks import NO_EDGE, pointer_chasing  # noqa: E402
from rdp.evals.adaptive import learned_exit_forward  # noqa: E402
from rdp.pretrain.config import load_config  # noqa: E402
from rdp.pretrain.model import build_model  # noqa: E402
from rdp.pretrain.objectives import Objective  # noqa: E402
from rdp.pretrain.sampler import DepthSampler  # noqa: E402

# (name, config overrides); the model and optimiser are the same for all
VARIANTS = {
    "last": [],
    "every": ["objective.loss=every"],
    # 2 segments of half the mean recurrence: the same depth per batch as the others
    "segments2": ["objective.segments=2", "model.mean_recurrence=4", "model.mean_backprop_depth=2"],
    "curriculum": ["objective.curriculum_steps={ramp}", "objective.curriculum=1-sqrt"],
    "every+curriculum": ["objective.loss=every", "objective.curriculum_steps={ramp}", "objective.curriculum=1-sqrt"],
    "expected_exit": ["model.exit_gate=true", "objective.loss=expected_exit", "objective.exit_entropy_weight=0.01"],
    "every+halting": ["model.exit_gate=true", "objective.loss=every", "objective.halting_weight=0.5"],
    # HRM's two-timescale core: 4 high-level updates of 2 low-level ones (12 layer passes vs 8)
    "hrm": ["model.low_level_steps=2", "model.mean_recurrence=4", "model.mean_backprop_depth=2"],
}


# the built-in task's generator (rdp.data_pipeline.builtin_tasks), driven directly: one
# stream per (seed, difficulty), example i from its own generator
def batch(seed: int, difficulty: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [pointer_chasing(np.random.Generator(np.random.PCG64([seed, difficulty, first + i])), difficulty)
            for i in range(count)]
    return torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))


def base_overrides(args) -> list[str]:
    return ["model.hidden_size=64", "model.num_heads=4", "model.intermediate_size=128", f"model.vocab_size={NO_EDGE + 1}",
            "model.max_seq_len=32", "model.prelude_layers=0", "model.core_layers=1", "model.coda_layers=0",
            "model.mean_recurrence=8", "model.mean_backprop_depth=2", "model.depth_sigma=0.5",
            "model.bos_token_id=0", "model.eos_token_id=0", "model.end_turn_token_id=0", "model.pad_token_id=0",
            "model.kernels=torch", "data.seq_len=23", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
            f"train.warmup_steps={args.steps // 20}", "train.schedule=cosine", "train.weight_decay=0.0",
            "train.precision=fp32", f"train.micro_batch_size={args.batch}"]


def lr_at(step: int, cfg) -> float:
    from rdp.pretrain.engine import lr_factor

    return cfg.train.lr * lr_factor(step, cfg)


def train_variant(overrides: list[str], args):
    cfg = load_config("tiny", base_overrides(args) + overrides)
    torch.manual_seed(args.seed)
    model = build_model(cfg.model, seed=args.seed)
    objective = Objective.from_config(cfg.objective)
    sampler = DepthSampler.from_config(cfg.model, args.seed, cfg.objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.0)
    started = time.perf_counter()
    losses = []
    for step in range(cfg.train.max_steps):
        inputs, labels = batch(args.seed, args.train_difficulty, step * args.batch, args.batch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(inputs, labels=labels, num_steps=sampler(step), return_logits=False, objective=objective).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), time.perf_counter() - started, float(np.mean(losses[-50:]))


@torch.no_grad()
def evaluate(model, args) -> dict:
    result = {}
    for difficulty in args.difficulties:
        inputs, labels = batch(args.seed + 1_000_003, difficulty, 0, args.examples)
        scored = labels != -100
        row = {}
        for depth in args.depths:
            logits = model(inputs, num_steps=(depth, 0), init_scale=0.0).logits
            row[str(depth)] = float(((logits.argmax(-1) == labels) | ~scored).all(-1).float().mean())
        for q in args.q if "exit_gate" in model.transformer else []:
            logits, steps = learned_exit_forward(model, inputs, max(args.depths), q)
            row[f"learned q={q}"] = float(((logits.argmax(-1) == labels) | ~scored).all(-1).float().mean())
            row[f"learned q={q} mean_steps"] = float(steps[scored].float().mean())
        result[str(difficulty)] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--train-difficulty", type=int, default=4)
    parser.add_argument("--difficulties", default="4,6,8")
    parser.add_argument("--depths", default="1,2,4,8,16,32")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--q", default="0.5,0.9", help="CDF levels of the learned exit (comma-separated)")
    parser.add_argument("--out", default="bench_objectives.json")
    args = parser.parse_args()
    args.difficulties = [int(d) for d in args.difficulties.split(",")]
    args.depths = [int(d) for d in args.depths.split(",")]
    args.q = [float(q) for q in args.q.split(",")]
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    ramp = int(0.4 * args.steps)
    report = {"settings": {k: v for k, v in vars(args).items()}, "results": {}}
    print(f"pointer chasing, trained on chains of <= {args.train_difficulty} nodes, {args.steps} steps of "
          f"{args.batch}; exact match over {args.examples} held-out examples per difficulty", flush=True)
    for name in args.variants.split(","):
        overrides = [o.format(ramp=ramp) for o in VARIANTS[name]]
        model, seconds, final_loss = train_variant(overrides, args)
        scores = evaluate(model, args)
        report["results"][name] = {"overrides": overrides, "train_seconds": seconds, "final_loss": final_loss,
                                   "exact_match": scores}
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"\n{name} ({' '.join(overrides) or 'truncated backprop, the default'}): "
              f"{seconds:.0f} s, final train loss {final_loss:.3f}", flush=True)
        gated = "exit_gate" in model.transformer
        header = "difficulty " + " ".join(f"{'r=' + str(d):>6}" for d in args.depths)
        print(header + "".join(f"   learned q={q} (mean steps)" for q in args.q if gated))
        for difficulty, row in scores.items():
            line = f"{difficulty:>10} " + " ".join(f"{row[str(d)]:>6.3f}" for d in args.depths)
            for q in args.q if gated else []:
                line += f"   {row[f'learned q={q}']:.3f} ({row[f'learned q={q} mean_steps']:.2f})".ljust(27)
            print(line, flush=True)
    best = {name: max(r["exact_match"][str(d)][str(depth)] for d in map(str, args.difficulties[1:2])
                      for depth in args.depths) if len(args.difficulties) > 1 else math.nan
            for name, r in report["results"].items()}
    print("\nbest exact match on the first harder difficulty: "
          + ", ".join(f"{name} {value:.3f}" for name, value in best.items()))


if __name__ == "__main__":
    main()
