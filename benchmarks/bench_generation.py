"""Greedy generation speed at a fixed depth, side by side in one run: the uncached forward
(cache=none, the reference), the cached path before speculative decoding (RecurrentKVCache
"full", one token at a time through the model's forward), the new cached path without
speculation (draft_steps=0) and the default (self-speculative). Every path must return the
reference's tokens; the script says so per line and exits 1 if one does not.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_generation.py [--preset small] [--depth 8] \\
        [--batch 1] [--prompt-len 64] [--new-tokens 64] [--checkpoint RUN_DIR] [--threads 1]

Without --checkpoint the model is randomly initialised (seed 0); a trained checkpoint
usually lets shallower drafts agree more often (see the acceptance column).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from rdp.evals.runner import DepthRunner, DepthSettings, SamplingParams  # noqa: E402


def load_model(args):
    if args.checkpoint:
        from rdp.evals.lm_adapter import load_checkpoint

        return load_checkpoint(args.checkpoint), args.checkpoint
    from rdp.pretrain.config import load_config
    from rdp.pretrain.model import build_model

    return build_model(load_config(args.preset).model, seed=0).eval(), f"preset {args.preset} (random init, seed 0)"


def timed(fn, repeats: int) -> tuple[float, list]:
    """Best wall time of `repeats` runs (the least disturbed by other load) and the output."""
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-steps", type=int, default=None, help="default: the runner's (num_steps // 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, described = load_model(args)
    vocab = min(model.config.vocab_size, model.config.bos_token_id)
    prompts = [[(7 * i + 13 * j + j * j) % vocab for j in range(args.prompt_len)] for i in range(args.batch)]
    # no EOS, so every path generates exactly new_tokens tokens per row
    params = SamplingParams(max_new_tokens=args.new_tokens)
    eos = -1

    def runner(**kwargs) -> DepthRunner:
        settings = DepthSettings(num_steps=args.depth, init_scale=0.0, **kwargs)
        return DepthRunner(model, settings, eos_token_id=eos)

    def stepwise():
        r = runner(cache="full")
        budget = [args.new_tokens] * len(prompts)
        return r._generate_batch(prompts, params, budget, None)

    speculative = runner(cache="full", draft_steps=args.draft_steps)
    paths = {
        "uncached (cache=none)": lambda: runner(cache="none").generate(prompts, params),
        "cached, before (RecurrentKVCache full)": stepwise,
        "cached, no speculation (draft_steps=0)": lambda: runner(cache="full", draft_steps=0).generate(prompts, params),
        "default (self-speculative)": lambda: speculative.generate(prompts, params),
    }
    with torch.no_grad():
        results = {name: timed(fn, args.repeats) for name, fn in paths.items()}
    tokens = args.batch * args.new_tokens
    reference = results["uncached (cache=none)"][1]
    before = results["cached, before (RecurrentKVCache full)"][0]
    uncached = results["uncached (cache=none)"][0]
    stats = speculative.draft_stats
    load = os.getloadavg()
    print(f"model: {described}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    print(f"depth={args.depth} batch={args.batch} prompt={args.prompt_len} new={args.new_tokens} "
          f"threads={torch.get_num_threads()} draft_steps={speculative.settings.resolved_draft_steps()} "
          f"load average at end {load[0]:.1f} on {os.cpu_count()} CPUs (best of {args.repeats})")
    ok = True
    for name, (seconds, out) in results.items():
        same = out == reference
        ok &= same
        print(f"  {name:40s} {tokens / seconds:8.1f} tok/s   x{uncached / seconds:5.2f} vs uncached   "
              f"x{before / seconds:5.2f} vs cached-before   {'same tokens' if same else 'TOKENS DIFFER'}")
    rounds = max(1, stats.rounds)
    print(f"  speculation ({args.repeats} runs): {stats.rounds} drafting rounds, acceptance {stats.acceptance:.2f} "
          f"of drafted tokens, mean draft length {stats.drafted / rounds:.2f}, "
          f"tokens per drafting round {(stats.accepted + stats.rounds) / rounds:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
