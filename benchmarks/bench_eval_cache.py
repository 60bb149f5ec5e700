"""Generation with and without the recurrent KV cache, side by side in one run: tokens/s
and cache memory per strategy, as ratios to the uncached forward / the full cache.

    .venv/bin/python benchmarks/bench_eval_cache.py [--preset tiny] [--depth 8] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import time

import torch

from rdp.evals.cache import RecurrentKVCache
from rdp.evals.runner import DepthRunner, DepthSettings, SamplingParams
from rdp.pretrain.config import load_config
from rdp.pretrain.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    model = build_model(load_config(args.preset).model, seed=0).eval()
    vocab = model.config.vocab_size
    prompts = [[(7 * i + j) % (vocab - 8) for j in range(args.prompt_len)] for i in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    seconds, outputs = {}, {}
    for cache in ("none", "full", "latest", "modulo"):
        runner = DepthRunner(model, DepthSettings(num_steps=args.depth, init_scale=0.0, cache=cache, cache_slots=2))
        started = time.perf_counter()
        outputs[cache] = runner.generate(prompts, params)
        seconds[cache] = time.perf_counter() - started
    tokens = args.batch * args.new_tokens
    print(f"preset={args.preset} depth={args.depth} batch={args.batch} prompt={args.prompt_len} new={args.new_tokens}")
    for cache, s in seconds.items():
        same = "same tokens as uncached" if outputs[cache] == outputs["none"] else "tokens differ from uncached"
        print(f"  cache={cache:7s} {tokens / s:8.1f} tok/s   speed-up vs none x{seconds['none'] / s:5.2f}   ({same})")
    sizes = {}
    for strategy in ("full", "latest", "modulo"):
        cache = RecurrentKVCache.for_model(model, strategy, slots=2)
        with torch.no_grad():
            model(torch.tensor(prompts), num_steps=args.depth, init_scale=0.0, cache=cache)
        sizes[strategy] = cache.nbytes()
    for strategy, size in sizes.items():
        print(f"  memory {strategy:7s} {size / 2**20:8.2f} MiB   ratio to full {size / sizes['full']:.3f}")


if __name__ == "__main__":
    main()
