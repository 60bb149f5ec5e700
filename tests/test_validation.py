"""A validation split that training never reads, and validation during training: real
sentencepiece tokenizer, real WebDataset shards, the real trainer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_helpers import MODEL, PAD, VOCAB
from rdp.data_pipeline.sample_corpus import write_sample_corpus
from rdp.data_pipeline.tokenizer import SpecialIds, load_tokenizer, train_tokenizer
from rdp.data_pipeline.validation_split import held_out
from rdp.launch.cli import main as rdp

SEQ_LEN, FRACTION, EOS = 24, 0.2, 481


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    documents = write_sample_corpus(str(root / "corpus"), documents=160, seed=5)
    train_tokenizer([str(root / "corpus")], VOCAB, str(root / "tok.model"), SpecialIds(bos=480, eos=EOS, pad=PAD),
                    num_threads=1)
    assert rdp(["data", "shard", "--input", str(root / "corpus"), "--tokenizer", str(root / "tok.model"),
                "--seq-len", str(SEQ_LEN), "--output", str(root / "shards"), "--workers", "0",
                "--validation-fraction", str(FRACTION)]) == 0
    return root, documents


def data_config(root, *extra):
    from rdp.pretrain.config import load_config

    return load_config("tiny", [*MODEL, "data.source=webdataset", f"data.paths=[{root / 'shards'}]",
                                f"data.tokenizer={root / 'tok.model'}", f"data.seq_len={SEQ_LEN}", *extra])


def decode_documents(windows: list[np.ndarray], tokenizer) -> set[str]:
    tokens = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
    tokens = tokens[tokens != PAD]
    ends = np.flatnonzero(tokens == EOS)
    return {tokenizer.decode(tokens[a + 1:b].tolist()) for a, b in zip(np.r_[-1, ends[:-1]], ends)}


def test_training_never_reads_the_validation_split(shards):
    from rdp.data_pipeline import build_stream
    from rdp.data_pipeline.manifest import read_manifest
    from rdp.data_pipeline.stream import SampleReader
    from rdp.pretrain.validation import Validator

    root, documents = shards
    tokenizer = load_tokenizer(str(root / "tok.model"))
    held = {d for d in documents if held_out(d, FRACTION)}
    kept = {d for d in documents if not held_out(d, FRACTION)}
    assert held and kept and not held & kept
    config = data_config(root)
    manifests = {name: read_manifest(str(root / "shards" / name)) for name in ("", "validation")}

    def whole_split(paths: list[str], manifest) -> list[np.ndarray]:
        """One epoch in shard order, through the trainer's own stream."""
        data = config.data.__class__(**{**config.data.__dict__, "paths": paths})
        reader = SampleReader(build_stream(data, VOCAB, 1).spec)
        rows = [reader.sample(p) for p in range(manifest.num_samples)]
        order = [reader.locate(p)[1] for p in range(manifest.num_samples)]
        starts = np.cumsum([0] + [s.samples for s in manifest.shards])
        placed = [None] * manifest.num_samples
        for row, where in zip(rows, order):
            placed[starts[where.shard] + where.sample] = row
        return placed

    training = whole_split([str(root / "shards")], manifests[""])
    validation = whole_split([str(root / "shards" / "validation")], manifests["validation"])
    # every training token comes from a kept document, every validation token from a held-out one
    assert decode_documents(training, tokenizer) == kept
    assert decode_documents(validation, tokenizer) == held
    # the trainer's validator reads the held-out directory, the training stream only its own shards
    validator = Validator(config, engine=None, device=torch.device("cpu"))
    assert validator.validation_paths == [str(root / "shards" / "validation")] and not validator.unavailable
    assert build_stream(config.data, VOCAB, 2).spec.bases == [str(root / "shards")]
    training_rows = {row.tobytes() for row in training}
    for inputs, labels in validator._text_batches():
        for x, y in zip(inputs, labels):
            row = torch.cat([x, torch.where(y[-1:] == -100, PAD, y[-1:])]).numpy().astype(training[0].dtype)
            assert row.tobytes() not in training_rows
    # shards without a validation split: a clear reason, and eval_every refuses to start
    elsewhere = data_config(root, f"data.paths=[{root / 'shards' / 'validation'}]")
    assert "no validation split" in Validator(elsewhere, engine=None, device=torch.device("cpu")).unavailable


def test_validation_during_training_logs_every_depth_and_resumes_exactly(shards, tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    from rdp.pretrain.train import train

    root, _ = shards
    settings = ["train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=2", "train.eval_depths=[1,3]",
                "train.micro_batch_size=2"]
    straight = train(data_config(root, *settings, f"train.run_dir={tmp_path / 'a'}"), progress=False)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation" in r] == [2, 4]
    assert set(records[1]["validation"]["loss"]) == {"1", "3"}
    # the end-of-run table is the same measurement as the last periodic one
    assert straight.validation == records[3]["validation"]
    assert straight.validation_note.startswith("held-out shards")
    events = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "a" / "tensorboard"))
    events.Reload()
    curves = {run for run, tags in events.Runs().items() if "validation/loss" in tags.get("scalars", [])}
    assert len(curves) == 2  # one curve per depth
    # resumed from the step-2 checkpoint: the same losses and the same validation
    train(data_config(root, *settings, f"train.run_dir={tmp_path / 'b'}",
                      f"train.resume={tmp_path / 'a' / 'checkpoints' / 'step_00000002'}"), progress=False)
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r.get("validation")) for r in resumed] == [(r["loss"], r.get("validation")) for r in records[2:]]
    # eval_every on data without a validation split stops before training
    assert rdp(["train", "tiny", "--no-progress", *MODEL, "data.source=webdataset",
                f"data.paths=[{root / 'shards' / 'validation'}]", f"data.seq_len={SEQ_LEN}", "train.eval_every=2",
                f"train.run_dir={tmp_path / 'c'}"]) == 2


def test_a_task_directory_trains_resumes_exactly_and_validates_every_split(tmp_path, capsys):
    """`rdp train reasoning data.source=task:DIR`: a resume from a checkpoint (mid-epoch of the
    task's train split) repeats the uninterrupted run, losses, data position and validation;
    validation covers every test split at every depth in metrics.jsonl, TensorBoard (one
    curve per depth) and the end-of-run table."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    task = tmp_path / "copy"
    task.mkdir()
    splits = {"train": [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12, 13], [5, 9, 2]], "short": [[1, 2], [7, 3]],
              "long": [[1, 2, 3, 4, 5, 6], [9, 8, 7, 6]]}
    for split, inputs in splits.items():
        (task / f"{split}.jsonl").write_text("".join(
            json.dumps({"input": x, "labels": [-100] + x[1:], "difficulty": len(x)}) + "\n" for x in inputs))
    settings = ["--no-progress", f"data.source=task:{task}", "train.max_steps=4", "train.checkpoint_every=2",
                "train.eval_every=2", "train.eval_depths=[1,3]", "train.micro_batch_size=3"]
    assert rdp(["train", "reasoning", *settings, f"train.run_dir={tmp_path / 'a'}"]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation" in r] == [2, 4]
    assert set(records[3]["validation"]) == {"short", "long"} and set(records[3]["validation"]["long"]) == {"1", "3"}
    table = f"  long        {records[3]['validation']['long']['1']['exact_match']:>8.3f}"
    assert "validation exact match by test-time depth" in printed and table in printed
    events = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "a" / "tensorboard"))
    events.Reload()
    for tag in ("validation/short/exact_match", "validation/long/position_accuracy"):
        assert len({run for run, tags in events.Runs().items() if tag in tags.get("scalars", [])}) == 2
    assert rdp(["train", "reasoning", *settings, f"train.run_dir={tmp_path / 'b'}",
                f"train.resume={tmp_path / 'a' / 'checkpoints' / 'step_00000002'}"]) == 0
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_position"] for r in resumed] == [9, 12]  # the second epoch of 5 examples
    assert [(r["loss"], r["data_position"], r.get("validation")) for r in resumed] == \
        [(r["loss"], r["data_position"], r.get("validation")) for r in records[2:]]
