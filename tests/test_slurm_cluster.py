"""End to end against a real single-node SLURM cluster (slurm/local_cluster.sh): real
munged, slurmctld, slurmd, sbatch, srun and the real trainer inside the jobs.

The cluster starts once for this module and stops at its end. The four training jobs are
submitted together at the start and run side by side (the node declares more CPUs than
it has); a driver thread signals or preempts each at its moment, so the tests only wait
for outcomes. Every wait polls scontrol / the run dir; nothing sleeps a fixed time."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
RDP = [str(REPO / ".venv" / "bin" / "python"), "-m", "rdp.launch.cli"]
# every job trains this run; a job signalled or preempted anywhere must end identical to it
MAX_STEPS, CHECKPOINT_EVERY = 80, 10
TRAIN_OVERRIDES = [f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                   "train.eval_depths=[]", "train.log_every=1"]
JOB_TIMEOUT = 900  # a guard against a hung job, not a performance assertion
# a job whose time limit really expires: the trainer must stop itself this long before it
# (3 minutes: start-up, which takes over 2 minutes on a heavily loaded 2-core machine, must
# reach the first step before the limit)
EXPIRING_MINUTES, SAVE_BEFORE_END_MINUTES = 3, 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running cluster for this module: yields the environment that points at it."""
    if shutil.which("slurmctld") is None:
        pytest.skip("slurmctld is not installed (scripts/setup.sh installs slurmctld slurmd slurm-client munge)")
    # munge wants its socket directory reachable by everyone: a private pytest tmp dir is not
    state_dir = Path(tempfile.mkdtemp(prefix="rdp-slurm-test-"))
    state_dir.chmod(0o755)
    env = {**os.environ, "RDP_SLURM_CTLD_PORT": str(_free_port()), "RDP_SLURM_SLURMD_PORT": str(_free_port()),
           "RDP_SLURM_CPUS": "16"}
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
        # the daemons' logs outlive the cluster, for a failure's post-mortem
        shutil.copytree(state_dir / "log", tmp_path_factory.mktemp("slurm-daemon-logs"), dirs_exist_ok=True)
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


def signal_batch(job_id: str, signal_name: str, env: dict) -> None:
    # scancel's exit status is not checked: on a loaded machine it may retry an RPC whose
    # reply timed out and then report the job "already done" although the signal arrived.
    # The tests check delivery in the job logs instead.
    run(["scancel", f"--signal={signal_name}", "--batch", job_id], env, check=False)


def kill_training_tasks(job_id: str) -> None:
    """SIGKILL every task of the job's training step, as a crash or node failure would: no
    handler runs. (scancel --signal=KILL would instead cancel the job, with a SIGTERM first.)"""
    killed = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (f"SLURM_JOB_ID={job_id}".encode() in environ and b"SLURM_STEP_ID=0" in environ
                and b"rdp.launch.cli" in command and b"train" in command):
            os.kill(int(proc.name), signal.SIGKILL)
            killed.append(int(proc.name))
    assert killed, f"no training task of job {job_id} found to kill"


def attempts_signalled(log: str, job_id: str, signal_name: str) -> list[int]:
    """Restart counts of the attempts of JOB_ID whose batch shell received SIGNAL."""
    found = re.findall(rf"job {job_id} restart (\d+)\] got SIG{signal_name};", log)
    return sorted({int(n) for n in found})


def loss_log(run_dir: Path) -> list[tuple]:
    """Everything the trainer logs per step except wall-clock speed and whether a stop was
    requested at that step (true where the interrupted run was signalled)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [tuple(sorted((k, v) for k, v in r.items() if not _timing_or_control(k))) for r in records]


def _timing_or_control(key: str) -> bool:
    return key == "stop_requested" or key.endswith(("_per_s", "mfu", "hfu", "seconds", "time"))


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


# ---- the jobs and the driver that interrupts them --------------------------------------------
@dataclass
class Scenario:
    """A job plus the interruptions to apply to it, each when its condition first holds."""
    run_dir: Path
    job_id: str
    actions: list[tuple[str, Callable[[], bool], Callable[[], None]]] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    error: str = ""


def _segment(array_id: str, index: int, env: dict) -> dict:
    return next((r for r in job_records(array_id, env) if r.get("ArrayTaskId") == str(index)), {})


def _last_stop(scenario: Scenario) -> int:
    """The step at which the job's last signalled attempt checkpointed and stopped (0: none)."""
    stops = re.findall(r"checkpoint at step (\d+) written", logs(scenario.run_dir))
    return int(stops[-1]) if stops else 0


def _past_first_periodic_checkpoint(chained: Scenario, env: dict) -> bool:
    if _segment(chained.job_id, 1, env).get("JobState") != "RUNNING":
        return False
    # where segment 0 stopped (the "latest" pointer moves on with segment 1's own checkpoints)
    segment0_log = (chained.run_dir / "slurm" / "logs" / f"rdp-chained-{chained.job_id}_0.out").read_text()
    resumed_at = int(re.search(r"checkpoint at step (\d+) written", segment0_log).group(1))
    return last_step(chained.run_dir) >= (resumed_at // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY + 2


def _drive(scenarios: dict[str, Scenario], stop: threading.Event) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while not stop.is_set() and time.monotonic() < deadline:
        pending = [s for s in scenarios.values() if len(s.done) < len(s.actions) and not s.error]
        if not pending:
            return
        for scenario in pending:
            what, ready, act = scenario.actions[len(scenario.done)]
            try:
                if ready():
                    act()
                    scenario.done.append(what)
            except Exception as exc:  # noqa: BLE001 - reported by the test that owns the scenario
                scenario.error = f"{what}: {exc!r}"
        stop.wait(0.25)
    for scenario in scenarios.values():
        if len(scenario.done) < len(scenario.actions) and not scenario.error:
            scenario.error = f"never reached: {scenario.actions[len(scenario.done)][0]}"


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    env, base = cluster, tmp_path_factory.mktemp("slurm-runs")
    # the preemption victim holds the node's one "token"; an urgent job asking for it can only
    # start by preempting that job, and leaves the other runs alone
    token_site = base / "token-site.yaml"
    token_site.write_text("name: local-with-token\npartition: debug\nsignal_seconds: 30\n"
                          "env: {OMP_NUM_THREADS: '1', PYTHONUNBUFFERED: '1'}\nsbatch_lines: ['--gres=token:1']\n")
    # no warning signal at all: only the trainer's own watch on the job's end time saves the work
    silent_site = base / "silent-site.yaml"
    silent_site.write_text("name: local-no-signal\npartition: debug\nsignal_seconds: 0\n"
                           "env: {OMP_NUM_THREADS: '1', PYTHONUNBUFFERED: '1'}\n")
    expiring_dir = base / "expiring"
    expiring_job = run([*RDP, "submit", "tiny", "--tasks-per-node", "2", "--time", str(EXPIRING_MINUTES), "--site",
                        str(silent_site), f"train.run_dir={expiring_dir}", "train.max_steps=100000",
                        "train.checkpoint_every=100000", "train.eval_depths=[]", "train.log_every=10",
                        f"train.save_before_end_minutes={SAVE_BEFORE_END_MINUTES}"], env).stdout.split()[-1]
    scenarios = {
        "expiring": Scenario(expiring_dir, expiring_job),
        "reference": Scenario(base / "reference", submit(env, base / "reference")),
        "signalled": Scenario(base / "signalled", submit(env, base / "signalled")),
        "preempted": Scenario(base / "preempted", submit(env, base / "preempted", "--site", str(token_site))),
        "chained": Scenario(base / "chained", submit(env, base / "chained", "--chain", "3")),
    }
    signalled, preempted, chained = scenarios["signalled"], scenarios["preempted"], scenarios["chained"]
    for attempt in (0, 1):
        signalled.actions.append((
            f"USR1 to attempt {attempt} three steps past where it started",
            lambda a=attempt: (job_state(signalled.job_id, env) == ("RUNNING", a)
                               and last_step(signalled.run_dir) >= _last_stop(signalled) + 3),
            lambda: signal_batch(signalled.job_id, "USR1", env)))
    preempted.actions.append((
        "urgent job for the token past step 3",
        lambda: job_state(preempted.job_id, env)[0] == "RUNNING" and last_step(preempted.run_dir) >= 3,
        lambda: run(["sbatch", "--parsable", "--partition=urgent", "--gres=token:1", "--ntasks=1",
                     f"--output={base}/urgent-%j.out", "--wrap", "echo urgent work done"], env)))
    # segment 0 gets USR1, what the time limit sends (--signal=B:USR1@T), and stops cleanly;
    # segment 1 is killed without warning (SIGKILL to its tasks, as a node failure would), so
    # segment 2 goes back to the newest periodic checkpoint
    chained.actions.append((
        "USR1 to segment 0 past step 3",
        lambda: _segment(chained.job_id, 0, env).get("JobState") == "RUNNING" and last_step(chained.run_dir) >= 3,
        lambda: signal_batch(f"{chained.job_id}_0", "USR1", env)))
    chained.actions.append((
        "SIGKILL to segment 1 two steps past its first periodic checkpoint",
        lambda: _past_first_periodic_checkpoint(chained, env),
        lambda: kill_training_tasks(_segment(chained.job_id, 1, env)["JobId"])))
    expiring = scenarios["expiring"]
    expiring.actions.append((
        "cancel the expiring job once its second attempt has resumed",
        lambda: job_state(expiring.job_id, env) == ("RUNNING", 1)
        and re.search(r"resumed from \S+ at step \d+", logs(expiring.run_dir).split("restart 1] starting")[-1]),
        lambda: run(["scancel", expiring.job_id], env)))
    stop = threading.Event()
    driver = threading.Thread(target=_drive, args=(scenarios, stop), daemon=True)
    driver.start()
    yield scenarios
    stop.set()
    driver.join()


def finished(scenario: Scenario, env: dict) -> tuple[str, int]:
    assert not scenario.error, scenario.error + "\n" + logs(scenario.run_dir)
    return wait_finished(scenario.job_id, env, scenario.run_dir)


# ---- tests -----------------------------------------------------------------------------------
def test_two_task_job_trains_and_checkpoints(cluster, jobs):
    reference = jobs["reference"]
    assert finished(reference, cluster) == ("COMPLETED", 0), logs(reference.run_dir)
    record = job_records(reference.job_id, cluster)[0]
    assert (record["NumNodes"], record["NumTasks"]) == ("1", "2")
    run_dir = reference.run_dir
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS:08d}"
    assert (run_dir / "FINISHED").exists()
    assert [dict(r)["step"] for r in loss_log(run_dir)] == list(range(1, MAX_STEPS + 1))
    log = logs(run_dir)
    assert "starting training step on 1 node(s)" in log and "run finished" in log
    status = run([*RDP, "status", str(run_dir)], cluster).stdout.splitlines()
    assert status[0] == f"run {run_dir} (finished)"
    assert status[2].split() == [reference.job_id, "COMPLETED"]
    assert f"newest checkpoint: step_{MAX_STEPS:08d} (step {MAX_STEPS})" in status
    assert f"last logged step: {MAX_STEPS}" in status


def test_eval_array_job_produces_the_merged_table_of_one_checkpoint(cluster, tmp_path):
    """The array is held at submission; the run then publishes a newer checkpoint, and only
    then do the tasks start: every task still evaluates the step resolved at submission."""
    from rdp.evals.testing import publish_step, weights_sha256

    run_dir, out = tmp_path / "run", tmp_path / "sweep"
    submitted_step = publish_step(run_dir, 80, seed=0)
    site = tmp_path / "held.yaml"
    site.write_text((REPO / "slurm" / "sites" / "local.yaml").read_text() + 'sbatch_lines: ["--hold"]\n')
    lines = run([*RDP, "submit-eval", str(run_dir), "--tasks", "parity", "--depths", "1,2,4", "--site", str(site),
                 "--time", "00:10:00", "--output", str(out), "--eval-args", "--reasoning-examples 8"],
                cluster).stdout.splitlines()
    submitted = lines[0].split()
    assert submitted[:4] == ["submitted", "eval", "array", "job"] and submitted[5:7] == ["(3", "tasks)"]
    array_id, merge_id = submitted[4], submitted[10].rstrip(";")
    assert submitted[-1] == str(out)
    assert lines[1] == f"every task evaluates {submitted_step.resolve()} (step 80, weights sha256 " \
                       f"{weights_sha256(submitted_step)[:12]})"
    newer = publish_step(run_dir, 90, seed=1)
    assert (run_dir / "checkpoints" / "latest").read_text() == newer.name
    run(["scontrol", "release", array_id, merge_id], cluster)
    wait_until(lambda: job_state(merge_id, cluster)[0] in ("COMPLETED", "FAILED", "CANCELLED"),
               f"merge job {merge_id}", on_timeout=lambda: "\n".join(p.read_text() for p in out.glob("slurm/logs/*")))
    assert sorted(r["JobState"] for r in job_records(array_id, cluster)) == ["COMPLETED"] * 3
    assert job_state(merge_id, cluster)[0] == "COMPLETED"
    merged = json.loads((out / "results.json").read_text())
    assert (merged["step"], merged["weights_sha256"]) == (80, weights_sha256(submitted_step))
    assert merged["checkpoint_dir"] == str(submitted_step.resolve())
    rows = ["parity/easy", "parity/hard32", "parity/hard64"]
    assert list(merged["results"]) == rows
    for index, depth in enumerate((1, 2, 4)):
        part = json.loads((out / "parts" / f"{index:03d}" / "results.json").read_text())
        assert merged["checkpoint"] == part["checkpoint"] and merged["settings"] == part["settings"]
        for row in rows:
            assert merged["results"][row][str(depth)] == part["results"][row][str(depth)]
            assert part["results"][row][str(depth)]["step"] == 80
    table = (out / "results.md").read_text().splitlines()
    assert "| task | metric | r=1 | r=2 | r=4 |" in table
    assert [line.split(" | ")[0] for line in table if line.startswith("| parity/")] == [f"| {r}" for r in rows]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_signalled_twice_requeues_twice_and_matches_uninterrupted_run(cluster, jobs):
    signalled = jobs["signalled"]
    assert finished(signalled, cluster) == ("COMPLETED", 2), logs(signalled.run_dir)
    log = logs(signalled.run_dir)
    assert attempts_signalled(log, signalled.job_id, "USR1") == [0, 1]
    assert log.count("run not finished; requeueing job") == 2
    assert all(f"job {signalled.job_id} restart {n}] starting training step" in log for n in (0, 1, 2))
    assert finished(jobs["reference"], cluster)[0] == "COMPLETED"
    assert_same_run(signalled.run_dir, jobs["reference"].run_dir)
    status = run([*RDP, "status", str(signalled.run_dir)], cluster).stdout.splitlines()
    assert status[2].split() == [signalled.job_id, "COMPLETED", "restarts=2"]


def test_preempted_job_is_requeued_and_matches_uninterrupted_run(cluster, jobs):
    preempted = jobs["preempted"]
    assert finished(preempted, cluster) == ("COMPLETED", 1), logs(preempted.run_dir)
    log = logs(preempted.run_dir)
    assert "DUE TO PREEMPTION" in log and "got SIGTERM; forwarding it to the training step" in log
    assert f"job {preempted.job_id} restart 1] starting training step" in log
    assert_same_run(preempted.run_dir, jobs["reference"].run_dir)
    # only the token holder was preempted
    assert finished(jobs["reference"], cluster) == ("COMPLETED", 0)


def test_chain_of_three_segments_continues_one_run_through_a_kill(cluster, jobs):
    chained = jobs["chained"]
    assert not chained.error, chained.error + "\n" + logs(chained.run_dir)

    def all_done():
        states = sorted((r.get("ArrayTaskId"), r["JobState"], r.get("Restarts"))
                        for r in job_records(chained.job_id, cluster))
        return states if len(states) == 3 and all(s[1] not in ("PENDING", "RUNNING", "COMPLETING")
                                                  for s in states) else None
    states = wait_until(all_done, f"all segments of {chained.job_id}", on_timeout=lambda: logs(chained.run_dir))
    # the killed segment fails (nothing requeues a crash); the chain goes on regardless
    assert states == [("0", "COMPLETED", "0"), ("1", "FAILED", "0"), ("2", "COMPLETED", "0")], \
        logs(chained.run_dir)
    segment_logs = sorted((chained.run_dir / "slurm" / "logs").glob(f"rdp-chained-{chained.job_id}_*.out"))
    assert [p.name for p in segment_logs] == [f"rdp-chained-{chained.job_id}_{i}.out" for i in range(3)]
    texts = [p.read_text() for p in segment_logs]
    assert all("starting training step" in text for text in texts)
    assert "got SIGUSR1" in texts[0] and "run not finished; the next segment of the chain continues it" in texts[0]
    stopped_at = int(re.search(r"checkpoint at step (\d+) written", texts[0]).group(1))
    assert re.search(rf"resumed from \S+/step_{stopped_at:08d} at step {stopped_at}", texts[1])
    assert "got SIG" not in texts[1] and "stop requested" not in texts[1]
    # after the kill, segment 2 resumes from the newest periodic checkpoint (every 10 steps)
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", texts[2]).group(1))
    assert resumed % CHECKPOINT_EVERY == 0 and resumed > stopped_at, texts[2]
    assert "run finished" in texts[2] and "requeueing" not in "".join(texts)
    assert_same_run(chained.run_dir, jobs["reference"].run_dir)


def test_trainer_checkpoints_before_the_time_limit_without_any_signal(cluster, jobs):
    """--time 3 with no warning signal: the trainer reads the job's end time from squeue,
    checkpoints and stops a minute before it; the batch script requeues the job, which
    resumes from that checkpoint (the test then cancels it). Without the trainer's watch the
    job would end as TIMEOUT and lose every step (checkpoint_every is far away)."""
    from datetime import datetime, timezone

    expiring = jobs["expiring"]
    state, restarts = finished(expiring, cluster)
    assert (state, restarts) == ("CANCELLED", 1), logs(expiring.run_dir)
    first, second = logs(expiring.run_dir).split("restart 1] starting training step")
    assert "got SIG" not in first and "#SBATCH --signal" not in (expiring.run_dir / "slurm" / "submission-001" /
                                                                 "train.sbatch").read_text()
    stop = re.search(r"stop requested by the job's time limit \(ends (\S+ \S+), train.save_before_end_minutes=1\): "
                     r"checkpoint at step (\d+) written, exiting", first)
    assert stop, first
    ends, step = datetime.fromisoformat(stop.group(1)).timestamp(), int(stop.group(2))
    ended = re.search(r"\[rdp-job (\S+) job \d+ restart 0\] training step ended with status 0", first)
    assert ended and "training stopped before the job's time limit with a checkpoint" in first, first
    stopped_at = datetime.strptime(ended.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    assert 0 < ends - stopped_at <= 60 * SAVE_BEFORE_END_MINUTES + 5, (ends, stopped_at)
    assert "requeueing job" in first
    assert re.search(rf"resumed from \S+/step_{step:08d} at step {step}", second), second
