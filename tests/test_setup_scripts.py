"""scripts/setup.sh where users run it: on a cluster login node as a normal user without
sudo, the system-package step (scripts/system_packages.sh) is skipped with one clear message
instead of failing the setup; RDP_SKIP_APT=1 skips it silently. Run as the real unprivileged
user `nobody` with a PATH on which neither mpirun nor slurmctld exists (so the step has
something to install) but apt-get does."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def login_node():
    if os.geteuid() != 0 or shutil.which("runuser") is None or shutil.which("apt-get") is None:
        pytest.skip("needs root (to become `nobody`), runuser and apt-get")
    # `nobody` cannot enter pytest's private tmp dirs
    tmp_path = Path(tempfile.mkdtemp(prefix="rdp-login-node-"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "id", "apt-get"):  # no mpirun, slurmctld, sudo
        (bin_dir / tool).symlink_to(shutil.which(tool))
    script = tmp_path / "system_packages.sh"  # a copy `nobody` can read wherever the checkout lives
    shutil.copy(REPO / "scripts" / "system_packages.sh", script)
    tmp_path.chmod(0o755)
    script.chmod(0o755)

    def run(**env):
        return subprocess.run(["runuser", "-u", "nobody", "--", "env", f"PATH={bin_dir}",
                               *(f"{k}={v}" for k, v in env.items()), str(script)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
    yield run
    shutil.rmtree(tmp_path)


def test_normal_user_without_sudo_skips_system_packages_with_one_message(login_node):
    done = login_node()
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("setup: not installing system packages (openmpi-bin libopenmpi-dev slurmctld ")
    assert "not root and no password-less sudo" in lines[0] and "RDP_SKIP_APT=1" in lines[0]


def test_rdp_skip_apt_skips_silently(login_node):
    done = login_node(RDP_SKIP_APT="1")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_setup_runs_the_system_package_step_first():
    lines = [line.strip() for line in (REPO / "scripts" / "setup.sh").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[lines.index('cd "$(dirname "$0")/.."') + 1] == "scripts/system_packages.sh"
