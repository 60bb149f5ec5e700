"""Run untrusted generated programs (DESIGN invariant 8): one separate process per sample.

Layers of protection, each enough for some attacks and all of them together for the list
the tests exercise (infinite loop, fork bomb, huge allocation, deleting or writing the
evaluator's files, network, signalling the parent, output flooding):

1. OS limits (setrlimit in the child): CPU seconds, address space, process count, file
   size (caps output too), open files, no core dumps.
2. A wall-clock limit; on expiry the whole process group (and PID namespace) is killed.
3. Namespaces where the OS allows them (`unshare`): no network (empty netns), its own PID
   namespace (the evaluator's processes are invisible; killing its init kills everything
   inside), its own mount namespace with fresh tmpfs on /tmp, /var/tmp and /dev/shm.
4. When the evaluator runs as root: the program runs as `nobody` (it cannot write, delete
   or signal anything the evaluator owns).
5. Inside Python, an audit hook (PEP 578, cannot be removed) refuses sockets, signals,
   new processes, ctypes, and file writes / deletions outside the private working dir.

Stdout and stderr go to files the child cannot grow past the file-size limit.
"""
from __future__ import annotations

import json
import os
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

NOBODY = 65534

# Modules a program may import, loaded before the drop to `nobody` (the interpreter's own
# stdlib may sit in a directory `nobody` cannot read, e.g. under /root/.pyenv).
PRELOAD = ("math", "re", "string", "collections", "collections.abc", "itertools", "functools", "heapq",
           "bisect", "typing", "random", "statistics", "fractions", "decimal", "hashlib", "copy",
           "operator", "datetime", "json", "numbers", "array", "textwrap", "unicodedata", "cmath",
           "dataclasses", "enum", "struct", "io", "time", "traceback", "sys", "os", "warnings", "shutil",
           "socket", "signal", "subprocess", "pathlib", "tempfile", "glob", "threading")

# Runs as the sandbox process itself: set limits, leave root, lock down, then exec the program.
BOOTSTRAP = r"""
import json, os, resource, subprocess, sys
cfg = json.loads(sys.argv[1])
os.chdir(cfg["workdir"])
if cfg["private_mounts"]:
    for mount_point in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(mount_point):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mount_point],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for name in cfg["preload"]:
    try:
        __import__(name)
    except Exception:
        pass
limits = {resource.RLIMIT_CPU: cfg["cpu_s"], resource.RLIMIT_AS: cfg["memory_bytes"],
          resource.RLIMIT_FSIZE: cfg["file_bytes"], resource.RLIMIT_NOFILE: 64,
          resource.RLIMIT_CORE: 0, resource.RLIMIT_NPROC: cfg["max_processes"]}
for kind, value in limits.items():
    resource.setrlimit(kind, (value, value))
if os.getuid() == 0 and cfg["drop_to"] is not None:
    os.setgroups([])
    os.setgid(cfg["drop_to"])
    os.setuid(cfg["drop_to"])
workdir = os.path.realpath(cfg["workdir"])

def inside(path):
    try:
        path = os.fsdecode(path) if not isinstance(path, int) else None
    except Exception:
        return False
    return path is not None and (os.path.realpath(path) + "/").startswith(workdir + "/")

READABLE = tuple(os.path.realpath(p) + "/" for p in {sys.prefix, sys.base_prefix, sys.exec_prefix,
                 os.path.dirname(os.__file__), "/usr/lib", "/usr/local/lib", "/usr/share/zoneinfo"})

def readable(path):
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real in ("/dev/null", "/dev/urandom") or (real + "/").startswith(READABLE)

BLOCKED_PREFIXES = ("socket.", "os.kill", "os.killpg", "signal.pthread_kill", "os.fork", "os.forkpty",
                    "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.", "ctypes.",
                    "os.putenv", "os.unsetenv", "os.setuid", "os.chroot", "pty.", "resource.setrlimit",
                    "sys.setprofile", "sys.settrace", "_winapi.", "os.startfile", "webbrowser.")
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate", "os.chmod",
               "os.chown", "os.utime", "os.mkdir", "shutil.rmtree", "shutil.move", "shutil.copyfile",
               "os.chflags", "os.lchown", "os.setxattr", "os.removexattr", "os.listdir", "os.scandir"}

def hook(event, args):
    if event.startswith(BLOCKED_PREFIXES):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        if isinstance(mode, str):
            writing = any(c in mode for c in "wax+")
        else:
            writing = bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writing and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        if not writing and not inside(path) and not readable(path):
            raise PermissionError(f"sandbox: reading {path!r} is not allowed")
    elif event in PATH_EVENTS:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                if event in ("os.listdir", "os.scandir"):
                    break
                raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory")

if cfg["python_guard"]:
    sys.addaudithook(hook)
sys.argv = ["program.py"]
source = open("program.py").read()
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(source, "program.py", "exec"), namespace)
"""


@dataclass
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 2 * 1024 ** 3
    file_bytes: int = 1024 ** 2  # also the most output kept
    max_processes: int = 8
    # the audit-hook layer; off only to test that the OS layers hold on their own
    python_guard: bool = True


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | killed
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float


UNSHARE_RERAISE_FAILED = "unshare: sigprocmask unblock failed"


@lru_cache(maxsize=None)
def namespace_prefix() -> tuple[str, ...]:
    """The strongest `unshare` this machine allows (tried once), or () without one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    candidates = [[unshare, "--net", "--pid", "--mount", "--fork", "--kill-child"],
                  [unshare, "--net", "--pid", "--fork", "--kill-child"],
                  [unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"],
                  [unshare, "--user", "--map-root-user", "--net"]]
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return ()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Execute `source` in a fresh sandboxed interpreter; passed = exit status 0 in time."""
    root = Path(tempfile.mkdtemp(prefix="rdp-sandbox-"))
    workdir, logs = root / "work", root / "logs"
    workdir.mkdir()
    logs.mkdir(mode=0o700)
    (workdir / "program.py").write_text(source)
    is_root = os.getuid() == 0
    if is_root:
        os.chown(workdir, NOBODY, NOBODY)
        os.chown(workdir / "program.py", NOBODY, NOBODY)
    prefix = namespace_prefix()
    cfg = {"workdir": str(workdir), "cpu_s": int(limits.cpu_s), "memory_bytes": int(limits.memory_bytes),
           "file_bytes": int(limits.file_bytes), "max_processes": int(limits.max_processes),
           "preload": PRELOAD, "drop_to": NOBODY if is_root else None,
           "private_mounts": is_root and "--mount" in prefix, "python_guard": bool(limits.python_guard)}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    started = time.monotonic()
    with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
        proc = subprocess.Popen([*prefix, sys.executable, "-I", "-B", "-c", BOOTSTRAP, json.dumps(cfg)],
                                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True)
        try:
            returncode = proc.wait(timeout=limits.wall_s)
            status = "passed" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            returncode, status = proc.wait(), "timeout"
        _kill_group(proc.pid)  # anything it left behind in its group
    seconds = time.monotonic() - started
    read = lambda name: (logs / name).read_bytes()[: limits.file_bytes].decode("utf-8", "replace")  # noqa: E731
    if returncode is not None and returncode < 0 and status == "failed":
        status = "killed"
    elif status == "failed" and prefix and returncode == 1 and UNSHARE_RERAISE_FAILED in read("stderr"):
        # util-linux unshare exits 1 with this message when it cannot re-raise the signal that
        # killed the program (seen when a resource limit's signal ended it): a kill, not a failure
        status = "killed"
    result = SandboxResult(status == "passed", status, returncode, read("stdout"), read("stderr"), seconds)
    shutil.rmtree(root, ignore_errors=True)
    return result
