"""Why a run stops early, and how every rank learns it at the same step boundary.

A stop request is local: a signal to this process (SIGUSR1 = SLURM's time-limit warning,
SIGTERM = preemption, SIGINT = Ctrl-C) or, on rank 0, the job's end time coming closer than
`train.save_before_end_minutes`. The trainer folds `requested` into the one all-reduce every
step already does, so all ranks checkpoint and leave together after the same step.

A second Ctrl-C aborts at once (KeyboardInterrupt, no checkpoint): the usual escape when a
step takes long.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import subprocess
import time
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# the process exits with 128 + SIGINT after a Ctrl-C stop, as shells expect of an interrupted program
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


class StopRequests:
    """The stop handlers, installed for the training loop (`install` ... `restore`)."""

    def __init__(self, announce: bool = True):
        self.signum: Optional[int] = None
        self.reason: Optional[str] = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    @property
    def interrupted(self) -> bool:
        """Ctrl-C: the process should exit with INTERRUPTED_EXIT_CODE."""
        return self.signum == signal.SIGINT

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
        self.request(name)
        if self.announce:
            extra = " (Ctrl-C again aborts without a checkpoint)" if signum == signal.SIGINT else ""
            # os.write: safe inside a signal handler, unlike print
            os.write(2, f"rdp train: {name} received; checkpointing at the next step boundary, then "
                        f"exiting{extra}\n".encode())

    def install(self) -> None:
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


# ---- the job's wall-clock limit ---------------------------------------------------------------------
def slurm_end_time(job_id: Optional[str] = None) -> Optional[float]:
    """Epoch seconds at which the SLURM job ends (its time limit), or None: not in a job, no
    limit, or squeue unavailable. Asked of the controller, so a limit extended with
    `scontrol update` is seen on the next call."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        # squeue prints the end time in this host's local time zone
        return _dt.datetime.fromisoformat(out.splitlines()[0].strip()).timestamp()
    except (ValueError, IndexError):
        return None  # "N/A", "Unknown", "NONE": no limit to save before


class Deadline:
    """Rank 0's watch on the job's end time: `due()` turns true `margin_s` before it. The end
    time is read at start and read again before acting, so an extended limit is respected."""

    def __init__(self, margin_s: float, end_time: Callable[[], Optional[float]] = slurm_end_time,
                 clock: Callable[[], float] = time.time):
        self.margin_s = margin_s
        self._end_time = end_time
        self._clock = clock
        self.end: Optional[float] = end_time() if margin_s > 0 else None

    @property
    def active(self) -> bool:
        return self.end is not None

    def due(self) -> bool:
        if self.end is None or self._clock() < self.end - self.margin_s:
            return False
        self.end = self._end_time() or self.end  # extended since? then keep going
        return self._clock() >= self.end - self.margin_s

    def describe(self) -> str:
        end = _dt.datetime.fromtimestamp(self.end).strftime("%Y-%m-%d %H:%M:%S") if self.end else "?"
        return f"the job's time limit (ends {end}, train.save_before_end_minutes={self.margin_s / 60:g})"
