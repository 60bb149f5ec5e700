"""Greedy generation speed at a fixed depth, side by side in one run: the uncached forward
(cache=none, the reference), the cached path before speculative decoding (RecurrentKVCache
"full", one token at a time through the model's forward), the new cached path without
speculation, with self-drafts only, with lookup drafts only, and the default (both). Every path must return the
reference's tokens; each line says so, and the script exits 1 if one does not.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_generation.py \\
        [--preset tiny] [--depth 8] [--batch 1] [--prompt-len 64] [--new-tokens 128] [--threads 1]

Models of the preset, each with all six paths: randomly initialised (seed 0), and trained
by the normal trainer on the built-in synthetic corpus for each of --train-steps (default
80 and 300). 80 steps is the tiny preset's own run, stopped while the model is still
learning its task (loss ~0.9); at 300 it has learned it (loss ~0.04), as the models people
evaluate have learned theirs. Speculation pays when shallow drafts agree with the full
depth, which needs a recurrence that converges: the longer-trained model's does more, a
random one's mostly does not (see the acceptance lines). --checkpoint DIR benchmarks that
model instead.

A token of the tiny preset costs a few milliseconds, spent mostly on per-operation overhead,
so timings move with the machine's load. Each path runs --repeats times, the paths taking
turns; the table gives the median (and the best) CPU time of this process, which shared
cores disturb less than wall-clock time, the median wall-clock time, and the number of
tensor operations per token (counted once per path; it does not depend on the machine and
tracks the time at this size). The load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from rdp.evals.runner import DepthRunner, DepthSettings, SamplingParams  # noqa: E402

PATHS = ("uncached (cache=none)", "cached before (RecurrentKVCache)", "cached, no speculation",
         "self-drafts only", "lookup drafts only", "default (self + lookup drafts)")


def random_model(preset: str):
    from rdp.pretrain.config import load_config
    from rdp.pretrain.model import build_model

    return build_model(load_config(preset).model, seed=0).eval()


def trained_model(preset: str, steps: int, run_dir: str):
    from rdp.evals.lm_adapter import load_checkpoint
    from rdp.pretrain.config import load_config
    from rdp.pretrain.train import train

    overrides = [f"train.run_dir={run_dir}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                 "train.eval_depths=[]"]
    started = time.perf_counter()
    train(load_config(preset, overrides), progress=False)
    print(f"(trained {preset} for {steps} steps in {time.perf_counter() - started:.0f}s)")
    return load_checkpoint(run_dir)


def timings(paths: dict, repeats: int) -> dict:
    """Per path: wall and CPU times (this process) of `repeats` runs, taken in turns so that
    load from other processes falls on every path alike, and the output."""
    runs = {name: ([], [], None) for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn()
            walls, cpus, _ = runs[name]
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            runs[name] = (walls, cpus, out)
    return runs


class OperationCount(TorchDispatchMode):
    """Counts the tensor operations (ATen calls) run under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations(fn) -> int:
    with OperationCount() as counter:
        fn()
    return counter.count


def compare(model, described: str, args) -> bool:
    vocab = min(model.config.vocab_size, model.config.bos_token_id)
    prompts = [[(7 * i + 13 * j + j * j) % vocab for j in range(args.prompt_len)] for i in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new_tokens)  # no EOS: every path makes new_tokens per row

    def runner(**kwargs) -> DepthRunner:
        return DepthRunner(model, DepthSettings(num_steps=args.depth, init_scale=0.0, **kwargs), eos_token_id=-1)

    speculative = runner(draft_steps=args.draft_steps)
    budget = [args.new_tokens] * len(prompts)
    paths = dict(zip(PATHS, (
        lambda: runner(cache="none").generate(prompts, params),
        lambda: runner()._generate_batch(prompts, params, budget, None),
        lambda: runner(draft_steps=0, lookup_drafts=False).generate(prompts, params),
        lambda: runner(draft_steps=args.draft_steps, lookup_drafts=False).generate(prompts, params),
        lambda: runner(draft_steps=0).generate(prompts, params),
        lambda: speculative.generate(prompts, params),
    )))
    with torch.no_grad():
        runs = timings(paths, args.repeats)
        ops = {name: operations(fn) for name, fn in paths.items()}
    tokens = args.batch * args.new_tokens
    reference = runs[PATHS[0]][2]
    median = {name: (statistics.median(cpus), min(cpus), statistics.median(walls))
              for name, (walls, cpus, _) in runs.items()}
    base_cpu, base_best, base_wall = median[PATHS[1]]
    print(f"\n{described}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; depth={args.depth} "
          f"batch={args.batch} prompt={args.prompt_len} new={args.new_tokens} threads={torch.get_num_threads()} "
          f"draft_steps={speculative.settings.resolved_draft_steps()} ({args.repeats} runs each)")
    print(f"  {'':32s} {'median CPU time':>26s} {'best CPU':>9s} {'median wall':>21s} {'ops/token':>16s}")
    ok = True
    for name, (walls, cpus, out) in runs.items():
        cpu, best, wall = median[name]
        ok &= out == reference
        print(f"  {name:32s} {tokens / cpu:7.1f} tok/s x{median[PATHS[0]][0] / cpu:5.2f} x{base_cpu / cpu:5.2f}"
              f"    x{base_best / best:5.2f}   {tokens / wall:7.1f} tok/s x{base_wall / wall:5.2f}"
              f"   {ops[name] / tokens:7.0f} x{ops[PATHS[1]] / ops[name]:5.2f}   "
              f"{'same tokens' if out == reference else 'TOKENS DIFFER'}")
    print("  (x: vs uncached, then vs cached before; best CPU, median wall and ops: vs cached before; the uncached\n"
          "   path's operations each cover the whole sequence, so its op count is no measure of its time)")
    s = speculative.draft_stats
    print(f"  default, {args.repeats + 1} runs: {s.rounds} self-draft rounds (acceptance {s.acceptance:.2f}, "
          f"{(s.accepted + s.rounds) / max(1, s.rounds):.2f} tokens a round), {s.lookup_rounds} lookup rounds "
          f"(acceptance {s.lookup_acceptance:.2f}, {(s.lookup_accepted + s.lookup_rounds) / max(1, s.lookup_rounds):.2f} "
          f"tokens a round)")
    return ok


def print_load(when: str) -> None:
    load = os.getloadavg()
    print(f"load average {when}: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on {os.cpu_count()} CPUs")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--checkpoint", default=None, help="benchmark this model instead of random + trained")
    parser.add_argument("--models", default="random,trained", help="which of the preset's models: random, trained")
    parser.add_argument("--train-steps", default="80,300", help="comma-separated: one trained model each")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft-steps", type=int, default=None, help="default: the runner's (num_steps // 4)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_load("at start")
    ok = True
    if args.checkpoint:
        from rdp.evals.lm_adapter import load_checkpoint

        ok &= compare(load_checkpoint(args.checkpoint), f"checkpoint {args.checkpoint}", args)
    if "random" in args.models and not args.checkpoint:
        ok &= compare(random_model(args.preset), f"preset {args.preset}, random init (seed 0)", args)
    for steps in ([int(n) for n in args.train_steps.split(",")] if "trained" in args.models and not args.checkpoint
                  else []):
        with tempfile.TemporaryDirectory(prefix="bench_generation_") as run_dir:
            model = trained_model(args.preset, steps, run_dir)
        ok &= compare(model, f"preset {args.preset}, trained {steps} steps on the synthetic corpus", args)
    print_load("at end")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
