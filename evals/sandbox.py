"""Run untrusted generated programs, never in the evaluator's own process: one sandboxed process per sample.

Isolation is bubblewrap (`bwrap`, Debian package `bubblewrap`), for root and non-root
evaluators alike:
- a read-only view of /usr (and the /bin, /lib... links) and of the Python installation only:
  the evaluator's home, run directories and checkpoints are not in the program's world;
- a private writable tmpfs /tmp (the working dir, size-capped), fresh /proc and minimal /dev;
- its own network namespace (loopback only: no host port is reachable), PID, IPC and UTS
  namespaces; when the run ends (or is killed) the namespace's init dies and the kernel
  kills every process left in it, daemons included;
- kernel limits (set in the sandbox before the program runs): CPU seconds, address space,
  processes, file size (also caps the kept output), open files, no core dumps;
- a root evaluator runs bwrap as root and the program as a fresh uid per run (no passwd
  entry, no capabilities, no_new_privs); a non-root evaluator's bwrap runs it in a new user
  namespace as the evaluator's uid, seeing none of the evaluator's files.

A sample passes only when its program ran to the end (evals/sandbox_wrapper.py explains the
token channel); exit status, output, kills and timeouts never make a pass.

Without a working bwrap, running generated code is refused (SandboxUnavailable) unless the
caller asks for `unsafe_isolation()` (`rdp eval --unsafe-no-sandbox`), which results record.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

WRAPPER = (Path(__file__).parent / "sandbox_wrapper.py").read_text()
# a root evaluator's programs run as a random uid from here (no passwd entry): their process
# count (RLIMIT_NPROC is per uid) and files are their own, not shared with other runs
RUN_UID_BASE, RUN_UID_SPAN = 2_000_000_000, 100_000_000
INSTALL_HINT = "install bubblewrap (`apt-get install bubblewrap`; scripts/setup.sh does)"
UNSAFE_HINT = "or pass --unsafe-no-sandbox to execute generated code without isolation (recorded in the results)"


class SandboxUnavailable(RuntimeError):
    user_facing = True


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1024 ** 3  # address space per process
    file_bytes: int = 1024 ** 2  # largest file it may write; also the most output kept
    max_processes: int = 8  # processes + threads
    open_files: int = 64
    tmp_bytes: int = 64 * 1024 ** 2  # its private /tmp
    python_guard: bool = True  # the in-process audit hook, an extra layer only


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | killed
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class Isolation:
    kind: str  # "bubblewrap" or "none"
    bwrap: Optional[str] = None
    version: str = ""
    disable_userns: bool = False  # bwrap >= 0.8 can forbid nested user namespaces

    def record(self) -> dict:
        """How samples were executed, for the results."""
        if self.kind == "none":
            return {"sandbox": "none", "unsafe_no_sandbox": True}
        root = os.getuid() == 0
        return {"sandbox": "bubblewrap", "bwrap_version": self.version, "unsafe_no_sandbox": False,
                "evaluator": "root" if root else "non-root",
                "program_uid": "a fresh uid per run" if root else "the evaluator's uid in a new user namespace",
                "namespaces": ["mount", "pid", "net", "ipc", "uts"] + ([] if root else ["user"]),
                "nested_user_namespaces": "n/a" if root else ("disabled" if self.disable_userns else "allowed")}


def unsafe_isolation() -> Isolation:
    """No OS sandbox: the program runs as the evaluator with only the kernel limits and the
    in-process guard. For machines without bwrap, by explicit request only."""
    return Isolation("none")


def isolation_for(unsafe_no_sandbox: bool) -> Isolation:
    return unsafe_isolation() if unsafe_no_sandbox else bubblewrap()


def bubblewrap(bwrap: Optional[str] = None) -> Isolation:
    """The bubblewrap sandbox, checked once per process by running a small program through it;
    SandboxUnavailable (one line: why, and what to do) when it does not work here."""
    path = bwrap or shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(f"sandbox: `bwrap` not found on PATH; generated code is executed only inside "
                                 f"a sandbox: {INSTALL_HINT}, {UNSAFE_HINT}")
    return _probe(os.path.realpath(path), os.getuid())


@lru_cache(maxsize=None)
def _probe(path: str, uid: int) -> Isolation:
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.split()[-1]
        usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, IndexError, subprocess.SubprocessError) as exc:
        raise SandboxUnavailable(f"sandbox: {path} does not run ({exc}); {INSTALL_HINT}, {UNSAFE_HINT}") from None
    isolation = Isolation("bubblewrap", path, version, "--disable-userns" in usage)
    result = run_program("import os\nopen('probe', 'w').write('ok')\nassert open('probe').read() == 'ok'\n",
                         SandboxLimits(wall_s=60), isolation)
    if not result.passed:
        why = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), result.status)
        hint = ("" if uid == 0 else " (a non-root bwrap needs unprivileged user namespaces: sysctl "
                "user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1, "
                "kernel.apparmor_restrict_unprivileged_userns=0 where those exist)")
        raise SandboxUnavailable(f"sandbox: bubblewrap ({path}) cannot run programs here: {why}{hint}; {UNSAFE_HINT}")
    return isolation


def _python() -> tuple[str, list[str]]:
    """The base interpreter (not a venv's: programs get the standard library only) and the
    directories it needs that lie outside /usr."""
    executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(executable))}
    outside = sorted(p for p in needed if p != "/usr" and not p.startswith("/usr/"))
    return executable, [p for p in outside if not any(p.startswith(q + "/") for q in outside)]


def _bwrap_command(isolation: Isolation, limits: SandboxLimits) -> list[str]:
    root = os.getuid() == 0
    cmd = [isolation.bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
           "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if root:  # the wrapper needs these two to become the run's uid; it has none afterwards
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user"] + (["--disable-userns"] if isolation.disable_userns else [])
    cmd += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{name}"
        if os.path.islink(host):
            cmd += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            cmd += ["--ro-bind", host, host]
    cmd += ["--perms", "0755", "--dir", "/etc", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    executable, prefixes = _python()
    for prefix in prefixes:
        parents = list(Path(prefix).parents)[-2::-1]  # /a, /a/b, ... (bwrap would copy their modes)
        for parent in parents:
            cmd += ["--perms", "0755", "--dir", str(parent)]
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(limits.tmp_bytes),
            "--tmpfs", "/tmp", "--remount-ro", "/", "--chdir", "/tmp", "--clearenv",
            "--setenv", "HOME", "/tmp", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONHASHSEED", "0", "--", executable]
    return cmd


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(source: str, limits: SandboxLimits = SandboxLimits(),
                isolation: Optional[Isolation] = None) -> SandboxResult:
    """Execute `source` in a fresh sandboxed interpreter; passed = its last statement returned
    (the run's token came back), within the limits."""
    isolation = isolation or bubblewrap()
    sandboxed = isolation.kind == "bubblewrap"
    token = secrets.token_hex(32).encode()
    token_r, token_w = os.pipe()
    report_r, report_w = os.pipe()
    os.write(token_w, token)
    os.close(token_w)
    run_as = RUN_UID_BASE + secrets.randbelow(RUN_UID_SPAN) if sandboxed and os.getuid() == 0 else None
    cfg = {"token_fd": token_r, "report_fd": report_w, "cpu_s": int(limits.cpu_s),
           "memory_bytes": int(limits.memory_bytes), "file_bytes": int(limits.file_bytes),
           "open_files": int(limits.open_files), "max_processes": int(limits.max_processes), "run_as": run_as,
           "python_guard": bool(limits.python_guard), "pid_namespace": sandboxed}
    if sandboxed:
        cmd, workdir = _bwrap_command(isolation, limits), None
    else:
        cmd, workdir = [os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)], \
            tempfile.mkdtemp(prefix="rdp-unsafe-run-")
    cmd += ["-I", "-B", "-c", WRAPPER, json.dumps(cfg)]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": workdir or "/"}
    started = time.monotonic()
    timed_out = False
    with tempfile.TemporaryFile() as program, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        program.write(source.encode())
        program.seek(0)
        try:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=program, stdout=out, stderr=err,
                                    pass_fds=(token_r, report_w), start_new_session=True)
        finally:
            os.close(token_r)
            os.close(report_w)
        try:
            returncode = proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)  # bwrap: its namespace's init dies with it, and every process in there
            returncode = proc.wait()
        _kill_group(proc.pid)  # unsafe mode: what the program left in its process group
        seconds = time.monotonic() - started
        fcntl.fcntl(report_r, fcntl.F_SETFL, os.O_NONBLOCK)  # a stray writer must not block us
        try:
            report = os.read(report_r, len(token) + 1)
        except BlockingIOError:
            report = b""
        os.close(report_r)
        read = lambda f: (f.seek(0), f.read(limits.file_bytes))[1].decode("utf-8", "replace")  # noqa: E731
        stdout, stderr = read(out), read(err)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    if report == token and not timed_out:
        status = "passed"
    elif timed_out:
        status = "timeout"
    elif returncode < 0 or (sandboxed and 128 < returncode <= 128 + 64):  # bwrap exits 128 + signal
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(status == "passed", status, returncode, stdout, stderr, seconds)
