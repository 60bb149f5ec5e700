"""Truncated backprop, measured side by side in one run (prints ratios, asserts nothing).

1. Activation memory of one training step at total depth r = 8, 32, 64 with k = 8 grad
   iterations (n = r - 8 without autograd), relative to r = 8. Expected flat: the no-grad
   iterations keep nothing for backward. Measured as the bytes autograd saves for backward
   (saved-tensor hooks, unique storages), plus the CUDA allocator's peak on a GPU.
2. Cost of one no-grad core iteration relative to one grad iteration (forward + backward),
   from training-step times at different (n, k). Expected about 1/3 or less.

    .venv/bin/python benchmarks/bench_truncated_backprop.py            # small CPU shape
    .venv/bin/python benchmarks/bench_truncated_backprop.py --preset small --batch 8 --seq 512
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


from rdp.pretrain.config import load_config  # noqa: E402
from rdp.pretrain.model import build_model  # noqa: E402


def saved_activation_bytes(model, inputs, labels, num_steps) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (each storage
    counted once: parameters and views of one buffer are not activations twice)."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(inputs, labels=labels, num_steps=num_steps, return_logits=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def cuda_peak_bytes(model, inputs, labels, num_steps) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = model(inputs, labels=labels, num_steps=num_steps, return_logits=False).loss
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    model.zero_grad(set_to_none=True)
    return peak


def step_seconds(model, inputs, labels, num_steps, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if inputs.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(inputs, labels=labels, num_steps=num_steps, return_logits=False).loss.backward()
        if inputs.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    # eager: the saved-tensor hooks count what autograd keeps, which a compiled graph hides
    cfg = load_config(args.preset, [f"data.seq_len={args.seq}", "model.compile=false"]).model
    device = torch.device(args.device)
    model = build_model(cfg, device, seed=0).train()
    inputs = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    labels = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    print(f"model {args.preset} (hidden {cfg.hidden_size}, core layers {cfg.core_layers}), batch {args.batch} x "
          f"{args.seq} tokens, device {device}, activation checkpointing {cfg.activation_checkpointing}")

    k = 8
    print(f"\n1. activation memory of a training step, k={k} grad iterations, relative to r=8")
    print(f"{'r':>4} {'(n, k)':>9} {'saved for backward':>20} {'ratio':>7}" + ("  cuda peak     ratio" if device.type == "cuda" else ""))
    base = base_peak = None
    for r in (8, 32, 64):
        steps = (r - k, k)
        saved = saved_activation_bytes(model, inputs, labels, steps)
        base = base or saved
        line = f"{r:>4} {str(steps):>9} {saved / 2**20:>17.2f} MiB {saved / base:>7.3f}"
        if device.type == "cuda":
            peak = cuda_peak_bytes(model, inputs, labels, steps)
            base_peak = base_peak or peak
            line += f"  {peak / 2**20:>8.1f} MiB {peak / base_peak:>6.3f}"
        print(line)

    print("\n2. cost of one core iteration, from training-step times (median of "
          f"{args.repeats})")
    extra = 16
    t_base = step_seconds(model, inputs, labels, (0, k), args.repeats)
    t_nograd = step_seconds(model, inputs, labels, (extra, k), args.repeats)
    t_grad = step_seconds(model, inputs, labels, (0, k + extra), args.repeats)
    per_nograd = (t_nograd - t_base) / extra
    per_grad = (t_grad - t_base) / extra
    print(f"step (0, {k}): {t_base * 1e3:.1f} ms   ({extra}, {k}): {t_nograd * 1e3:.1f} ms   "
          f"(0, {k + extra}): {t_grad * 1e3:.1f} ms")
    print(f"no-grad iteration {per_nograd * 1e3:.2f} ms, grad iteration (forward + backward) {per_grad * 1e3:.2f} ms")
    print(f"no-grad / grad iteration cost ratio: {per_nograd / per_grad:.3f}")


if __name__ == "__main__":
    main()
