"""sbatch rendering, site configs and `rdp submit --dry-run`: no cluster needed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rdp.launch.cli import main as rdp
from rdp.pretrain.config import ConfigError
from rdp.slurm.render import time_limit_seconds
from rdp.slurm.site import SiteConfig, load_site
from rdp.slurm.status import format_status, run_status

GPU_SITE = """
name: bigcluster
partition: gpu
account: proj42
module_purge: true
modules: [cuda/12.4, nccl/2.21]
setup: ["source /opt/rdp/.venv/bin/activate"]
env: {OMP_NUM_THREADS: "8"}
nccl: {NCCL_IB_HCA: mlx5, NCCL_SOCKET_IFNAME: ib0}
container:
  srun_args: ["--container-image=/images/rdp.sqsh"]
sbatch_lines: ["--exclusive", "#SBATCH --constraint=h100"]
rdp_command: rdp
cpus_per_task: 12
signal_seconds: 600
"""


def dry_run(capsys, *args: str) -> str:
    assert rdp(["submit", *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_64_node_gpu_dry_run_line_by_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    site = tmp_path / "site.yaml"
    site.write_text(GPU_SITE)
    run_dir = tmp_path / "runs" / "big"
    out = dry_run(capsys, "huginn-3.5b", "--nodes", "64", "--gpus-per-node", "8", "--time", "48:00:00",
                  "--qos", "high", "--site", str(site), f"train.run_dir={run_dir}", "train.max_steps=1000")
    script_path = run_dir / "slurm" / "submission-001" / "train.sbatch"
    assert out.splitlines()[-1] == f"# dry run: wrote {script_path}; nothing submitted"
    script = script_path.read_text()
    assert out == script + out.splitlines()[-1] + "\n"
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=rdp-big",
        "#SBATCH --nodes=64",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --time=48:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --signal=B:USR1@600",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run_dir}/slurm/logs/%x-%j.out",
        f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --exclusive",
        "#SBATCH --constraint=h100",
    ]
    # sbatch stops reading options at the first command: all of them come before it
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    # rendezvous variables inherited from the submitting shell are dropped before the site's lines
    assert lines[first_command] == "unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK"
    site_start = lines.index("module purge")
    assert first_command < site_start
    assert lines[site_start:site_start + 5] == [
        "module purge", "module load cuda/12.4", "module load nccl/2.21",
        "source /opt/rdp/.venv/bin/activate", "set -u"]
    for export in ("export OMP_NUM_THREADS=8", "export NCCL_IB_HCA=mlx5", "export NCCL_SOCKET_IFNAME=ib0"):
        assert export in lines
    assert "MAX_STEPS=1000" in lines and "REQUEUE_ON_SIGNAL=1" in lines
    srun = [line for line in lines if line.lstrip().startswith("srun ")]
    assert srun == [
        "srun --nodes=64 --ntasks=512 --ntasks-per-node=8 --cpus-per-task=12 --kill-on-bad-exit=1 "
        "--container-image=/images/rdp.sqsh "
        f"rdp train {run_dir}/slurm/submission-001/config.yaml train.resume=auto --no-progress &"]
    # the step runs in the background and is waited for, so traps fire; both signals trapped
    assert "trap 'forward USR1' USR1" in lines and "trap 'forward TERM' TERM" in lines
    assert lines[lines.index(srun[0]) + 1] == "step_pid=$!"
    assert '    scontrol requeue "$SLURM_JOB_ID" || log "requeue refused (a preempted job is requeued by SLURM itself)"' in lines
    assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0
    # the config the job trains is the fully resolved one, with an absolute run dir
    saved = (run_dir / "slurm" / "submission-001" / "config.yaml").read_text()
    assert f"run_dir: {run_dir}" in saved and "hidden_size: 5280" in saved and "max_steps: 1000" in saved


def test_cpu_chain_renders_an_array_that_does_not_requeue_itself(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = dry_run(capsys, "tiny", "--tasks-per-node", "2", "--time", "10", "--chain", "3", "--site", "local",
                  "train.run_dir=runs/c")
    lines = out.splitlines()
    assert "#SBATCH --array=0-2%1" in lines
    assert f"#SBATCH --output={tmp_path}/runs/c/slurm/logs/%x-%A_%a.out" in lines
    assert "#SBATCH --partition=debug" in lines and "#SBATCH --signal=B:USR1@30" in lines
    assert not any(line.startswith("#SBATCH --gpus") for line in lines)
    assert "REQUEUE_ON_SIGNAL=0" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert srun.startswith("srun --nodes=1 --ntasks=2 --ntasks-per-node=2 --cpus-per-task=1 --kill-on-bad-exit=1 "
                           f"{sys.executable} -m rdp.launch.cli train ")
    # a second submission to the same run gets its own folder; the first is kept
    dry_run(capsys, "tiny", "--time", "10", "train.run_dir=runs/c")
    assert sorted(p.name for p in (tmp_path / "runs/c/slurm").glob("submission-*")) == ["submission-001",
                                                                                      "submission-002"]


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("1:30", 90), ("48:00:00", 172800),
                                           ("2-00", 172800), ("1-02:03", 93780), ("1-00:00:05", 86405)])
def test_time_formats(value, seconds):
    assert time_limit_seconds(value) == seconds


@pytest.mark.parametrize("args,message", [
    (["--time", "1h"], "--time '1h'"),
    (["--time", "00:00:00"], "--time '00:00:00'"),
    (["--time", "10", "--nodes", "0"], "--nodes must be >= 1"),
    (["--time", "10", "--chain", "0"], "--chain must be >= 1"),
    (["--time", "00:00:20", "--site", "local"], "'signal_seconds': 30 s warning does not fit in --time 00:00:20"),
    (["--time", "10", "train.max_steps=-1"], "'train.max_steps'"),
])
def test_bad_submit_arguments_name_the_problem_and_write_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert rdp(["submit", "tiny", *args, "--dry-run", "train.run_dir=runs/x"]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("x/slurm/submission-*"))


@pytest.mark.parametrize("text,field", [
    ("cpus_per_task: 0", "'cpus_per_task'"),
    ("nccl: {IB_HCA: mlx5}", "'nccl.IB_HCA'"),
    ("env: {'BAD NAME': 1}", "'env.BAD NAME'"),
    ("sbatch_lines: [exclusive]", "'sbatch_lines'"),
    ("partition: 'two words'", "'partition'"),
    ("modulez: [cuda]", "modulez"),
    ("cpus_per_task: many", "cpus_per_task"),
])
def test_bad_site_config_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "site.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as error:
        load_site(path)
    assert str(path) in str(error.value) and field in str(error.value)


def test_shipped_site_files_load():
    assert load_site("local").partition == "debug"
    gpu = load_site("example-gpu")
    assert gpu.nccl["NCCL_SOCKET_IFNAME"] == "ib0" and gpu.container.srun_args
    assert load_site(None) == SiteConfig()


def test_status_reads_checkpoint_metrics_and_a_torn_last_line(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000040\n")
    records = [{"step": 39, "loss": 2.5, "tokens": 19968}, {"step": 40, "loss": 2.25, "tokens": 20480}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 41, "lo')
    status = run_status(run)
    assert (status.newest_checkpoint, status.checkpoint_step) == ("step_00000040", 40)
    assert (status.last_step, status.tokens_seen, status.last_loss) == (40, 20480, 2.25)
    assert format_status(status).splitlines() == [
        f"run {run}", "jobs: none submitted from this run dir", "newest checkpoint: step_00000040 (step 40)",
        "last logged step: 40", "tokens seen: 20,480", "last loss: 2.250000"]
    assert rdp(["status", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_submit_eval_dry_run_one_array_task_per_task_and_depth(tmp_path, capsys):
    from rdp.evals.testing import publish_step, weights_sha256

    run = tmp_path / "run"
    step = publish_step(run, 3)  # every array task evaluates this step dir and refuses other weights
    assert rdp(["submit-eval", str(run), "--tasks", "parity,s3", "--depths", "1,8", "--split-tasks",
                "--gpus-per-node", "1", "--time", "02:00:00", "--site", "local", "--eval-args", "--limit 10",
                "--dry-run"]) == 0
    checkpoint = run / "eval" / "step_00000003"  # the default output names the step
    array = (checkpoint / "slurm" / "eval-array.sbatch").read_text().splitlines()
    assert "#SBATCH --array=0-3" in array and "#SBATCH --gpus-per-node=1" in array
    assert "#SBATCH --time=02:00:00" in array and "#SBATCH --partition=debug" in array
    assert "TASKS=(parity parity s3 s3)" in array and "DEPTHS=(1 8 1 8)" in array
    srun = next(line for line in array if line.startswith("srun "))
    assert srun == (f"srun --nodes=1 --ntasks=1 --cpus-per-task=1 --gpus-per-node=1 {sys.executable} -m rdp.launch.cli "
                    f"eval {step.resolve()} --tasks \"${{TASKS[$i]}}\" --depths \"${{DEPTHS[$i]}}\" --out \"$part\" "
                    f"--weights-sha256 {weights_sha256(step)} --no-progress --limit 10 --device cuda")
    merge = (checkpoint / "slurm" / "eval-merge.sbatch").read_text().splitlines()
    assert not any("gpus" in line for line in merge)
    assert merge[-1] == (f"srun --nodes=1 --ntasks=1 --cpus-per-task=1 {sys.executable} -m rdp.launch.cli "
                         f"merge-eval {checkpoint.resolve()} --expect 4")
    for path in ("eval-array.sbatch", "eval-merge.sbatch"):
        assert subprocess.run(["bash", "-n", str(checkpoint / "slurm" / path)]).returncode == 0
    assert rdp(["submit-eval", str(tmp_path / "nope"), "--tasks", "parity", "--depths", "1", "--dry-run"]) == 2
    assert rdp(["submit-eval", str(run), "--tasks", "parity", "--depths", "0", "--dry-run"]) == 2
    assert "--depths must be >= 1" in capsys.readouterr().err


def test_merge_eval_unions_parts_and_names_missing_and_mismatched_ones(tmp_path, capsys):
    def part(index: int, depth: int, settings: dict, weights: str = "ab12") -> None:
        folder = tmp_path / "parts" / f"{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps({"checkpoint": "/ck", "settings": settings, "step": 40,
                                                         "weights_sha256": weights, "results": {
            "parity/easy": {str(depth): {"score": depth / 10, "stderr": 0.01, "metric": "exact_match"}}}}))

    part(0, 4, {"seed": 1})
    part(2, 1, {"seed": 1})
    assert rdp(["merge-eval", str(tmp_path), "--expect", "3"]) == 1
    out = capsys.readouterr().out
    assert "parts missing (their array tasks failed; see slurm/logs): 001" in out
    merged = json.loads((tmp_path / "results.json").read_text())
    assert list(merged["results"]["parity/easy"]) == ["1", "4"]  # ordered by depth, not by part
    table = (tmp_path / "results.md").read_text().splitlines()
    assert "| task | metric | r=1 | r=4 |" in table
    assert "| parity/easy | exact_match | 0.100 ± 0.010 | 0.400 ± 0.010 |" in table
    assert (merged["step"], merged["weights_sha256"]) == (40, "ab12")
    part(1, 2, {"seed": 2})
    assert rdp(["merge-eval", str(tmp_path)]) == 2
    assert "parts/001/results.json: evaluated another checkpoint or with other settings" in capsys.readouterr().err
    part(1, 2, {"seed": 1}, weights="cd34")  # same settings, other weights
    assert rdp(["merge-eval", str(tmp_path)]) == 2
    assert "parts/001/results.json: evaluated another checkpoint" in capsys.readouterr().err
