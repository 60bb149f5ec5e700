"""What the sandbox tests share: running programs through the real sandbox as a root evaluator
(in this process) and as an unprivileged one (a separate evaluator process under another uid,
started with `setpriv`; the sandbox modules are copied where that uid can read them)."""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from rdp.evals import sandbox
from rdp.evals.sandbox import SandboxLimits, bubblewrap, run_program

IS_ROOT = os.getuid() == 0

# The unprivileged evaluator: loads evals/sandbox.py by path (no rdp install needed), runs the
# programs from stdin through bubblewrap, prints their results (or why the sandbox refused).
DRIVER = r"""
import importlib.util, json, sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
job = json.load(sys.stdin)
try:
    isolation = sandbox.bubblewrap()
except sandbox.SandboxUnavailable as exc:
    print(json.dumps({"unavailable": str(exc)}))
    sys.exit(0)
limits = sandbox.SandboxLimits(**job["limits"])
with ThreadPoolExecutor(job["workers"]) as pool:
    results = pool.map(lambda src: asdict(sandbox.run_program(src, limits, isolation)), job["programs"].values())
print(json.dumps({"isolation": isolation.record(), "results": dict(zip(job["programs"], results))}))
"""


def free_uid() -> int:
    """A uid without a passwd entry or processes: the unprivileged evaluator."""
    while True:
        uid = 1_900_000_000 + secrets.randbelow(50_000_000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid


class Evaluator:
    """Who runs the sandbox: "root" (this process, when the tests run as root) or
    "unprivileged" (uid `self.uid`: another process when the tests run as root, else this one)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.uid = 0 if kind == "root" else (free_uid() if IS_ROOT else os.getuid())
        self.separate = kind == "unprivileged" and IS_ROOT
        self.home = Path(tempfile.mkdtemp(prefix="rdp-evaluator-"))
        self.home.chmod(0o755)
        self.chown(self.home)
        shutil.copy(sandbox.__file__, self.home / "sandbox.py")
        shutil.copy(Path(sandbox.__file__).with_name("sandbox_wrapper.py"), self.home / "sandbox_wrapper.py")
        (self.home / "driver.py").write_text(DRIVER)
        self.python = self._python()

    def chown(self, path: Path) -> None:
        if IS_ROOT and self.uid != 0:
            os.chown(path, self.uid, self.uid)

    def private_dir(self, parent: str) -> Path:
        """A directory of the evaluator's (results, checkpoints) the programs must not touch."""
        path = Path(tempfile.mkdtemp(prefix="rdp-evaluator-files-", dir=parent))
        (path / "results.json").write_text('{"precious": true}')
        (path / "results.json").chmod(0o600)
        (path / "checkpoint.bin").write_bytes(b"\x00weights" * 100)
        for p in (path, path / "results.json", path / "checkpoint.bin"):
            self.chown(p)
        return path

    def _command(self, *args: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "env", "-i",
                "PATH=/usr/bin:/bin", f"HOME={self.home}", *args]

    def _python(self) -> str:
        """An interpreter this uid can run (this one may live under root's 0700 home)."""
        base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        if not self.separate:
            return base
        for candidate in (base, "/usr/bin/python3"):
            if subprocess.run(self._command(candidate, "-c", "import json"), capture_output=True).returncode == 0:
                return candidate
        raise AssertionError(f"no Python interpreter runnable by uid {self.uid} (tried {base}, /usr/bin/python3)")

    def run(self, programs: dict[str, str], limits: SandboxLimits, workers: int = 6) -> dict:
        """{"isolation": record, "results": {name: SandboxResult as dict}} or {"unavailable": message}."""
        if not self.separate:
            isolation = bubblewrap()
            with ThreadPoolExecutor(workers) as pool:
                results = pool.map(lambda src: asdict(run_program(src, limits, isolation)), programs.values())
            return {"isolation": isolation.record(), "results": dict(zip(programs, results))}
        return self.run_command(self._command(*self.driver()), programs, limits, workers)

    def driver(self) -> list[str]:
        """The evaluator-process command line (to run as this evaluator's uid)."""
        return [self.python, str(self.home / "driver.py"), str(self.home / "sandbox.py")]

    def run_command(self, command: list[str], programs: dict[str, str], limits: SandboxLimits, workers: int) -> dict:
        job = json.dumps({"programs": programs, "limits": asdict(limits), "workers": workers})
        done = subprocess.run(command, input=job, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"the evaluator process failed: {done.stderr[-2000:]}"
        return json.loads(done.stdout)

    def close(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
