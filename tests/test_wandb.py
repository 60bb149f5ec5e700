"""Metrics go to Weights & Biases when the config names a project: real `wandb` in offline mode
(no network), read back from the run file it writes."""
from __future__ import annotations

import json
import struct
import time

from wandb.proto import wandb_internal_pb2

from rdp.launch.cli import main as rdp

BLOCK, HEADER = 32768, 7  # the .wandb file is a LevelDB-style log of protobuf records


def read_wandb_records(path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left < HEADER or (length == 0 and kind == 0):
            pos += left  # block trailer / padding
            continue
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (1, 2):  # full / first
            pending = chunk
        else:  # middle / last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_records(path, timeout: float = 120.0) -> list[wandb_internal_pb2.Record]:
    """The run file's records once it holds the exit record: wandb's service process writes the
    file on its own schedule, and may still be writing it when `finish()` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def history(run_dir) -> tuple[dict, dict[int, dict]]:
    """(config of the first run record, {step: logged values}) over every offline run file."""
    config, steps = {}, {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run" and not config:
                config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
                config["_run_id"], config["_project"] = record.run.run_id, record.run.project
            elif kind == "history":
                values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.history.item}
                steps[record.history.step.num] = values
    return config, steps


def test_offline_wandb_run_holds_every_step_of_metrics_jsonl_and_resumes_the_same_run(tmp_path, capsys, monkeypatch):
    # what the test does not read, wandb need not collect (system stats, package list, git state)
    for name, value in (("WANDB_X_DISABLE_STATS", "true"), ("WANDB_X_DISABLE_META", "true"),
                        ("WANDB_X_SAVE_REQUIREMENTS", "false"), ("WANDB_DISABLE_GIT", "true")):
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    common = ["train", "tiny", "--no-progress", f"train.run_dir={run_dir}", "train.eval_depths=[]",
              "train.wandb_project=rdp-test", "train.wandb_mode=offline", "train.checkpoint_every=2",
              "model.hidden_size=32", "model.intermediate_size=64", "data.seq_len=32", "train.micro_batch_size=2"]
    assert rdp([*common, "train.max_steps=2"]) == 0
    assert rdp([*common, "train.max_steps=3", "train.resume=auto"]) == 0
    assert "resumed from" in capsys.readouterr().out

    config, steps = history(run_dir)
    assert config["_project"] == "rdp-test" and config["model"]["hidden_size"] == 32
    assert config["_run_id"] == (run_dir / "wandb" / "run_id").read_text().strip()
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 2  # two jobs, one W&B run id
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(steps) == [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        logged = steps[record["step"]]
        for key in ("loss", "lr", "grad_norm", "tokens", "n", "k", "tokens_per_s"):
            assert logged[f"train/{key}"] == record[key], key


def test_wandb_mode_is_checked(capsys):
    assert rdp(["info", "tiny", "train.wandb_mode=maybe"]) == 2
    assert "'train.wandb_mode': must be online or offline" in capsys.readouterr().err
