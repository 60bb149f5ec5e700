"""The code sandbox, for real (bubblewrap), as a root and as an unprivileged evaluator:
a program passes only when it ran to its end; hostile programs fail and leave no trace;
without a working sandbox nothing is executed unless the caller asks for the unsafe mode."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sandbox_helpers import IS_ROOT, Evaluator

from rdp.evals.humaneval import load_problems, program_for
from rdp.evals.sandbox import SandboxLimits, SandboxUnavailable, bubblewrap, run_program, unsafe_isolation

# the OS alone must hold: the in-process guard is off unless a test says otherwise
LIMITS = SandboxLimits(wall_s=6.0, cpu_s=3, memory_bytes=256 * 1024 ** 2, file_bytes=64 * 1024,
                       max_processes=8, tmp_bytes=16 * 1024 ** 2, python_guard=False)

# Every hostile program tries its harmful steps one by one and ends normally (would pass) only if
# one of them worked; the tests then also check the host for any effect.
ATTEMPT = """
import os, shutil, socket, subprocess, sys, time
succeeded = []
def attempt(name, action):
    try:
        action()
    except BaseException as exc:
        print(f"blocked {name}: {type(exc).__name__}: {exc}")
    else:
        print(f"SUCCEEDED {name}")
        succeeded.append(name)
"""
END = "assert succeeded, 'every attempt was blocked'\n"


@pytest.fixture(params=["root", "unprivileged"])
def evaluator(request):
    if request.param == "root" and not IS_ROOT:
        pytest.skip("the root-evaluator case needs the tests to run as root (CI does)")
    who = Evaluator(request.param)
    yield who
    who.close()


def exit_tricks() -> dict[str, str]:
    """A real HumanEval problem whose completion ends the process, before or inside check()."""
    problem = load_problems()[0]
    completions = {
        "exit()": "    exit(0)\n", "quit()": "    quit()\n", "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
        "os._exit(0)": "    import os\n    os._exit(0)\n", "raise SystemExit": "    raise SystemExit(0)\n",
        "atexit exit 0": "    import atexit, os\n    atexit.register(os._exit, 0)\n    return None\n",
        "excepthook": "    import sys\n    sys.excepthook = lambda *a: None\n    return None\n",
        "print a pass": "    print('passed')\n    import sys\n    sys.stdout.flush()\n    sys.exit(0)\n",
        "exit from a thread": ("    import os, threading, time\n    threading.Thread(target=os._exit, args=(0,)).start()\n"
                               "    time.sleep(5)\n"),
        "kill itself": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
        "exec a new interpreter": "    import os, sys\n    os.execv(sys.executable, [sys.executable, '-c', 'pass'])\n",
    }
    return {name: program_for(problem, completion) for name, completion in completions.items()}


def host_addresses() -> list[str]:
    """The host's IPv4 addresses, loopback and the network interfaces' (SIOCGIFADDR)."""
    found = {"127.0.0.1"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            found.add(socket.inet_ntoa(packed[20:24]))
    return sorted(found)


def hostile_programs(victims: list[Path], port: int, outside: list[str], private: str, marker: str) -> dict[str, str]:
    """`outside`: host paths no program may create; `private`: a /tmp path a program writes
    inside the sandbox (its own /tmp) that must not appear on the host."""
    files = [str(v / name) for v in victims for name in ("results.json", "checkpoint.bin")]
    victim = files[0]
    reads = "".join(f"attempt('read {f}', lambda: print(open({f!r}).read()[:20]))\n" for f in files + ["/etc/shadow"])
    reads += "".join(f"attempt('list {v}', lambda: print(os.listdir({str(v)!r})))\n" for v in victims)
    reads += f"attempt('copy into the working dir', lambda: shutil.copy({victim!r}, 'stolen.json'))\n"
    deletes = "".join(f"attempt('delete {f}', lambda: os.remove({f!r}))\n" for f in files)
    deletes += "".join(f"attempt('rmtree {v}', lambda: shutil.rmtree({str(v)!r}))\n" for v in victims)
    deletes += f"attempt('rename', lambda: os.rename({files[1]!r}, {files[1] + '.moved'!r}))\n"
    writes = "".join(f"attempt('write {p}', lambda: open({p!r}, 'w').write('x'))\n" for p in outside)
    connect = "".join(f"attempt('connect {h}', lambda: socket.create_connection(({h!r}, {port}), timeout=2)"
                      ".sendall(b'leak'))\n" for h in host_addresses())
    shell = (f"attempt('shell', lambda: subprocess.run('cat {victim} && echo x > {outside[0]}', shell=True, check=True))\n"
             f"attempt('os.system', lambda: os.system('echo x > {outside[1]}') == 0 or 1 / 0)\n")
    guard_off = ("import sys\nsys.modules['__main__'].GUARD_ACTIVE = False\n"
                 "import socket\nsocket.socket().close()\nprint('GUARD OFF')\n")
    return {
        "read evaluator files": ATTEMPT + reads + END,
        "delete evaluator files": ATTEMPT + deletes + END,
        "write outside": ATTEMPT + f"open({private!r}, 'w').write('x')\n" + writes + END,
        "connect to a host port": ATTEMPT + connect + END,
        "shell": ATTEMPT + shell + END,
        # ends normally with its daemon alive; the daemon would write outside and read a victim later
        "double-forked daemon": (
            "import os, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sh', ['sh', '-c', 'sleep 3; echo late > {outside[2]}; "
            f"cat {victim} > {outside[3]}; exec sleep {marker}'])\n"
            "    os._exit(0)\n"
            "time.sleep(0.5)\n"),
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "memory bomb": ATTEMPT + "attempt('50 GiB', lambda: bytearray(50 * 1024 ** 3))\n"
                       "blocks = []\nattempt('grow', lambda: [blocks.append(b'x' * 64 * 1024 ** 2) for _ in range(64)])\n"
                       "del blocks\n" + END,
        "fill the private tmp": ATTEMPT + "attempt('100 MB in files', lambda: [open(f'f{i}', 'wb').write(b'x' * 60000)"
                                          " for i in range(1700)])\n" + END,
        "time bomb (sleep)": "import time\ntime.sleep(3600)\n",
        "time bomb (spin)": "while True:\n    pass\n",
        "output flood": "while True:\n    print('x' * 10000)\n",
        "signal the evaluator": ATTEMPT + "import signal\n"
                                "attempt('kill -1', lambda: os.kill(-1, signal.SIGKILL))\n"
                                f"succeeded.clear()\nattempt('reach the evaluator', lambda: os.kill({os.getpid()}, 0))\n"
                                + END,
        # with the audit-hook layer on: switch it off, then the same harm; the OS must hold
        "disable the in-process guard": guard_off + ATTEMPT + reads + writes + connect + END,
    }


def processes_with(marker: str, grace_s: float = 3.0) -> list[str]:
    """Live processes whose command line holds `marker` (zombies have exited already)."""
    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state not in "ZX":
                found.append(f"{pid} {cmdline}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def snapshot(directory: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_uid) for p in sorted(directory.iterdir())}


def test_a_pass_needs_the_program_to_run_to_its_end(evaluator):
    problem = load_problems()[0]
    programs = {**exit_tricks(), "canonical": program_for(problem, problem["canonical_solution"]),
                "wrong": program_for(problem, "    return None\n")}
    outcome = evaluator.run(programs, LIMITS)
    results = outcome["results"]
    assert results["canonical"]["passed"] and results["canonical"]["status"] == "passed", results["canonical"]
    assert not results["wrong"]["passed"] and "AssertionError" in results["wrong"]["stderr"]
    for name in exit_tricks():
        assert not results[name]["passed"], (name, results[name])
        assert results[name]["status"] in ("failed", "killed"), (name, results[name])
    # these end with exit status 0, which used to count as a pass
    for name in ("exit()", "sys.exit(0)", "os._exit(0)", "raise SystemExit", "atexit exit 0", "exec a new interpreter"):
        assert results[name]["returncode"] == 0, (name, results[name])
    assert results["kill itself"]["status"] == "killed"
    assert outcome["isolation"]["sandbox"] == "bubblewrap"
    assert outcome["isolation"]["evaluator"] == ("root" if evaluator.kind == "root" else "non-root")


def test_hostile_programs_fail_and_leave_no_trace(evaluator):
    victims = [evaluator.private_dir("/tmp"), evaluator.private_dir("/var/tmp")]
    before = {v: snapshot(v) for v in victims}
    tag = uuid.uuid4().hex
    python_dir = os.path.dirname(os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable))
    outside = [f"/var/tmp/rdp-escape-{tag}-{i}" for i in range(4)] + [
        f"/usr/rdp-escape-{tag}", f"/rdp-escape-{tag}", f"{python_dir}/rdp-escape-{tag}",
        str(victims[0] / "planted.py"), str(victims[1] / "planted.py"), str(evaluator.home / "planted.py")]
    private = f"/tmp/rdp-escape-{tag}-private"
    marker = f"86400.{secrets.randbelow(10 ** 9):09d}"
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        programs = hostile_programs(victims, port, outside, private, marker)
        # control: without the sandbox the same programs do reach the port and read the files
        for name in ("connect to a host port", "read evaluator files"):
            result = run_program(programs[name], LIMITS, unsafe_isolation())
            assert result.passed and "SUCCEEDED" in result.stdout, (name, result)
        for _ in host_addresses():  # the control's connections
            server.accept()[0].close()
        server.setblocking(False)
        guarded = {name: programs.pop(name) for name in ["disable the in-process guard"]}
        guarded["guard on"] = "import socket\nsocket.socket()\n"

        started = time.monotonic()
        results = evaluator.run(programs, LIMITS, workers=len(programs))["results"]
        results.update(evaluator.run(guarded, SandboxLimits(**{**LIMITS.__dict__, "python_guard": True}))["results"])
        elapsed = time.monotonic() - started

        for name, result in results.items():
            assert not result["passed"] and result["status"] != "passed", (name, result)
            assert "SUCCEEDED" not in result["stdout"], (name, result["stdout"])
            assert len(result["stdout"]) <= LIMITS.file_bytes and len(result["stderr"]) <= LIMITS.file_bytes
        assert "GUARD OFF" in results["disable the in-process guard"]["stdout"]
        assert "sandbox guard: socket" in results["guard on"]["stderr"]
        for name in ("time bomb (sleep)", "time bomb (spin)"):
            assert results[name]["status"] in ("timeout", "killed"), (name, results[name])
        assert "thread(s)/process(es) running" in results["double-forked daemon"]["stderr"]
        assert results["output flood"]["stdout"].startswith("x" * 100)
        assert elapsed < 3 * LIMITS.wall_s + 30, f"the hostile programs held the evaluator {elapsed:.0f}s"

        time.sleep(max(0.0, 3.5 - (time.monotonic() - started)))  # the daemon's delay, had it survived
        assert processes_with(marker) == []
        for victim in victims:
            assert snapshot(victim) == before[victim], victim
        assert [p for p in outside + [private] if os.path.lexists(p)] == []
        with pytest.raises(BlockingIOError):  # no connection ever reached the port
            server.accept()
    finally:
        server.close()
        for victim in victims:
            shutil.rmtree(victim, ignore_errors=True)


def test_ordinary_code_gets_a_private_writable_dir(evaluator):
    program = ("import json, os\nopen('scratch.txt', 'w').write('ok')\nos.mkdir('d')\n"
               "print(json.dumps({'read': open('scratch.txt').read(), 'cwd': os.getcwd(), 'here': sorted(os.listdir('.')),"
               " 'root': sorted(os.listdir('/')), 'etc': os.listdir('/etc')}))\n")
    result = evaluator.run({"ok": program}, LIMITS)["results"]["ok"]
    assert result["passed"], result
    seen = json.loads(result["stdout"])
    assert (seen["read"], seen["cwd"], seen["here"]) == ("ok", "/tmp", ["d", "scratch.txt"])
    # the system's view: /usr and its links, the interpreter's prefix, nothing else of the host
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    python = python if evaluator.kind == "root" else evaluator.python
    top = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "proc", "dev", "tmp", python.split("/")[1]}
    assert set(seen["root"]) <= top and seen["etc"] in ([], ["ld.so.cache"]), seen


def nested_user_namespaces(levels: int) -> list[str]:
    return ["unshare", "--user", "--map-root-user"] * levels


def test_refuses_without_a_working_sandbox(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match=r"`bwrap` not found on PATH.*apt-get install bubblewrap.*"
                                                 r"--unsafe-no-sandbox"):
        bubblewrap()
    monkeypatch.undo()
    with pytest.raises(SandboxUnavailable, match="does not run"):
        bubblewrap(str(tmp_path / "bwrap"))
    # a non-root evaluator whom the kernel refuses a user namespace (here: the nesting limit)
    evaluator = Evaluator("unprivileged")
    try:
        as_evaluator = ["unshare", "--user", f"--map-user={evaluator.uid}", f"--map-group={evaluator.uid}"]
        low, high = 0, 64  # fewest enclosing namespaces after which no further one can be made
        while low < high:
            middle = (low + high) // 2
            more = subprocess.run([*nested_user_namespaces(middle), *as_evaluator, "unshare", "--user", "true"],
                                  capture_output=True).returncode == 0
            low, high = (middle + 1, high) if more else (low, middle)
        command = [*nested_user_namespaces(low), *as_evaluator, "env", "-i", "PATH=/usr/bin:/bin", *evaluator.driver()]
        outcome = evaluator.run_command(command, {"x": "pass\n"}, LIMITS, 1)
        assert "results" not in outcome, outcome
        assert outcome["unavailable"].startswith("sandbox: bubblewrap (") and "user namespaces" in outcome["unavailable"]
        assert "--unsafe-no-sandbox" in outcome["unavailable"]
    finally:
        evaluator.close()


def test_unsafe_mode_runs_and_still_needs_the_end():
    isolation = unsafe_isolation()
    assert isolation.record() == {"sandbox": "none", "unsafe_no_sandbox": True}
    assert run_program("x = 1\n", LIMITS, isolation).passed
    assert not run_program("import sys\nsys.exit(0)\n", LIMITS, isolation).passed
