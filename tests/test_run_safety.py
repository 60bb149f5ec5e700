"""Nothing is lost by an ordinary mistake, through the real `rdp train` command: a fresh start
into a run dir that holds a run, resuming from broken checkpoints, a changed model shape,
Ctrl-C; pruning relative to "latest"; log lines without a terminal; the job's time limit.

In-process `rdp.launch.cli.main` for the errors (no process start-up per case), one real
`rdp train` process for Ctrl-C (exit status and signal handling are process-level)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.seq_len=32", "train.micro_batch_size=2", "train.eval_depths=[]", "model.vocab_size=127",
        "model.intermediate_size=48", "train.keep_last=10"]


def rdp_train(capsys, run_dir, *extra) -> tuple[int, str, str]:
    from rdp.launch.cli import main

    code = main(["train", "tiny", "--no-progress", *TINY, f"train.run_dir={run_dir}", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4 (copied by the tests that change it)."""
    from rdp.pretrain.config import load_config
    from rdp.pretrain.train import train

    run_dir = tmp_path_factory.mktemp("four") / "run"
    train(load_config("tiny", [*TINY, f"train.run_dir={run_dir}", "train.max_steps=4", "train.checkpoint_every=2"]),
          progress=False)
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_fresh_start_into_a_run_is_refused_overwrite_replaces_only_the_run(four_steps, tmp_path, capsys):
    run_dir = copy_run(four_steps, tmp_path / "run")
    (run_dir / "slurm").mkdir()
    (run_dir / "slurm" / "jobs.jsonl").write_text("{}\n")  # not the trainer's: kept by --overwrite
    before = snapshot(run_dir)
    # the README's sequence: a second `rdp train` into the same run dir
    code, out, err = rdp_train(capsys, run_dir, "train.max_steps=2", "train.checkpoint_every=1")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"rdp train: error: train.run_dir {run_dir} already holds a run")
    assert "2 checkpoint(s) up to step 4" in err and "metrics.jsonl up to step 4" in err
    assert all(way in err for way in ("train.resume=auto", "another train.run_dir", "--overwrite"))
    assert snapshot(run_dir) == before
    # continuing another run's checkpoint into it is refused the same way
    other = four_steps / "checkpoints" / "step_00000002"
    code, _, err = rdp_train(capsys, run_dir, "train.max_steps=2", f"train.resume={other}")
    assert code == 2 and "would continue another run's checkpoint" in err and snapshot(run_dir) == before

    code, out, _ = rdp_train(capsys, run_dir, "train.max_steps=2", "train.checkpoint_every=1", "--overwrite")
    assert code == 0 and f"--overwrite: removed checkpoints, metrics.jsonl, config.yaml, FINISHED, tensorboard" in out
    assert steps_logged(run_dir) == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert (run_dir / "slurm" / "jobs.jsonl").read_text() == "{}\n"


def test_resume_auto_from_only_broken_checkpoints_is_an_error_naming_each(four_steps, tmp_path, capsys):
    run_dir = copy_run(four_steps, tmp_path / "run")
    for step, damage in ((4, "truncate"), (2, "manifest")):
        checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
        if damage == "truncate":
            with open(checkpoint / "model.safetensors", "r+b") as handle:
                handle.truncate(10)
        else:
            (checkpoint / "manifest.json").unlink()
    before = snapshot(run_dir)
    with pytest.warns(UserWarning):
        code, out, err = rdp_train(capsys, run_dir, "train.max_steps=6", "train.resume=auto")
    assert code == 2 and "trained" not in out
    line = err.strip()
    assert "\n" not in line and line.startswith(f"rdp train: error: {run_dir / 'checkpoints'}: no intact checkpoint")
    assert re.search(r"step_00000004: model\.safetensors has 10 bytes, the manifest recorded \d+ \(truncated", line)
    assert "step_00000002: no manifest.json (incomplete write)" in line
    assert snapshot(run_dir) == before


def test_resume_with_another_model_shape_names_the_fields_and_keeps_the_config(four_steps, tmp_path, capsys):
    run_dir = copy_run(four_steps, tmp_path / "run")
    before = snapshot(run_dir)
    code, _, err = rdp_train(capsys, run_dir, "train.max_steps=6", "train.resume=auto", "model.hidden_size=128",
                             "model.core_layers=3")
    assert code == 2
    assert err == (f"rdp train: error: {run_dir}/checkpoints/step_00000004: written for another model shape: "
                   "model.hidden_size=64 (this run: 128), model.core_layers=2 (this run: 3); resume with the "
                   "checkpoint's model settings, or start a new run in another train.run_dir\n")
    assert snapshot(run_dir) == before


def test_resume_auto_continues_and_logs_a_line_every_log_every_steps(four_steps, tmp_path, capsys):
    run_dir = copy_run(four_steps, tmp_path / "run")
    code, out, _ = rdp_train(capsys, run_dir, "train.max_steps=9", "train.resume=auto", "train.log_every=2",
                             "train.checkpoint_every=2")
    assert code == 0
    lines = out.splitlines()
    assert f"resumed from {run_dir}/checkpoints/step_00000004 at step 4" in lines
    logged = [line for line in lines if line.startswith("step ")]
    # steps 6 and 8, and the last step; no peak FLOP/s on a CPU, so MFU is n/a with the achieved rate
    pattern = r"step (\d+)/9 \| loss \d+\.\d{4} \| [\d,]+ tokens/s \| \(n, k\) = \((\d+), (\d+)\) \| MFU n/a \([\d.,]+ GFLOP/s/device\)"
    assert [re.fullmatch(pattern, line).group(1) for line in logged] == ["6", "8", "9"], logged
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert [int(re.fullmatch(pattern, line).group(2)) for line in logged] == [records[s]["n"] for s in (6, 8, 9)]
    assert sorted(records) == list(range(1, 10))


class NotATensor:
    """Unpickling this runs code of the file's choosing; a weights_only load refuses it."""


def test_trainer_state_loads_without_unpickling_code(four_steps, tmp_path):
    import torch

    from rdp.pretrain.checkpoint import load_rng_state

    checkpoint = four_steps / "checkpoints" / "step_00000004"
    json.loads((checkpoint / "trainer_state.json").read_text())  # counters: JSON
    rng = torch.load(checkpoint / "rng" / "rank_00000.pt", weights_only=True)  # RNG: tensors and numbers only
    assert load_rng_state(checkpoint / "rng" / "rank_00000.pt").keys() == rng.keys()
    pickled = tmp_path / "rank_00000.pt"
    torch.save({"torch": NotATensor()}, pickled)
    with pytest.warns(UserWarning, match=r"rank_00000\.pt: not restored, it needs a full unpickler"):
        assert load_rng_state(pickled) is None


def test_prune_keeps_checkpoints_relative_to_latest(tmp_path):
    """After a resume from an older checkpoint, "latest" is older than leftovers of the
    abandoned timeline: those and "latest" survive pruning; resume never picks a leftover."""
    from rdp.pretrain.checkpoint import newest_valid_checkpoint, prune, publish, staging_dir

    def checkpoint(step):
        staging = staging_dir(tmp_path, step)
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"w" * step)
        return publish(staging, tmp_path, step)

    for step in (2, 4, 6, 8, 10):
        checkpoint(step)
    (tmp_path / "latest").write_text("step_00000004")  # resumed from step 4 ...
    checkpoint(5)  # ... and saved step 5
    assert prune(tmp_path, keep_last=1, keep_every=0) == [tmp_path / "step_00000002", tmp_path / "step_00000004"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == \
        ["step_00000005", "step_00000006", "step_00000008", "step_00000010"]
    assert newest_valid_checkpoint(tmp_path).name == "step_00000005"
    (tmp_path / "latest").write_text("step_00000007")  # names a checkpoint that is gone
    with pytest.warns(UserWarning, match="names step_00000007, which does not exist"):
        assert newest_valid_checkpoint(tmp_path).name == "step_00000006"
    assert prune(tmp_path, keep_last=1, keep_every=0) == [tmp_path / "step_00000005"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000006", "step_00000008", "step_00000010"]


def test_ctrl_c_checkpoints_at_the_next_step_says_so_and_exits_130(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # an in-process run of another test exported its rendezvous variables: not this process's
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen([sys.executable, "-m", "rdp.launch.cli", "train", "tiny", "--no-progress", *TINY,
                                f"train.run_dir={run_dir}", "train.max_steps=100000", "train.checkpoint_every=100000"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, (out, err)
    assert "rdp train: SIGINT received; checkpointing at the next step boundary, then exiting" in err
    stopped = int(re.search(r"stop requested by SIGINT: checkpoint at step (\d+) written, exiting", out).group(1))
    assert steps_logged(run_dir)[-1] == stopped
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert not (run_dir / "FINISHED").exists()
    code, out, _ = rdp_train(capsys, run_dir, f"train.max_steps={stopped + 1}", "train.resume=auto")
    assert code == 0 and f"resumed from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}" in out
    assert steps_logged(run_dir) == list(range(1, stopped + 2))


def test_deadline_fires_the_margin_before_the_job_end_and_follows_an_extension():
    from rdp.pretrain.stopping import Deadline

    now, ends = [1000.0], [1600.0]
    deadline = Deadline(5 * 60, end_time=lambda: ends[0], clock=lambda: now[0])
    assert deadline.active and not deadline.due()
    now[0] = 1299.0
    assert not deadline.due()
    now[0] = 1300.0
    ends[0] = 1900.0  # the limit was extended (scontrol update): the end time is read again
    assert not deadline.due()
    now[0] = 1600.0
    assert deadline.due() and "train.save_before_end_minutes=5" in deadline.describe()
    assert not Deadline(5 * 60, end_time=lambda: None).active  # not in a job, or no limit
    assert not Deadline(0, end_time=lambda: 1.0).active  # switched off


def test_a_failed_background_write_stops_training_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from rdp.pretrain import checkpointing
    from rdp.pretrain.checkpoint import CheckpointError
    from rdp.pretrain.config import load_config
    from rdp.pretrain.train import train

    original, saves = checkpointing.save_model_weights, {"n": 0}

    def disk_full(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_model_weights", disk_full)
    config = load_config("tiny", [*TINY, f"train.run_dir={tmp_path}", "train.max_steps=8", "train.checkpoint_every=2"])
    with pytest.raises(CheckpointError, match=r"checkpoint at step 4 could not be written or published \(rank 0: "
                                              r"OSError\(28, 'No space left on device'\)\)"):
        train(config, progress=False)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()
    # the write failed in the background: training had gone on, and stopped at the next check
    assert 4 < steps_logged(tmp_path)[-1] <= 6
