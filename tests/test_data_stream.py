"""The WebDataset stream through exactly what the trainer uses: build_stream(...),
next_batch(), state_dict(), load_state_dict(). Every expectation is computed independently
from the tar files with a plain webdataset pipeline."""
from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from rdp.data_pipeline import build_stream
from rdp.data_pipeline.manifest import DataError, read_manifest
from rdp.data_pipeline.sample_corpus import write_sample_corpus
from rdp.data_pipeline.shards import ShardOptions, write_shards
from rdp.data_pipeline.tokenizer import SpecialIds, train_tokenizer
from rdp.pretrain.config import load_config
from data_helpers import MODEL, PAD, SEQ_LEN, VOCAB, QuietHandler


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two sources made with one tokenizer; shards of uneven size (the last one is short)."""
    root = tmp_path_factory.mktemp("stream")
    write_sample_corpus(str(root / "a"), documents=120, seed=1, max_words=60)
    write_sample_corpus(str(root / "b"), documents=40, seed=2, max_words=60)
    train_tokenizer([str(root / "a"), str(root / "b")], VOCAB, str(root / "tok.model"),
                    SpecialIds(bos=480, eos=481, pad=PAD), num_threads=1)
    for name in ("a", "b"):
        write_shards([str(root / name)], str(root / "tok.model"), str(root / f"{name}-shards"),
                     ShardOptions(seq_len=SEQ_LEN, shard_bytes=37 * 1024, num_workers=0))
    manifest = read_manifest(str(root / "a-shards"))
    assert len(manifest.shards) >= 4 and manifest.shards[-1].samples < manifest.shards[0].samples
    return root


def all_samples(directory) -> Counter:
    import webdataset as wds

    manifest = read_manifest(str(directory))
    rows = [tuple(np.frombuffer(s["uint16"], dtype="<u2").tolist())
            for s in wds.WebDataset([str(directory / e.name) for e in manifest.shards], shardshuffle=False)]
    return Counter(rows)


def config(root, *overrides, paths=None):
    paths = paths or [str(root / "a-shards")]
    return load_config("tiny", MODEL + ["data.source=webdataset", f"data.paths=[{','.join(paths)}]",
                                        f"data.seq_len={SEQ_LEN}", *overrides]).data


def rows_of(batch) -> list[tuple]:
    inputs, labels = batch
    assert inputs.dtype == labels.dtype == torch.long and inputs.shape == labels.shape
    full = torch.cat([inputs, inputs[:, -1:]], 1)
    full[:, -1] = torch.where(labels[:, -1] == -100, PAD, labels[:, -1])
    assert torch.equal(torch.where(labels == -100, PAD, labels), full[:, 1:])  # labels = inputs shifted
    return [tuple(r) for r in full.tolist()]


def global_rows(cfg, steps, ranks, micro, workers=0, state=None):
    """Run `ranks` streams in lockstep; return rows in global order and the final states."""
    cfg.num_workers = workers
    streams = [build_stream(cfg, VOCAB, micro, rank, ranks) for rank in range(ranks)]
    if state:
        for s in streams:
            s.load_state_dict(state)
    rows = []
    for _ in range(steps):
        for s in streams:
            rows += rows_of(s.next_batch())
    states = [s.state_dict() for s in streams]
    assert all(st == states[0] for st in states)
    return rows, states[0]


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch(shards):
    expected = all_samples(shards / "a-shards")
    n = sum(expected.values())
    micro = 3
    steps = -(-2 * n // (2 * micro)) + 1  # a little over two epochs, crossing both boundaries
    rows, state = global_rows(config(shards), steps, ranks=2, micro=micro, workers=2)
    assert Counter(rows[:n]) == expected and Counter(rows[n:2 * n]) == expected
    assert rows[:n] != rows[n:2 * n]  # epoch 1 is a different permutation
    assert state == {"position": steps * 2 * micro, "epoch": steps * 2 * micro // n}
    # the same global order with one rank and no workers
    reference, _ = global_rows(config(shards), steps * 2, ranks=1, micro=micro)
    assert rows == reference


def test_resume_continues_exactly_on_other_rank_and_worker_counts(shards):
    reference, _ = global_rows(config(shards), 12, ranks=1, micro=6)
    before, state = global_rows(config(shards), 3, ranks=2, micro=3)
    assert before == reference[:18] and state["position"] == 18
    after, _ = global_rows(config(shards), 4, ranks=3, micro=2, workers=2, state=state)
    assert after == reference[18:42]
    # an arbitrary position that is no multiple of any batch
    odd, _ = global_rows(config(shards), 2, ranks=1, micro=5, state={"position": 7})
    assert odd == reference[7:17]
    stream = build_stream(config(shards), VOCAB, 2, 0, 1)
    with pytest.raises(DataError, match="epoch 3 at position 7"):
        stream.load_state_dict({"position": 7, "epoch": 3})


def test_resume_at_800b_tokens_reads_only_the_batch(shards, monkeypatch):
    from rdp.data_pipeline import reader

    n = read_manifest(str(shards / "a-shards")).num_samples
    expected = all_samples(shards / "a-shards")
    reads = []
    original = reader.OpenShard.read
    monkeypatch.setattr(reader.OpenShard, "read", lambda self, i: reads.append(i) or original(self, i))
    position = 195_312_500
    stream = build_stream(config(shards), VOCAB, 4, 0, 1)
    stream.load_state_dict({"position": position, "epoch": position // n})
    rows = rows_of(stream.next_batch())
    assert len(reads) == 4 and all(expected[r] for r in rows)  # 4 samples read, no replay
    assert stream.state_dict() == {"position": position + 4, "epoch": (position + 4) // n}
    # the same rows as a stream that starts one batch earlier and reads on
    earlier = build_stream(config(shards), VOCAB, 4, 0, 1)
    earlier.load_state_dict({"position": position - 4})
    earlier.next_batch()
    assert rows_of(earlier.next_batch()) == rows


def test_mixing_follows_the_weights_deterministically(shards):
    a, b = all_samples(shards / "a-shards"), all_samples(shards / "b-shards")
    cfg = config(shards, "data.weights=[0.7,0.3]", paths=[str(shards / "a-shards"), str(shards / "b-shards")])
    rows, state = global_rows(cfg, 10, ranks=1, micro=1000)
    share_a = sum(r in a for r in rows) / len(rows)
    assert all(r in a or r in b for r in rows)
    assert abs(share_a - 0.7) < 0.02
    again, _ = global_rows(cfg, 1, ranks=2, micro=500, state={"position": 9000})
    assert again == rows[9000:]
    other_seed, _ = global_rows(config(shards, "data.weights=[0.7,0.3]", "data.seed=7",
                                       paths=[str(shards / "a-shards"), str(shards / "b-shards")]), 1, 1, 1000)
    assert other_seed != rows[:1000]
    assert state["epoch"] >= 1  # source b (40 documents) has been through more than one epoch


def test_http_pipe_and_file_url_sources_give_the_same_rows(shards):
    reference, _ = global_rows(config(shards), 3, ranks=1, micro=4)
    handler = functools.partial(QuietHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/a-shards"
    try:
        assert global_rows(config(shards, paths=[url]), 3, ranks=1, micro=4)[0] == reference
    finally:
        server.shutdown()
        server.server_close()
    piped = global_rows(config(shards, paths=[f"'pipe:cat {shards}/a-shards/{{}}'"]), 3, ranks=1, micro=4)[0]
    assert piped == reference
    assert global_rows(config(shards, paths=[f"file://{shards}/a-shards"]), 3, ranks=1, micro=4)[0] == reference
    with pytest.raises(DataError, match=r"manifest http://127.0.0.1:\d+/a-shards/manifest.json: cannot be read"):
        build_stream(config(shards, paths=[url]), VOCAB, 4)


def test_build_stream_checks_manifest_against_config(shards, tmp_path):
    with pytest.raises(DataError, match="vocab_size 512 .* does not match model.vocab_size 128"):
        build_stream(config(shards), 128, 4)
    with pytest.raises(DataError, match="seq_len 16 does not match data.seq_len 32"):
        build_stream(load_config("tiny", MODEL + ["data.source=webdataset", f"data.paths=[{shards}/a-shards]",
                                                  "data.seq_len=32"]).data, VOCAB, 4)
    other = tmp_path / "other.model"
    other.write_bytes(b"not the tokenizer")
    with pytest.raises(DataError, match="tokenizer_fingerprint .* does not match data.tokenizer"):
        build_stream(config(shards, f"data.tokenizer={other}"), VOCAB, 4)
    build_stream(config(shards, f"data.tokenizer={shards / 'tok.model'}"), VOCAB, 4)
    with pytest.raises(DataError, match="no manifest here"):
        build_stream(config(shards, paths=[str(tmp_path)]), VOCAB, 4)


def test_trainer_resumes_bit_identically_on_shards(shards, tmp_path):
    """The real training loop on WebDataset shards: resuming from the step-2 checkpoint of a
    4-step run, with another DataLoader worker count, gives the same losses for steps 3-4."""
    from rdp.pretrain.train import train

    def run(run_dir, steps, *extra):
        cfg = load_config("tiny", MODEL + ["data.source=webdataset", f"data.paths=[{shards}/a-shards]",
                                           f"data.seq_len={SEQ_LEN}", f"data.tokenizer={shards}/tok.model",
                                           f"train.run_dir={run_dir}", f"train.max_steps={steps}",
                                           "train.checkpoint_every=2", "train.eval_depths=[]", *extra])
        return train(cfg, progress=False).losses

    straight = run(tmp_path / "a", 4, "data.num_workers=2")
    checkpoint = tmp_path / "a" / "checkpoints" / "step_00000002"
    assert checkpoint.is_dir()
    resumed = run(tmp_path / "b", 4, "data.num_workers=0", f"train.resume={checkpoint}")
    assert len(straight) == 4 and resumed == straight[2:]


def test_uint32_shards_stream_the_same_tokens(shards, tmp_path, monkeypatch):
    """Vocabularies past 65536 store uint32; forced here on the small tokenizer."""
    import rdp.data_pipeline.shards as writer

    monkeypatch.setattr(writer, "token_dtype", lambda vocab_size: "uint32")
    writer.write_shards([str(shards / "a")], str(shards / "tok.model"), str(tmp_path / "wide"),
                        writer.ShardOptions(seq_len=SEQ_LEN, shard_bytes=37 * 1024, num_workers=0))
    assert read_manifest(str(tmp_path / "wide")).dtype == "uint32"
    wide, _ = global_rows(config(shards, paths=[str(tmp_path / "wide")]), 3, ranks=1, micro=8)
    narrow, _ = global_rows(config(shards), 3, ranks=1, micro=8)
    assert wide == narrow
