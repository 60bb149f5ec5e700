"""Bad input at the edges of the `rdp` command: one line naming the file, field or option at
fault, a non-zero exit, and nothing written."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rdp.launch.cli import main as rdp


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"rdp {command}: error: "), err
    return lines[0]


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  hidden_size: 64\n  num_heads: [4\ntrain:\n  max_steps: 2\n")
    assert rdp(["train", str(config), f"train.run_dir={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys, "train")
    assert str(config) in line and "YAML syntax error at line 4" in line
    assert rdp(["info", "tiny", "model.hidden_size=[64"]) == 2
    assert "override 'model.hidden_size=[64'" in one_error_line(capsys, "info")
    assert not (tmp_path / "run").exists()


def test_missing_tokenizer_file_names_the_field(tmp_path, capsys):
    missing = tmp_path / "nope" / "tok.model"
    assert rdp(["train", "tiny", "--no-progress", f"data.tokenizer={missing}", f"train.run_dir={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys, "train")
    assert "data.tokenizer" in line and str(missing) in line and "no such file" in line
    assert not (tmp_path / "run").exists()


def test_triton_kernels_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert rdp(["train", "tiny", "--no-progress", "model.kernels=triton", f"train.run_dir={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys, "train")
    assert "model.kernels=triton" in line and "no CUDA GPU" in line
    assert not (tmp_path / "run").exists()


def test_flops_unknown_gpu_lists_the_known_ones(capsys):
    assert rdp(["flops", "tiny", "--gpu", "v100"]) == 2
    line = one_error_line(capsys, "flops")
    assert "--gpu 'v100': unknown GPU (known: h100, h200, a100, mi250x)" in line
    # another device is fine once its peak is given
    assert rdp(["flops", "tiny", "--plan", "--gpu", "v100", "--peak-flops", "125e12", "--json"]) == 0


def test_flops_plan_prints_the_assumptions_it_used(capsys):
    assert rdp(["flops", "tiny", "--plan", "--gpus", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "plan assumes (not given): --tokens 8e+11, --gpu h100, --mfu 0.4" in out
    assert any(line.startswith("plan: 8e+11 tokens on 64 x h100 at MFU 0.4:") for line in out)
    assert rdp(["flops", "tiny", "--plan", "--gpus", "8", "--tokens", "1e9", "--gpu", "a100", "--mfu", "0.5"]) == 0
    assert not any(line.startswith("plan assumes") for line in capsys.readouterr().out.splitlines())


def test_status_of_a_missing_run_dir_exits_2(tmp_path):
    # through the installed console entry point, in its own process
    result = subprocess.run([sys.executable, "-m", "rdp.launch.cli", "status", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"rdp status: error: {tmp_path / 'missing'}: no such run directory"]


@pytest.mark.parametrize("command", ["tokenizer", "shard"])
def test_data_without_accepted_files_lists_the_extensions(tmp_path, capsys, command):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.csv").write_text("a,b\n")
    (corpus / "readme.md").write_text("# hi\n")
    args = {"tokenizer": ["--vocab-size", "300", "--output", str(tmp_path / "tok.model")],
            "shard": ["--tokenizer", str(tmp_path / "tok.model"), "--seq-len", "8", "--output", str(tmp_path / "out")]}
    assert rdp(["data", command, "--input", str(corpus), *args[command]]) == 2
    line = one_error_line(capsys, "data")
    assert "no corpus files found" in line and ".txt, .txt.gz, .jsonl, .jsonl.gz, .json.gz, .ndjson, .parquet" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
