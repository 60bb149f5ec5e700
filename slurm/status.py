"""`rdp status RUN_DIR`: the run's jobs and their states, the newest checkpoint, tokens
seen and the last logged loss. Reads the run dir and asks squeue / scontrol; never
imports torch, so it answers in a fraction of a second on a login node."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rdp.slurm.render import FINISHED_MARKER
from rdp.slurm.submit import JOBS_FILE, slurm_dir

CHECKPOINT_NAME = re.compile(r"^step_0*(\d+)$")
METRICS_FILE = "metrics.jsonl"


@dataclass
class JobState:
    job_id: str  # "123" or "123_4" for an array task
    state: str
    restarts: int = 0
    reason: str = ""


@dataclass
class RunStatus:
    run_dir: Path
    jobs: list[JobState] = field(default_factory=list)
    newest_checkpoint: Optional[str] = None
    checkpoint_step: Optional[int] = None
    finished: bool = False
    last_step: Optional[int] = None
    tokens_seen: Optional[int] = None
    last_loss: Optional[float] = None


def newest_checkpoint(run_dir: Path) -> tuple[Optional[str], Optional[int]]:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None, None
    name = pointer.read_text().strip()
    match = CHECKPOINT_NAME.match(name)
    return name, int(match.group(1)) if match else None


def last_metrics(run_dir: Path) -> Optional[dict]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return None
    last = None
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                last = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed job; the earlier ones still count
    return last


def _key_values(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def query_jobs(job_ids: list[str]) -> dict[str, list[JobState]]:
    """scontrol knows finished jobs for MinJobAge seconds (no accounting database needed)."""
    found: dict[str, list[JobState]] = {}
    if shutil.which("scontrol") is None:
        return found
    for job_id in job_ids:
        result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        states = []
        for line in result.stdout.splitlines():
            fields = _key_values(line)
            if "JobState" not in fields:
                continue
            shown = fields.get("JobId", job_id)
            if fields.get("ArrayTaskId"):
                shown = f"{fields.get('ArrayJobId', job_id)}_{fields['ArrayTaskId']}"
            states.append(JobState(shown, fields["JobState"], int(fields.get("Restarts", "0") or 0),
                                   fields.get("Reason", "")))
        found[job_id] = states
    return found


def run_finished(run_dir: Path, max_steps: Optional[int]) -> bool:
    if (run_dir / FINISHED_MARKER).exists():
        return True
    _, step = newest_checkpoint(run_dir)
    return step is not None and max_steps is not None and step >= max_steps


def _max_steps(run_dir: Path) -> Optional[int]:
    # the newest submission's config is what the jobs run
    configs = sorted(slurm_dir(run_dir).glob("submission-*/config.yaml"))
    for candidate in reversed(configs):
        match = re.search(r"^\s+max_steps:\s*(\d+)\s*$", candidate.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


def run_status(run_dir: str | Path) -> RunStatus:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    status = RunStatus(run_dir)
    jobs_file = slurm_dir(run_dir) / JOBS_FILE
    recorded = []
    if jobs_file.exists():
        recorded = [json.loads(line)["job_id"] for line in jobs_file.read_text().splitlines() if line.strip()]
    states = query_jobs(recorded)
    for job_id in recorded:
        status.jobs.extend(states.get(job_id) or [JobState(job_id, "UNKNOWN (no longer known to slurmctld)")])
    status.newest_checkpoint, status.checkpoint_step = newest_checkpoint(run_dir)
    status.finished = run_finished(run_dir, _max_steps(run_dir))
    metrics = last_metrics(run_dir)
    if metrics:
        status.last_step = metrics.get("step")
        status.tokens_seen = metrics.get("tokens")
        status.last_loss = metrics.get("loss")
    return status


def format_status(status: RunStatus) -> str:
    lines = [f"run {status.run_dir}" + (" (finished)" if status.finished else "")]
    if status.jobs:
        lines.append("jobs:")
        for job in status.jobs:
            extra = f"  restarts={job.restarts}" if job.restarts else ""
            reason = f"  ({job.reason})" if job.reason and job.reason != "None" else ""
            lines.append(f"  {job.job_id:<14} {job.state}{extra}{reason}")
    else:
        lines.append("jobs: none submitted from this run dir")
    checkpoint = status.newest_checkpoint or "none"
    if status.checkpoint_step is not None:
        checkpoint += f" (step {status.checkpoint_step})"
    lines.append(f"newest checkpoint: {checkpoint}")
    lines.append(f"last logged step: {status.last_step if status.last_step is not None else 'none'}")
    lines.append(f"tokens seen: {status.tokens_seen:,}" if status.tokens_seen is not None else "tokens seen: none")
    lines.append(f"last loss: {status.last_loss:.6f}" if status.last_loss is not None else "last loss: none")
    return "\n".join(lines)
