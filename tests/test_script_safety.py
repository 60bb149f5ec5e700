"""No value from a config, a site file or a manifest becomes shell code: sbatch scripts refuse
or quote every value (a run_dir with a newline once injected a command), and shard names are
checked before they reach a `pipe:` command."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from rdp.data_pipeline.manifest import DataError, read_manifest
from rdp.launch.cli import main as rdp
from rdp.pretrain.config import ConfigError
from rdp.slurm.site import load_site


def test_run_dir_with_a_newline_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "injected"
    evil = tmp_path / "evil.yaml"
    # as a YAML file can carry it: before the fix, line 2 of the script was `touch .../injected`
    evil.write_text(f'train:\n  run_dir: "{tmp_path}/run\\ntouch {marker}\\n#"\n')
    assert rdp(["submit", str(evil), "--time", "10", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rdp submit: error: config field 'train.run_dir': ")
    assert "'\\n'" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"]  # no run dir, no script


@pytest.mark.parametrize("run_dir,bad", [("runs/two words", "' '"), ("runs/it's", '"\'"'), ("runs/$(id)", "'$'"),
                                         ("runs/a;b", "';'"), ("runs/`x`", "'`'")])
def test_run_dir_with_shell_characters_is_refused(tmp_path, capsys, monkeypatch, run_dir, bad):
    monkeypatch.chdir(tmp_path)
    assert rdp(["submit", "tiny", "--time", "10", "--dry-run", f"train.run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "'train.run_dir'" in err and bad in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text,field", [
    ("partition: 'gpu;id'", "'partition'"),
    ("name: 'my site'", "'name'"),
    ('log_dir: "logs\\ntouch x"', "'log_dir'"),
    ('sbatch_lines: ["--exclusive\\ntouch x"]', "'sbatch_lines[0]'"),
    ('setup: ["source a\\ntouch x"]', "'setup[0]'"),
    ('modules: ["cuda\\nx"]', "'modules[0]'"),
    ('env: {A: "x\\ny"}', "'env.A'"),
    ('container: {exec_prefix: "apptainer\\nexec"}', "'container.exec_prefix'"),
    ('srun_args: ["--x\\ry"]', "'srun_args[0]'"),
])
def test_site_values_that_would_add_a_script_line_are_refused(tmp_path, text, field):
    path = tmp_path / "site.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as error:
        load_site(path)
    assert str(path) in str(error.value) and field in str(error.value)
    assert "\n" not in str(error.value)


def test_site_values_are_quoted_so_the_script_runs_them_as_data(tmp_path, capsys, monkeypatch):
    """Render with shell-active site values, then run the script with bash (srun, scontrol and
    scancel replaced by recorders on PATH): no marker file appears, srun gets each value as one word."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "injected"
    site = tmp_path / "site.yaml"
    site.write_text(json.dumps({
        "name": "odd", "env": {"ODD": f"$(touch {marker})"},
        "srun_args": [f"--comment=a;touch {marker}", f"--x=$(touch {marker})"],
        "container": {"exec_prefix": f"env 'A=b c;touch {marker}'"},
        "rdp_command": f"rdp`touch {marker}`",
    }))
    assert rdp(["submit", "tiny", "--time", "10", "--site", str(site), "--dry-run", "train.run_dir=runs/q"]) == 0
    script = tmp_path / "runs/q/slurm/submission-001/train.sbatch"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.args"
    (bin_dir / "srun").write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {record}\n")
    for name in ("scontrol", "scancel"):
        (bin_dir / name).write_text("#!/bin/bash\nexit 0\n")
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert "step ended" in result.stdout, result.stderr
    assert not marker.exists()
    args = record.read_text().split("\0")[:-1]
    assert f"--comment=a;touch {marker}" in args and f"--x=$(touch {marker})" in args
    prefix = args.index("env")
    # the prefix and the rdp command keep their word splitting; the backquotes stay literal
    assert args[prefix:prefix + 4] == ["env", f"A=b c;touch {marker}", "rdp`touch", f"{marker}`"]


def test_eval_array_refuses_a_checkpoint_name_that_cannot_be_a_job_name(tmp_path, capsys):
    from rdp.evals.testing import publish_step

    checkpoint = tmp_path / "run\nx"
    publish_step(checkpoint, 1)  # a real checkpoint: submit-eval resolves it before rendering
    assert rdp(["submit-eval", str(checkpoint), "--tasks", "parity", "--depths", "1", "--output",
                str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "#SBATCH --job-name" in err and "'\\n'" in err
    assert not (tmp_path / "out" / "slurm" / "eval-array.sbatch").exists()


def _manifest_with_shard(directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({
        "seq_len": 8, "dtype": "uint16", "vocab_size": 300, "tokenizer_fingerprint": "0" * 64,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "mode": "keep-all", "total_tokens": 9,
        "padding_tokens": 0, "dropped_tokens": 0, "format_version": 1,
        "shards": [{"name": name, "samples": 1, "bytes": 1024, "sha256": "0" * 64, "first_offset": 0, "stride": 1024}]}))


@pytest.mark.parametrize("name", ["shard-0.tar; touch MARK", "$(touch MARK).tar", "../../etc/passwd", "-rf.tar",
                                  "a b.tar", "x.tar\ntouch MARK"])
def test_shard_names_are_checked_before_a_pipe_command_sees_them(tmp_path, capsys, name):
    marker = tmp_path / "MARK"
    name = name.replace("MARK", str(marker))
    _manifest_with_shard(tmp_path / "shards", name)
    location = f"pipe:cat {tmp_path}/shards/{{}}"
    with pytest.raises(DataError, match="shard name"):
        read_manifest(location)
    assert rdp(["data", "inspect", location]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard name" in err[0]
    assert not marker.exists()


def test_plain_shard_names_still_read(tmp_path):
    _manifest_with_shard(tmp_path / "shards", "part_1/shard-000000.tar")
    assert read_manifest(f"pipe:cat {tmp_path}/shards/{{}}").shards[0].name == "part_1/shard-000000.tar"
