"""Training time lost per checkpoint: synchronous writes against background writes, side by side.

One process trains the same model three times for STEPS steps: without periodic checkpoints,
with `train.async_checkpoint=false` and with `train.async_checkpoint=true`, checkpointing
every EVERY steps. Printed per mode:
  - blocked s/ckpt: time the training thread spent inside checkpointing per periodic
    checkpoint (snapshot + DeepSpeed's save call + waiting for writes + the publish poll);
  - lost s/ckpt: (wall time of the run - wall time without checkpoints) / checkpoints, which
    also counts a background write slowing the steps it overlaps (on a CPU run it competes
    for the same cores);
and the ratio async / sync of each. The final checkpoint (waited for in both modes, so that
the run ends with its checkpoint published) is excluded: STEPS is not a multiple of EVERY.

    .venv/bin/python benchmarks/bench_checkpoint.py [--hidden 768 --vocab 8192 --steps 13 --every 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run(root: Path, name: str, args, *extra: str) -> dict:
    from rdp.pretrain import checkpointing, train as train_module
    from rdp.pretrain.config import load_config

    config = load_config("tiny", [f"model.hidden_size={args.hidden}", f"model.num_heads={args.hidden // 64}",
                                  f"model.intermediate_size={args.hidden * 8 // 3}", f"model.vocab_size={args.vocab}",
                                  "model.prelude_layers=1", "model.core_layers=2", "model.coda_layers=1",
                                  "model.mean_recurrence=2", "model.mean_backprop_depth=1",
                                  f"model.bos_token_id={args.vocab - 8}", f"model.eos_token_id={args.vocab - 7}",
                                  f"model.end_turn_token_id={args.vocab - 4}", f"model.pad_token_id={args.vocab - 3}",
                                  "data.seq_len=128", "train.micro_batch_size=4", "train.eval_depths=[]",
                                  f"train.max_steps={args.steps}", "train.keep_last=2",
                                  f"train.run_dir={root / name}", *extra])
    blocked = {"seconds": 0.0}

    def timed(function, counts=lambda self: True):
        def wrapper(self, *a, **k):
            started = time.perf_counter()
            try:
                return function(self, *a, **k)
            finally:
                if counts(self):
                    blocked["seconds"] += time.perf_counter() - started
        return wrapper

    originals = (train_module.Trainer.save_checkpoint, checkpointing.Checkpointer.poll)
    # the final checkpoint (step == steps) is waited for in both modes: not counted
    train_module.Trainer.save_checkpoint = timed(originals[0], lambda trainer: trainer.step < args.steps)
    checkpointing.Checkpointer.poll = timed(originals[1])
    trainer = train_module.Trainer(config, progress=False)
    try:
        started = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - started
    finally:
        trainer.close()
        train_module.Trainer.save_checkpoint, checkpointing.Checkpointer.poll = originals
    size = sum(p.stat().st_size for p in (root / name / "checkpoints").rglob("*") if p.is_file()) / 2
    return {"seconds": seconds, "blocked": blocked["seconds"], "checkpoint_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--every", type=int, default=3)
    args = parser.parse_args()
    periodic = (args.steps - 1) // args.every
    with tempfile.TemporaryDirectory(prefix="rdp-bench-ckpt-") as tmp:
        root = Path(tmp)
        results = {"none": run(root, "none", args, f"train.checkpoint_every={args.steps + 1}")}
        for mode in ("sync", "async"):
            results[mode] = run(root, mode, args, f"train.checkpoint_every={args.every}",
                                f"train.async_checkpoint={str(mode == 'async').lower()}")
    print(f"{args.steps} steps, a checkpoint every {args.every} ({periodic} periodic, "
          f"{results['sync']['checkpoint_bytes'] / 2**20:.0f} MiB each), one process")
    print(f"{'mode':>6} {'run s':>8} {'blocked s/ckpt':>15} {'lost s/ckpt':>12}")
    lost = {}
    for mode, r in results.items():
        per = r["blocked"] / periodic if mode != "none" else 0.0
        lost[mode] = (r["seconds"] - results["none"]["seconds"]) / periodic if mode != "none" else 0.0
        print(f"{mode:>6} {r['seconds']:>8.2f} {per:>15.3f} {lost[mode]:>12.3f}")
    sync_blocked, async_blocked = (results[m]["blocked"] / periodic for m in ("sync", "async"))
    print(f"async / sync: blocked {async_blocked / sync_blocked:.2f}, "
          f"lost {lost['async'] / lost['sync']:.2f}" if lost["sync"] > 0 else "sync lost nothing measurable")


if __name__ == "__main__":
    main()
