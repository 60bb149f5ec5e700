"""What rank 0 shows while training: a progress bar on a terminal, plain log lines elsewhere.

SLURM job logs and `rdp train --no-progress` have no terminal: a bar there would be either
nothing or a wall of carriage returns. Instead, every `train.log_every` steps one line:

    step 40/80 | loss 2.8351 | 10,624 tokens/s | (n, k) = (3, 2) | MFU 31.2%

loss and (n, k) are those of that step; tokens/s and MFU are averaged over the steps since
the previous line (steps differ in depth, so one step's speed says little). Without a known
peak (CPU, or a device not in the table and no `train.peak_flops`) the line says `MFU n/a`
with the achieved model FLOP/s per device beside it.
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO

from tqdm import tqdm


class StepReporter:
    def __init__(self, total: int, initial: int, show: bool, progress: bool, log_every: int,
                 stream: Optional[TextIO] = None):
        self.total = total
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stdout
        self.bar = None
        self.lines = False
        if show:
            if progress and sys.stderr.isatty():
                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step")
            else:
                self.lines = True
        self._window = {"tokens": 0.0, "seconds": 0.0, "flops": 0.0, "steps": 0}

    def update(self, record: dict, tokens: int, seconds: float, peak_flops: Optional[float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", nk=f"({record['n']},{record['k']})",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            self.bar.update(1)
        if not self.lines:
            return
        window = self._window
        window["tokens"] += tokens
        window["seconds"] += seconds
        window["flops"] += record.get("model_flops_per_s", 0.0) * seconds
        window["steps"] += 1
        if record["step"] % self.log_every and record["step"] != self.total:
            return
        self.stream.write(self.line(record, peak_flops) + "\n")
        self.stream.flush()
        self._window = {key: 0 for key in window}

    def line(self, record: dict, peak_flops: Optional[float]) -> str:
        window = self._window
        seconds = max(window["seconds"], 1e-12)
        rate = window["flops"] / seconds
        speed = f"MFU {100 * rate / peak_flops:.1f}%" if peak_flops else f"MFU n/a ({rate / 1e9:,.2f} GFLOP/s/device)"
        loss = f"{record['loss']:.4f}" + (" (skipped: non-finite)" if record.get("skipped") else "")
        return (f"step {record['step']}/{self.total} | loss {loss} | {window['tokens'] / seconds:,.0f} tokens/s | "
                f"(n, k) = ({record['n']}, {record['k']}) | {speed}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
