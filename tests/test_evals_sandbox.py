"""The HumanEval sandbox: hostile generated programs do no harm and cannot hang the run;
real HumanEval problems pass with their canonical solution and fail with a wrong one."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid

import pytest

from rdp.evals.humaneval import load_problems, pass_at_k, program_for
from rdp.evals.sandbox import SandboxLimits, namespace_prefix, run_program

LIMITS = SandboxLimits(wall_s=3.0, cpu_s=2, memory_bytes=1024 ** 3, file_bytes=64 * 1024)
OS_LAYERS = os.getuid() == 0 and "--pid" in namespace_prefix() and "--net" in namespace_prefix()


def leftover_sandbox_processes(grace_s: float = 5.0) -> list[str]:
    """Live processes of the sandbox user. Zombies are left out: they have exited and only wait
    for their (killed) parent's reaper; live ones get a short grace period to finish dying."""
    deadline = time.monotonic() + grace_s
    while True:
        out = subprocess.run(["ps", "-u", "65534", "-o", "pid=,stat=,args="], capture_output=True, text=True).stdout
        live = [line for line in out.splitlines() if line.strip() and not line.split()[1].startswith("Z")]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.2)


@pytest.fixture()
def victim(tmp_path):
    """Files of 'the evaluator' next to a listening socket the program must not reach."""
    directory = tmp_path / "evaluator"
    directory.mkdir()
    (directory / "results.json").write_text('{"precious": true}')
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    yield directory, server.getsockname()[1], server
    server.close()


def attacks(directory, port) -> dict[str, str]:
    outside = f"/tmp/rdp-escape-{uuid.uuid4().hex}"
    return {
        "infinite loop": "while True:\n    pass\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n",
        "allocate 50 GB": "block = bytearray(50 * 1024 ** 3)\nblock[-1] = 1\n",
        "delete parent files": (f"import os, shutil\nos.remove({str(directory / 'results.json')!r})\n"
                                f"shutil.rmtree({str(directory)!r})\n"),
        "write outside temp dir": (f"open({outside!r}, 'w').write('x')\n"
                                   f"open({str(directory / 'planted.py')!r}, 'w').write('x')\n"),
        "network": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                    "s.sendall(b'leak')\nprint('CONNECTED')\n"),
        "kill parent": (f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}):\n"
                        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except Exception as e:\n        print(e)\n"
                        "raise SystemExit(1)\n"),
        "output flood": "while True:\n    print('x' * 10000)\n",
    }, outside


def check_no_harm(name, result, directory, server, outside, started):
    assert not result.passed, name
    assert time.monotonic() - started < LIMITS.wall_s + 3, f"{name} hung the evaluator"
    assert (directory / "results.json").read_text() == '{"precious": true}', name
    assert not (directory / "planted.py").exists() and not os.path.exists(outside), name
    assert "CONNECTED" not in result.stdout, name
    with pytest.raises(BlockingIOError):
        server.accept()
    assert len(result.stdout) <= LIMITS.file_bytes and len(result.stderr) <= LIMITS.file_bytes


@pytest.mark.parametrize("python_guard", [True, pytest.param(False, marks=pytest.mark.skipif(
    not OS_LAYERS, reason="OS-only layers need root and unshare (pid + net namespaces)"))])
def test_hostile_programs_do_no_harm(victim, python_guard):
    directory, port, server = victim
    programs, outside = attacks(directory, port)
    limits = SandboxLimits(**{**LIMITS.__dict__, "python_guard": python_guard})
    for name, source in programs.items():
        started = time.monotonic()
        result = run_program(source, limits)
        check_no_harm(name, result, directory, server, outside, started)
        if name == "infinite loop":
            assert result.status in ("timeout", "killed"), result
        if name == "output flood":
            assert result.stdout.startswith("x" * 100)
    assert leftover_sandbox_processes() == []


def test_sandbox_runs_ordinary_code_in_private_dir():
    result = run_program("import os\nopen('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read(), os.listdir('.'))\n",
                         LIMITS)
    assert result.passed, result.stderr
    assert result.stdout.startswith("ok [")


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = load_problems()
    assert len(problems) == 164
    for problem in problems[:3]:
        good = run_program(program_for(problem, problem["canonical_solution"]), LIMITS)
        assert good.passed, (problem["task_id"], good.stderr)
        bad = run_program(program_for(problem, "    return None\n"), LIMITS)
        assert not bad.passed and "AssertionError" in bad.stderr, problem["task_id"]


def test_unbiased_pass_at_k():
    # n=5 samples, c=2 correct: pass@1 = 2/5, pass@2 = 1 - C(3,2)/C(5,2) = 0.7
    assert pass_at_k([5, 5], [2, 0], 1)[0] == pytest.approx(0.2)
    assert pass_at_k([5], [2], 2)[0] == pytest.approx(0.7)
    assert pass_at_k([5], [5], 5)[0] == 1.0
