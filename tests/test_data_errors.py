"""Bad input never trains silently: each case raises a DataError naming the shard, or with
data.skip_corrupt=true is skipped with a warning and a counter."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import shutil
import threading
import time

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

BAD = "shard-000001.tar"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    write_sample_corpus(str(root / "corpus"), documents=60, seed=5, max_words=50)
    train_tokenizer([str(root / "corpus")], VOCAB, str(root / "tok.model"), SpecialIds(480, 481, PAD), num_threads=1)
    write_shards([str(root / "corpus")], str(root / "tok.model"), str(root / "shards"),
                 ShardOptions(seq_len=SEQ_LEN, shard_bytes=24 * 1024, num_workers=0))
    return root / "shards"


@pytest.fixture
def shards(clean, tmp_path):
    shutil.copytree(clean, tmp_path / "shards")
    return tmp_path / "shards"


def stream_for(directory, *overrides, micro=None, workers=0):
    cfg = load_config("tiny", MODEL + ["data.source=webdataset", f"data.paths=[{directory}]",
                                       f"data.seq_len={SEQ_LEN}", f"data.num_workers={workers}", *overrides]).data
    micro = micro or read_manifest(str(directory)).num_samples  # one batch = one whole epoch
    return build_stream(cfg, VOCAB, micro)


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def rewrite_shard(directory, make_sample):
    """Rewrite shard 1 with webdataset's TarWriter, sample 2 replaced by make_sample(key);
    the manifest's size and sha256 are updated, so only the sample check can catch it."""
    import webdataset as wds

    manifest = read_manifest(str(directory))
    entry = manifest.shards[1]
    samples = [{"__key__": f"000001_{i:09d}", "uint16": np.full(SEQ_LEN + 1, 7, "<u2").tobytes()}
               for i in range(entry.samples)]
    samples[2] = make_sample(samples[2]["__key__"])
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, compress=False, mtime=0, user="", group="", mode=0o444) as writer:
        for sample in samples:
            writer.write(sample)
    (directory / BAD).write_bytes(buffer.getvalue())
    data = json.loads((directory / "manifest.json").read_text())
    data["shards"][1].update(bytes=len(buffer.getvalue()), sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    (directory / "manifest.json").write_text(json.dumps(data))


def test_truncated_tar(shards):
    (shards / BAD).write_bytes((shards / BAD).read_bytes()[:5000])
    for verify in ("true", "false"):
        with pytest.raises(DataError, match=rf"shard .*{BAD}: truncated: 5000 bytes"):
            stream_for(shards, f"data.verify_checksums={verify}").next_batch()


def test_corrupt_tar_header(shards):
    flip(shards / BAD, 3 * 1024 + 5)  # inside the name field of sample 3's header
    with pytest.raises(DataError, match=rf"shard .*{BAD}: sha256 .* does not match"):
        stream_for(shards).next_batch()
    with pytest.raises(DataError, match=rf"shard .*{BAD}, sample 3: corrupt tar header"):
        stream_for(shards, "data.verify_checksums=false").next_batch()


def test_checksum_mismatch(shards):
    flip(shards / BAD, 4 * 1024 + 512 + 3)  # a token byte of sample 4
    with pytest.raises(DataError, match=rf"shard .*{BAD}: sha256 .* does not match the manifest"):
        stream_for(shards).next_batch()


def test_sample_of_wrong_length(shards):
    rewrite_shard(shards, lambda key: {"__key__": key, "uint16": np.zeros(SEQ_LEN, "<u2").tobytes()})
    with pytest.raises(DataError, match=rf"{BAD}, sample 2: 32 bytes of tokens, expected 34 \(seq_len 16 \+ 1"):
        stream_for(shards).next_batch()


def test_sample_of_wrong_dtype(shards):
    rewrite_shard(shards, lambda key: {"__key__": key, "uint32": np.zeros(SEQ_LEN + 1, "<u4").tobytes()})
    with pytest.raises(DataError, match=rf"{BAD}, sample 2: member '000001_000000002.uint32' has dtype 'uint32'"):
        stream_for(shards).next_batch()


def test_token_outside_vocab(shards):
    rewrite_shard(shards, lambda key: {"__key__": key, "uint16": np.full(SEQ_LEN + 1, 600, "<u2").tobytes()})
    with pytest.raises(DataError, match=rf"{BAD}, sample 2: token id 600 >= vocab_size 512"):
        stream_for(shards).next_batch()


def test_missing_shard(shards):
    (shards / BAD).unlink()
    with pytest.raises(DataError, match=rf"shard .*{BAD}: missing"):
        stream_for(shards).next_batch()


@pytest.mark.timeout(120)
def test_unreachable_url_names_the_shard(shards):
    handler = functools.partial(QuietHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    stream = stream_for(url)  # the manifest is read here
    server.shutdown()
    server.server_close()
    with pytest.raises(DataError, match=rf"shard {url}/shard-0000\d\d.tar: cannot be read"):
        stream.next_batch()
    # an object-store CLI that fails: the pipe's exit status is checked, the shard is named
    (shards / BAD).unlink()
    stream = stream_for(f"'pipe:cat {shards}/{{}}'", micro=read_manifest(str(shards)).num_samples)
    with pytest.raises(DataError, match=rf"shard pipe:cat .*/{BAD}: cannot be read"):
        stream.next_batch()


@pytest.mark.timeout(120)
def test_errors_cross_dataloader_workers_without_hanging(shards):
    flip(shards / BAD, 4 * 1024 + 512 + 3)
    stream = stream_for(shards, micro=2, workers=2)
    try:
        with pytest.raises(Exception, match=rf"{BAD}: sha256 .* does not match"):
            for _ in range(100):
                stream.next_batch()
    finally:
        stream.close()


def test_skip_corrupt_skips_with_warning_and_counter(clean, shards, caplog):
    (shards / BAD).unlink()
    skipped = read_manifest(str(clean)).shards[1].samples
    reference = stream_for(clean).next_batch()
    stream = stream_for(shards, "data.skip_corrupt=true")
    with caplog.at_level(logging.WARNING, logger="rdp.data"):
        inputs, labels = stream.next_batch()
    assert stream.skipped_samples == skipped
    warnings = [r.getMessage() for r in caplog.records if "skip_corrupt" in r.getMessage()]
    assert len(warnings) == skipped and all(BAD in w for w in warnings)
    assert f"{skipped} sample(s) skipped so far" in warnings[-1]
    dropped = (labels == -100).all(1)
    assert int(dropped.sum()) == skipped and (inputs[dropped] == PAD).all()
    # every other row is exactly what the intact shards give at that position
    assert torch.equal(inputs[~dropped], reference[0][~dropped])
    assert torch.equal(labels[~dropped], reference[1][~dropped])


class StallingHandler(QuietHandler):
    """Serves the manifest, then sends headers for a shard and no data."""

    def do_GET(self):
        if not self.path.endswith(".tar"):
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        time.sleep(20)


@pytest.mark.timeout(60)
def test_stalled_server_is_an_error_not_a_hang(shards, monkeypatch):
    import rdp.data_pipeline.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "STALL_SECONDS", 2)
    monkeypatch.setattr(manifest_module, "HTTP_RETRIES", 0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(StallingHandler, directory=str(shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(DataError, match=rf"shard {url}/shard-0000\d\d.tar: cannot be read"):
            stream_for(url).next_batch()
    finally:
        server.shutdown()
        server.server_close()
