"""Write a job's files next to its run and hand them to sbatch.

    RUN_DIR/slurm/submission-NNN/config.yaml   the fully resolved run config
    RUN_DIR/slurm/submission-NNN/train.sbatch  the script, runnable again with plain sbatch
    RUN_DIR/slurm/jobs.jsonl                   one line per submitted job (read by `rdp status`)
    RUN_DIR/slurm/logs/                        job output
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rdp.pretrain.config import ConfigError, load_config, to_yaml
from rdp.slurm.render import JobShape, TrainJob, render_train_script
from rdp.slurm.site import SiteConfig
from rdp.slurm.words import sbatch_word

JOBS_FILE = "jobs.jsonl"
JOB_ID = re.compile(r"^(\d+)(;\S+)?$")


class SubmitError(RuntimeError):
    user_facing = True


@dataclass
class Submission:
    script_path: Path
    script: str
    job_id: str | None  # None for --dry-run


def slurm_dir(run_dir: Path) -> Path:
    return run_dir / "slurm"


def next_submission_dir(run_dir: Path) -> Path:
    base = slurm_dir(run_dir)
    base.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("-")[1]) for p in base.glob("submission-[0-9]*") if p.name.split("-")[1].isdigit()]
    number = max(taken, default=0) + 1
    while True:  # mkdir without exist_ok: two submitters never share a folder
        candidate = base / f"submission-{number:03d}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1


def sbatch(script_path: Path, extra_args: list[str] | None = None) -> str:
    """Submit and return the job id (sbatch --parsable prints `ID` or `ID;CLUSTER`)."""
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found on PATH: run on a SLURM login node, or start the local cluster "
                          "(slurm/local_cluster.sh start) and export SLURM_CONF")
    command = ["sbatch", "--parsable", *(extra_args or []), str(script_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"sbatch {script_path} failed (exit {result.returncode}): "
                          f"{(result.stderr or result.stdout).strip()}")
    match = JOB_ID.match(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "")
    if not match:
        raise SubmitError(f"sbatch {script_path}: cannot read a job id from its output {result.stdout!r}")
    return match.group(1)


def record_job(run_dir: Path, entry: dict) -> None:
    path = slurm_dir(run_dir) / JOBS_FILE
    entry = {"submitted_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **entry}
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def submit_training(config_name: str, overrides: list[str], shape: JobShape, site: SiteConfig,
                    chain: int = 1, dry_run: bool = False) -> Submission:
    if chain < 1:
        raise ConfigError(f"--chain must be >= 1, got {chain}")
    shape.check()
    # resolve once so the job does not depend on the submitter's working directory
    config = load_config(config_name, overrides)
    run_dir = Path(config.train.run_dir).expanduser().resolve()
    config = load_config(config_name, [*overrides, f"train.run_dir={run_dir}"])
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"config field 'train.run_dir': {run_dir} exists and is not a directory")
    sbatch_word("config field 'train.run_dir'", run_dir)  # before anything is created under it

    submission_dir = next_submission_dir(run_dir)
    config_path = submission_dir / "config.yaml"
    script_path = submission_dir / "train.sbatch"
    job = TrainJob(shape=shape, run_dir=run_dir, config_path=config_path, script_path=script_path,
                   max_steps=config.train.max_steps, job_name=f"rdp-{run_dir.name}",
                   workdir=Path(os.getcwd()), chain=chain)
    try:
        script = render_train_script(job, site)
    except Exception:
        shutil.rmtree(submission_dir)  # nothing half-written is left behind
        raise
    config_path.write_text(to_yaml(config))
    script_path.write_text(script)
    script_path.chmod(0o755)
    (run_dir / site.log_dir).mkdir(parents=True, exist_ok=True)
    if dry_run:
        return Submission(script_path, script, None)
    job_id = sbatch(script_path)
    record_job(run_dir, {"job_id": job_id, "kind": "train", "chain": chain, "script": str(script_path)})
    return Submission(script_path, script, job_id)
