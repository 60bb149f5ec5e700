"""sbatch scripts from templates: the job's shape (nodes, tasks, GPUs, time) comes from the
command line, the cluster's specifics from a SiteConfig, the shell logic from
slurm/templates/*.sbatch.tmpl. Placeholders are `{{name}}`; an unknown or unused one is
an error, so a template and this module cannot drift apart silently."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from rdp.pretrain.config import ConfigError
from rdp.slurm.site import SiteConfig
from rdp.slurm.words import SHELL_BLOCKS, has_control_character, sbatch_word, shell_words

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# the trainer writes this into the run dir when train.max_steps is reached
FINISHED_MARKER = "FINISHED"
TIME_FORMATS = (
    re.compile(r"^(?P<m>\d+)$"),
    re.compile(r"^(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
)


def time_limit_seconds(value: str) -> int:
    """sbatch --time in any of SLURM's formats (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) -> seconds."""
    for pattern in TIME_FORMATS:
        match = pattern.match(value.strip())
        if match:
            parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
            seconds = (parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600
                       + parts.get("m", 0) * 60 + parts.get("s", 0))
            if seconds <= 0:
                break
            return seconds
    raise ConfigError(f"--time {value!r}: expected HH:MM:SS, MM, MM:SS or D-HH:MM:SS and more than 0")


def fill(template_name: str, values: dict[str, object]) -> str:
    text = (TEMPLATE_DIR / template_name).read_text()
    wanted = set(PLACEHOLDER.findall(text))
    missing, unused = wanted - values.keys(), values.keys() - wanted
    if missing or unused:
        raise RuntimeError(f"template {template_name}: missing values {sorted(missing)}, unused {sorted(unused)}")
    for name, value in values.items():
        # last line of defence: a single-line value never adds a line to the script
        if name not in SHELL_BLOCKS and has_control_character(str(value)):
            raise ConfigError(f"template value {name}: {str(value)!r} has a newline or other control character")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def sbatch_option_lines(options: list[tuple[str, Optional[str]]], extra: list[str]) -> str:
    lines = [f"#SBATCH --{name}" if value is None else f"#SBATCH --{name}={sbatch_word(f'#SBATCH --{name}', value)}"
             for name, value in options]
    for line in extra:  # the site's own options, checked by slurm/site.py (one line each)
        if has_control_character(line):
            raise ConfigError(f"site config field 'sbatch_lines': {line!r} has a newline or other control character")
        lines.append(f"#SBATCH {line.removeprefix('#SBATCH').strip()}")
    return "\n".join(lines)


def setup_lines(site: SiteConfig) -> str:
    lines = []
    if site.module_purge:
        lines.append("module purge")
    lines += [f"module load {shlex.quote(module)}" for module in site.modules]
    lines += list(site.setup)
    return "\n".join(lines) if lines else "# (no modules or setup lines)"


def env_lines(site: SiteConfig, extra: dict[str, str] | None = None) -> str:
    merged = {**site.env, **site.nccl, **(extra or {})}
    return "\n".join(f"export {name}={shlex.quote(str(value))}" for name, value in merged.items())


def task_command(site: SiteConfig, arguments: list[str]) -> str:
    prefix = shell_words("site config field 'container.exec_prefix'", site.container.exec_prefix)
    rdp = shell_words("site config field 'rdp_command'", site.rdp_command) if site.rdp_command else site.rdp()
    return " ".join(filter(None, [prefix, rdp, *(shlex.quote(a) for a in arguments)]))


def srun_flags(site: SiteConfig) -> list[str]:
    """The site's extra srun flags, each one shell word whatever it holds."""
    return [shlex.quote(flag) for flag in site.srun_args + site.container.srun_args]


@dataclass
class JobShape:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time: str
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None

    def check(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node < 1:
            raise ConfigError(f"--tasks-per-node must be >= 1, got {self.tasks_per_node}")
        time_limit_seconds(self.time)

    @property
    def total_tasks(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass
class TrainJob:
    shape: JobShape
    run_dir: Path
    config_path: Path
    script_path: Path
    max_steps: int
    job_name: str
    workdir: Path
    chain: int = 1
    extra_overrides: list[str] = field(default_factory=list)


def scheduling_options(shape: JobShape, site: SiteConfig, cpus_per_task: int) -> list[tuple[str, Optional[str]]]:
    options: list[tuple[str, Optional[str]]] = [
        ("nodes", str(shape.nodes)),
        ("ntasks-per-node", str(shape.tasks_per_node)),
    ]
    if shape.gpus_per_node:
        options.append(("gpus-per-node", str(shape.gpus_per_node)))
    options += [("cpus-per-task", str(cpus_per_task)), ("time", shape.time)]
    for name in ("partition", "account", "qos"):
        value = getattr(shape, name) or getattr(site, name)
        if value:
            options.append((name, value))
    return options


def srun_line(shape: JobShape, site: SiteConfig, command: str) -> str:
    flags = [f"--nodes={shape.nodes}", f"--ntasks={shape.total_tasks}",
             f"--ntasks-per-node={shape.tasks_per_node}", f"--cpus-per-task={site.cpus_per_task}",
             "--kill-on-bad-exit=1"]
    flags += srun_flags(site)
    return "srun " + " ".join(flags) + " " + command


def render_train_script(job: TrainJob, site: SiteConfig) -> str:
    job.shape.check()
    sbatch_word("config field 'train.run_dir'", job.run_dir)
    sbatch_word("job name", job.job_name)
    sbatch_word("the working directory (#SBATCH --chdir)", job.workdir)
    sbatch_word("site config field 'log_dir'", site.log_dir)
    limit = time_limit_seconds(job.shape.time)
    if site.signal_seconds >= limit:
        raise ConfigError(f"site config field 'signal_seconds': {site.signal_seconds} s warning does not fit "
                          f"in --time {job.shape.time} ({limit} s)")
    log_dir = job.run_dir / site.log_dir
    # signal_seconds 0: no warning signal (the trainer's train.save_before_end_minutes still works)
    warning = [("signal", f"B:USR1@{site.signal_seconds}")] if site.signal_seconds else []
    options = [("job-name", job.job_name)] + scheduling_options(job.shape, site, site.cpus_per_task) + warning + [
        ("requeue", None),
        # a requeued job appends to its log instead of truncating the earlier attempt
        ("open-mode", "append"),
        ("output", str(log_dir / ("%x-%A_%a.out" if job.chain > 1 else "%x-%j.out"))),
        ("chdir", str(job.workdir)),
    ]
    if job.chain > 1:
        # one segment at a time, each resuming from the newest complete checkpoint
        options.append(("array", f"0-{job.chain - 1}%1"))
    arguments = ["train", str(job.config_path), "train.resume=auto", *job.extra_overrides, "--no-progress"]
    return fill("train.sbatch.tmpl", {
        "run_dir": job.run_dir,
        "run_dir_quoted": shlex.quote(str(job.run_dir)),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "script_path": job.script_path,
        "sbatch_lines": sbatch_option_lines(options, site.sbatch_lines),
        "site_name": site.name,
        "setup_lines": setup_lines(site),
        "max_steps": job.max_steps,
        "requeue_on_signal": 0 if job.chain > 1 else 1,
        "env_lines": env_lines(site),
        "finished_marker": FINISHED_MARKER,
        "srun_line": srun_line(job.shape, site, task_command(site, arguments)),
    })
