"""End to end against a real single-node SLURM cluster (slurm/local_cluster.sh): real
munged, slurmctld, slurmd, sbatch, srun and the real trainer inside the jobs.

The cluster starts once for this module and stops at its end. Every wait polls squeue /
scontrol / the run dir; nothing sleeps a fixed time."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
RDP = [str(REPO / ".venv" / "bin" / "python"), "-m", "launch.cli"]
# every job trains this run; a job signalled or preempted anywhere must end identical to it
TRAIN_OVERRIDES = ["train.max_steps=40", "train.checkpoint_every=10", "train.eval_depths=[]",
                   "train.log_every=1"]
JOB_TIMEOUT = 240  # a guard against a hung job, not a performance assertion


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A running cluster for this module: yields the environment that points at it."""
    if shutil.which("slurmctld") is None:
        pytest.skip("slurmctld is not installed (scripts/setup.sh installs slurmctld slurmd slurm-client munge)")
    # munge wants its socket directory reachable by everyone: a private pytest tmp dir is not
    state_dir = Path(tempfile.mkdtemp(prefix="rdp-slurm-test-"))
    state_dir.chmod(0o755)
    env = {**os.environ, "RDP_SLURM_CTLD_PORT": str(_free_port()), "RDP_SLURM_SLURMD_PORT": str(_free_port()),
           "RDP_SLURM_CPUS": "8"}
    started = subprocess.run([str(CLUSTER_SCRIPT), "start", str(state_dir)], env=env, capture_output=True,
                             text=True, timeout=120)
    if started.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-2000:]}" for p in sorted(state_dir.glob("log/*")))
        subprocess.run([str(CLUSTER_SCRIPT), "stop", str(state_dir)], env=env, capture_output=True, timeout=120)
        pytest.fail(f"local cluster did not start: {started.stderr}\n{logs}")
    env["SLURM_CONF"] = str(state_dir / "slurm.conf")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop", str(state_dir)], env=env, capture_output=True, timeout=180)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        pids = [state_dir / "run/slurmctld.pid", state_dir / "run/slurmd.pid", state_dir / "munge/munged.pid"]
        alive = [p.name for p in pids if p.exists() and _alive(int(p.read_text().strip() or 0))]
        shutil.rmtree(state_dir, ignore_errors=True)
        assert not alive, f"daemons still running after stop: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, ValueError):
        return False


# ---- helpers ---------------------------------------------------------------------------------
def run(command: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def wait_until(predicate, what: str, timeout: float = JOB_TIMEOUT, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{on_timeout()}")
        time.sleep(0.25)


def job_records(job_id: str, env: dict) -> list[dict[str, str]]:
    """scontrol's view of a job (one record per array task)."""
    out = run(["scontrol", "show", "job", "-o", job_id], env, check=False).stdout
    return [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in out.splitlines() if line]


def job_state(job_id: str, env: dict) -> tuple[str, int]:
    records = job_records(job_id, env)
    return (records[0]["JobState"], int(records[0].get("Restarts", 0))) if records else ("UNKNOWN", 0)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def logs(run_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted((run_dir / "slurm" / "logs").glob("*")))


def submit(env: dict, run_dir: Path, *extra: str) -> str:
    out = run([*RDP, "submit", "tiny", "--tasks-per-node", "2", "--time", "00:10:00", "--site", "local", *extra,
               f"train.run_dir={run_dir}", *TRAIN_OVERRIDES], env).stdout
    lines = out.strip().splitlines()
    assert lines[0] == f"wrote {run_dir}/slurm/submission-001/train.sbatch"
    assert lines[-1].startswith("submitted job ")
    return lines[-1].split()[2]


def wait_finished(job_id: str, env: dict, run_dir: Path) -> tuple[str, int]:
    def done():
        state, restarts = job_state(job_id, env)
        return (state, restarts) if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                              "NODE_FAIL", "BOOT_FAIL", "DEADLINE") else None
    return wait_until(done, f"job {job_id} to end", on_timeout=lambda: logs(run_dir))


def signal_batch(job_id: str, signal: str, env: dict) -> None:
    run(["scancel", f"--signal={signal}", "--batch", job_id], env)


def loss_log(run_dir: Path) -> list[tuple]:
    """Everything the trainer logs per step except wall-clock speed and whether a stop was
    requested at that step (true where the interrupted run was signalled)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [tuple(sorted((k, v) for k, v in r.items() if k not in ("tokens_per_s", "stop_requested")))
            for r in records]


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    import torch

    assert loss_log(run_dir) == loss_log(reference)
    ours, theirs = final_weights(run_dir), final_weights(reference)
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"


# ---- tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(cluster, tmp_path_factory):
    """The uninterrupted 2-task run every interrupted run is compared against."""
    run_dir = tmp_path_factory.mktemp("slurm-runs") / "reference"
    job_id = submit(cluster, run_dir)
    state, restarts = wait_finished(job_id, cluster, run_dir)
    return run_dir, job_id, state, restarts


def test_two_task_job_trains_and_checkpoints(cluster, reference_run):
    run_dir, job_id, state, restarts = reference_run
    assert (state, restarts) == ("COMPLETED", 0), logs(run_dir)
    records = job_records(job_id, cluster)[0]
    assert (records["NumNodes"], records["NumTasks"]) == ("1", "2")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    assert [dict(r)["step"] for r in loss_log(run_dir)] == list(range(1, 41))
    log = logs(run_dir)
    assert "starting training step on 1 node(s)" in log and "run finished" in log
    status = run([*RDP, "status", str(run_dir)], cluster).stdout.splitlines()
    assert status[0] == f"run {run_dir} (finished)"
    assert status[2].split() == [job_id, "COMPLETED"]
    assert "newest checkpoint: step_00000040 (step 40)" in status


def test_signalled_twice_requeues_twice_and_matches_uninterrupted_run(cluster, reference_run, tmp_path):
    run_dir = tmp_path / "signalled"
    job_id = submit(cluster, run_dir)
    for attempt, after_step in enumerate((8, 22)):
        wait_until(lambda: job_state(job_id, cluster) == ("RUNNING", attempt) and last_step(run_dir) >= after_step,
                   f"attempt {attempt} of job {job_id} to pass step {after_step}", on_timeout=lambda: logs(run_dir))
        signal_batch(job_id, "USR1", cluster)
        # the requeue shows as a new restart count; the job must not simply finish
        wait_until(lambda: job_state(job_id, cluster)[1] == attempt + 1,
                   f"job {job_id} to be requeued after signal {attempt + 1}", on_timeout=lambda: logs(run_dir))
    assert wait_finished(job_id, cluster, run_dir) == ("COMPLETED", 2), logs(run_dir)
    log = logs(run_dir)
    assert log.count("got SIGUSR1; forwarding it to the training step") == 2
    assert log.count("run not finished; requeueing job") == 2
    assert all(f"job {job_id} restart {n}] starting training step" in log for n in (0, 1, 2))
    assert_same_run(run_dir, reference_run[0])


def test_preempted_job_is_requeued_and_matches_uninterrupted_run(cluster, reference_run, tmp_path):
    run_dir = tmp_path / "preempted"
    job_id = submit(cluster, run_dir, "--partition", "debug")
    wait_until(lambda: job_state(job_id, cluster)[0] == "RUNNING" and last_step(run_dir) >= 12,
               f"job {job_id} to pass step 12", on_timeout=lambda: logs(run_dir))
    # the whole node, in the higher-tier partition: SLURM must preempt (requeue) the run
    urgent = run(["sbatch", "--parsable", "--partition=urgent", "--exclusive", "--ntasks=1",
                  f"--output={tmp_path}/urgent.out", "--wrap", "echo urgent work done"], cluster).stdout.strip()
    wait_until(lambda: job_state(urgent, cluster)[0] == "COMPLETED", f"urgent job {urgent} to run",
               on_timeout=lambda: logs(run_dir))
    assert wait_finished(job_id, cluster, run_dir) == ("COMPLETED", 1), logs(run_dir)
    log = logs(run_dir)
    assert "DUE TO PREEMPTION" in log and "got SIGTERM; forwarding it to the training step" in log
    assert f"job {job_id} restart 1] starting training step" in log
    assert_same_run(run_dir, reference_run[0])


def test_chain_of_three_segments_continues_one_run(cluster, reference_run, tmp_path):
    run_dir = tmp_path / "chained"
    array_id = submit(cluster, run_dir, "--chain", "3")

    def segment_running(index: int):
        return any(r.get("ArrayTaskId") == str(index) and r["JobState"] == "RUNNING"
                   for r in job_records(array_id, cluster))

    # USR1 is what the time limit sends (--signal=B:USR1@T); each segment stops on it
    for segment, after_step in enumerate((8, 22)):
        wait_until(lambda: segment_running(segment) and last_step(run_dir) >= after_step,
                   f"segment {segment} to pass step {after_step}", on_timeout=lambda: logs(run_dir))
        task_id = next(r["JobId"] for r in job_records(array_id, cluster) if r.get("ArrayTaskId") == str(segment))
        signal_batch(task_id, "USR1", cluster)

    def all_done():
        records = job_records(array_id, cluster)
        states = sorted((r.get("ArrayTaskId"), r["JobState"], r.get("Restarts")) for r in records)
        return states if len(states) == 3 and all(s[1] not in ("PENDING", "RUNNING", "COMPLETING")
                                                  for s in states) else None
    states = wait_until(all_done, f"all segments of {array_id}", on_timeout=lambda: logs(run_dir))
    assert states == [("0", "COMPLETED", "0"), ("1", "COMPLETED", "0"), ("2", "COMPLETED", "0")], logs(run_dir)
    segment_logs = sorted((run_dir / "slurm" / "logs").glob(f"rdp-chained-{array_id}_*.out"))
    assert [p.name for p in segment_logs] == [f"rdp-chained-{array_id}_{i}.out" for i in range(3)]
    texts = [p.read_text() for p in segment_logs]
    assert all("starting training step" in text for text in texts)
    assert "the next segment of the chain continues it" in texts[0] and "the next segment" in texts[1]
    assert "run finished" in texts[2] and "requeueing" not in "".join(texts)
    assert_same_run(run_dir, reference_run[0])
