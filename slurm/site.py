"""Site configuration: everything about a cluster that is not about the run.

A small YAML file (see slurm/sites/*.yaml) names the modules to load, how to enter the
container, environment and NCCL variables, default partition / account / QoS and extra
#SBATCH lines, so moving to a new cluster is a file, not a code edit.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rdp.pretrain.config import ConfigError
from rdp.slurm.words import SBATCH_WORD, has_control_character

SITE_DIR = Path(__file__).resolve().parent / "sites"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ContainerConfig:
    # extra srun flags, e.g. pyxis: ["--container-image=/images/rdp.sqsh", "--container-mounts=/scratch"]
    srun_args: list[str] = field(default_factory=list)
    # a command every task runs through, e.g. "apptainer exec --nv /images/rdp.sif"
    exec_prefix: str = ""


@dataclass
class SiteConfig:
    name: str = "default"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    # `module purge` first, so the job does not inherit the login shell's modules
    module_purge: bool = False
    modules: list[str] = field(default_factory=list)
    # shell lines run in the batch shell before anything else (activate a venv, cd, ...)
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # NCCL_* settings, kept apart from env so a site file reads as "network" vs "software"
    nccl: dict[str, str] = field(default_factory=dict)
    container: ContainerConfig = field(default_factory=ContainerConfig)
    # extra #SBATCH options, with or without the "#SBATCH " prefix: ["--exclusive", "--constraint=h100"]
    sbatch_lines: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)
    # how a task starts rdp; empty: this interpreter, `<python> -m rdp.launch.cli`
    rdp_command: str = ""
    cpus_per_task: int = 1
    # seconds before the time limit at which SLURM sends USR1 to the batch shell
    signal_seconds: int = 300
    # where job logs go, relative to the run dir
    log_dir: str = "slurm/logs"

    def rdp(self) -> str:
        return self.rdp_command or f"{shlex.quote(sys.executable)} -m rdp.launch.cli"


def _check(site: SiteConfig, source: str) -> SiteConfig:
    def fail(field_name: str, message: str) -> None:
        raise ConfigError(f"site config {source}: field {field_name!r}: {message}")

    if site.cpus_per_task < 1:
        fail("cpus_per_task", f"must be >= 1, got {site.cpus_per_task}")
    if site.signal_seconds < 0:
        fail("signal_seconds", f"must be >= 0, got {site.signal_seconds}")
    for section in ("env", "nccl"):
        for key in getattr(site, section):
            if not ENV_NAME.match(str(key)):
                fail(f"{section}.{key}", "is not a valid environment variable name")
    for key in site.nccl:
        if not str(key).startswith("NCCL_"):
            fail(f"nccl.{key}", "NCCL settings must start with NCCL_ (put others under env)")
    for line in site.sbatch_lines:
        option = line.removeprefix("#SBATCH").strip()
        if not option.startswith("-"):
            fail("sbatch_lines", f"{line!r} is not an sbatch option (expected e.g. --exclusive)")
    for name in ("partition", "account", "qos"):
        value = getattr(site, name)
        if value is not None and not SBATCH_WORD.match(value):
            fail(name, f"{value!r} must be a non-empty word of letters, digits and _ . / : @ % + , = ~ -")
    for name in ("name", "log_dir"):
        if not SBATCH_WORD.match(getattr(site, name)):
            fail(name, f"{getattr(site, name)!r} must be a non-empty word of letters, digits and _ . / : @ % + , = ~ -")
    # every other string reaches the script quoted, or as shell lines of the site's own (setup);
    # none may carry a second line into it
    strings = {"rdp_command": site.rdp_command, "container.exec_prefix": site.container.exec_prefix}
    for section in ("modules", "setup", "sbatch_lines", "srun_args"):
        strings.update({f"{section}[{i}]": v for i, v in enumerate(getattr(site, section))})
    strings.update({f"container.srun_args[{i}]": v for i, v in enumerate(site.container.srun_args)})
    strings.update({f"{section}.{k}": v for section in ("env", "nccl") for k, v in getattr(site, section).items()})
    for name, value in strings.items():
        if has_control_character(str(value)):
            fail(name, f"{str(value)!r} has a newline or other control character")
    return site


def load_site(path: str | Path | None) -> SiteConfig:
    """A site file by path or by name under slurm/sites/; None gives the built-in defaults."""
    if path is None:
        return SiteConfig()
    candidate = Path(path)
    if not candidate.exists():
        named = SITE_DIR / f"{path}.yaml"
        if not named.exists():
            known = ", ".join(sorted(p.stem for p in SITE_DIR.glob("*.yaml")))
            raise ConfigError(f"site config {path!r}: no such file and no site of that name (sites: {known})")
        candidate = named
    try:
        loaded = OmegaConf.load(candidate)
        merged = OmegaConf.merge(OmegaConf.structured(SiteConfig), loaded)
        site: SiteConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"site config {candidate}: field {key!r}: {getattr(exc, 'msg', exc)}") from None
    except Exception as exc:  # YAML syntax errors come from the yaml parser
        raise ConfigError(f"site config {candidate}: cannot read it: {exc}") from None
    return _check(site, str(candidate))
