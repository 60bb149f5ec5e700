"""Tokenizer training, shard writing, manifest, `rdp data inspect`: real sentencepiece models
and real WebDataset tar shards, built from a generated corpus in a temporary directory."""
from __future__ import annotations

import gzip
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from rdp.data_pipeline.corpus import expand_inputs, iter_corpus
from rdp.data_pipeline.manifest import DataError, read_manifest
from rdp.data_pipeline.sample_corpus import write_sample_corpus
from rdp.data_pipeline.shards import ShardOptions, WindowPacker, token_dtype, write_shards
from rdp.data_pipeline.tokenizer import SpecialIds, load_tokenizer, train_tokenizer
from rdp.launch.cli import main as rdp

VOCAB, BOS, EOS, PAD = 512, 480, 481, 485
SEQ_LEN = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    documents = write_sample_corpus(str(root / "corpus"), documents=240, seed=3)
    config = root / "model.yaml"
    config.write_text(f"model:\n  vocab_size: {VOCAB}\n  bos_token_id: {BOS}\n  eos_token_id: {EOS}\n"
                      f"  pad_token_id: {PAD}\n  end_turn_token_id: 484\n")
    assert rdp(["data", "tokenizer", "--input", str(root / "corpus" / "*"), "--output", str(root / "tok.model"),
                "--config", str(config), "--threads", "1"]) == 0
    return root, documents


def test_tokenizer_ids_fingerprint_and_byte_fallback(corpus):
    root, documents = corpus
    tokenizer = load_tokenizer(str(root / "tok.model"))
    assert (tokenizer.vocab_size(), tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()) == (VOCAB, BOS, EOS, PAD)
    info = json.loads((root / "tok.json").read_text())
    assert info["fingerprint"] == hashlib.sha256((root / "tok.model").read_bytes()).hexdigest()
    assert (info["bos_token_id"], info["eos_token_id"], info["pad_token_id"]) == (BOS, EOS, PAD)
    # characters never seen in training come back exactly through byte fallback
    for text in documents[:20] + ["Ω≈ç√ unseen → ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "  two  spaces\nand a newline "]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.piece_to_id("<0xF0>") != 0  # byte pieces exist


def test_tokenizer_rejects_ids_outside_vocab(tmp_path, corpus):
    root, _ = corpus
    with pytest.raises(DataError, match="bos_id 600 is outside the vocabulary"):
        train_tokenizer([str(root / "corpus")], VOCAB, str(tmp_path / "t.model"), SpecialIds(bos=600, eos=1, pad=2))
    assert rdp(["data", "tokenizer", "--input", str(root / "corpus"), "--output", str(tmp_path / "t.model"),
                "--vocab-size", "600", "--config", str(root / "model.yaml")]) == 2


def test_huginn_layout_matches_the_spec():
    ids = SpecialIds.huginn_layout(65536)
    assert (ids.bos, ids.eos, ids.pad) == (65504, 65505, 65509)
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_round_trip_keep_all(corpus, tmp_path):
    """text -> shards (2 tokenizer processes) -> the windows, in shard order, rebuild exactly
    the tokenized corpus (each document framed BOS + text + EOS), and decode back to the documents."""
    root, documents = corpus
    manifest = write_shards([str(root / "corpus" / "*")], str(root / "tok.model"), str(tmp_path / "s"),
                            ShardOptions(seq_len=SEQ_LEN, shard_bytes=20 * 1024, num_workers=2))
    tokenizer = load_tokenizer(str(root / "tok.model"))
    expected = np.concatenate([np.r_[BOS, tokenizer.encode(d), EOS] for d in documents])
    windows = read_all_windows(tmp_path / "s", manifest)
    assert windows.shape == (manifest.num_samples, SEQ_LEN + 1)
    assert np.array_equal(stream_in_shard_order(tmp_path / "s", manifest), windows)
    assert (windows[:-1, -1] == windows[1:, 0]).all()  # consecutive windows share one token
    stream = np.concatenate([windows[0], windows[1:, 1:].reshape(-1)])
    assert (stream[len(expected):] == PAD).all() and len(stream) - len(expected) == manifest.padding_tokens
    assert np.array_equal(stream[:len(expected)], expected)
    assert manifest.total_tokens == len(expected) and manifest.dropped_tokens == 0
    ends = np.flatnonzero(stream == EOS)
    starts = np.r_[-1, ends[:-1]] + 1
    assert (stream[starts] == BOS).all() and manifest.add_bos and manifest.add_eos
    texts = [tokenizer.decode(stream[a + 1:b].tolist()) for a, b in zip(starts, ends)]
    assert texts == documents
    assert len({s.samples for s in manifest.shards[:-1]}) == 1 and manifest.shards[-1].samples <= manifest.shards[0].samples
    assert manifest.dtype == "uint16" and manifest.tokenizer_fingerprint == json.loads((root / "tok.json").read_text())["fingerprint"]


def test_truncate_mode_one_window_per_document(corpus, tmp_path):
    """Without BOS (--no-bos): each window is the document + EOS, cut or padded."""
    root, documents = corpus
    manifest = write_shards([str(root / "corpus")], str(root / "tok.model"), str(tmp_path / "t"),
                            ShardOptions(seq_len=SEQ_LEN, mode="truncate", num_workers=0, add_bos=False))
    assert not manifest.add_bos
    tokenizer = load_tokenizer(str(root / "tok.model"))
    windows = read_all_windows(tmp_path / "t", manifest)
    assert len(windows) == len(documents)
    dropped = 0
    for window, document in zip(windows, documents):
        full = np.r_[tokenizer.encode(document), EOS]
        keep = full[:SEQ_LEN + 1]
        dropped += len(full) - len(keep)
        assert np.array_equal(window[:len(keep)], keep) and (window[len(keep):] == PAD).all()
    assert manifest.dropped_tokens == dropped > 0


def test_packer_edges():
    packer = WindowPacker(seq_len=4, mode="keep-all", eos_id=9, pad_id=8)
    out = list(packer.add(np.arange(3))) + list(packer.add(np.arange(3, 7))) + list(packer.finish())
    # stream 0 1 2 9 3 4 5 6 9 -> windows [0..4], [4..8]; nothing left over
    assert [w.tolist() for w in out] == [[0, 1, 2, 9, 3], [3, 4, 5, 6, 9]]
    packer = WindowPacker(seq_len=4, mode="keep-all", eos_id=9, pad_id=8)
    out = list(packer.add(np.arange(5))) + list(packer.finish())
    assert [w.tolist() for w in out] == [[0, 1, 2, 3, 4], [4, 9, 8, 8, 8]]
    assert packer.padding_tokens == 3
    # BOS (7) before every document: stream 7 0 1 9 7 5 9
    packer = WindowPacker(seq_len=4, mode="keep-all", eos_id=9, pad_id=8, bos_id=7)
    out = list(packer.add(np.arange(2))) + list(packer.add(np.array([5]))) + list(packer.finish())
    assert [w.tolist() for w in out] == [[7, 0, 1, 9, 7], [7, 5, 9, 8, 8]] and packer.total_tokens == 7
    packer = WindowPacker(seq_len=4, mode="truncate", eos_id=9, pad_id=8, bos_id=7)
    assert [w.tolist() for w in packer.add(np.arange(2))] == [[7, 0, 1, 9, 8]]


def test_shard_writing_is_byte_identical(corpus, tmp_path):
    root, _ = corpus
    names = []
    for workers, out in ((0, "a"), (2, "b")):
        write_shards([str(root / "corpus" / "*.jsonl*"), str(root / "corpus" / "table.parquet")],
                     str(root / "tok.model"), str(tmp_path / out),
                     ShardOptions(seq_len=SEQ_LEN, shard_bytes=16 * 1024, num_workers=workers))
        names.append(sorted(os.listdir(tmp_path / out)))
    assert names[0] == names[1] and len(names[0]) > 3
    for name in names[0]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_inspect_and_verify(corpus, tmp_path, capsys):
    root, documents = corpus
    out = tmp_path / "s"
    assert rdp(["data", "shard", "--input", str(root / "corpus"), "--tokenizer", str(root / "tok.model"),
                "--seq-len", str(SEQ_LEN), "--output", str(out), "--shard-size", "12k", "--workers", "1"]) == 0
    capsys.readouterr()
    assert rdp(["data", "inspect", str(out), "--verify", "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "verify: all" in text and "seq_len 32" in text and "sample 0: " in text
    assert documents[0][:20] in text  # decoded back to the first document's text

    shards = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
    bad = out / shards[2]
    data = bytearray(bad.read_bytes())
    data[2 * 1024 + 600] ^= 0xFF  # one token byte of the third sample
    bad.write_bytes(bytes(data))
    missing = out / shards[4]
    missing.unlink()
    assert rdp(["data", "inspect", str(out), "--verify", "--samples", "0"]) == 1
    text = capsys.readouterr().out
    assert f"BAD shard {shards[2]}: sha256 does not match" in text
    assert f"BAD shard {shards[4]}: missing" in text and "2 of" in text


def test_writer_bad_input_names_the_file(corpus, tmp_path):
    root, _ = corpus
    broken = tmp_path / "broken.jsonl.gz"
    with gzip.open(broken, "wt") as f:
        f.write('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"broken.jsonl.gz:2: not valid JSON"):
        write_shards([str(root / "corpus"), str(broken)], str(root / "tok.model"), str(tmp_path / "o"),
                     ShardOptions(seq_len=8, shard_bytes=8192, num_workers=0))
    assert os.listdir(tmp_path / "o") == []  # shards written before the error are removed again
    with pytest.raises(DataError, match="no file matches"):
        expand_inputs([str(tmp_path / "nothing-*.jsonl")])
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_shards([str(root / "corpus")], str(root / "tok.model"), str(tmp_path / "o2"), ShardOptions(seq_len=8))
    assert (tmp_path / "o2" / "manifest.json").read_text() == "{}"


def read_all_windows(directory, manifest) -> np.ndarray:
    """Every sample in shard order, read with a plain webdataset pipeline (not the stream)."""
    import webdataset as wds

    urls = [str(directory / s.name) for s in manifest.shards]
    rows = [np.frombuffer(sample[manifest.dtype], dtype="<u2").astype(np.int64)
            for sample in wds.WebDataset(urls, shardshuffle=False)]
    assert [len(rows)] == [manifest.num_samples]
    return np.stack(rows)


def stream_in_shard_order(directory, manifest) -> np.ndarray:
    """One epoch through build_stream (the trainer's entry point), each row put back at the
    (shard, sample) the global order says it came from."""
    from rdp.data_pipeline import build_stream
    from rdp.pretrain.config import load_config

    cfg = load_config("tiny", [f"model.vocab_size={VOCAB}", f"model.bos_token_id={BOS}", f"model.eos_token_id={EOS}",
                               f"model.pad_token_id={PAD}", "model.end_turn_token_id=484", "data.source=webdataset",
                               f"data.paths=[{directory}]", f"data.seq_len={SEQ_LEN}"]).data
    n = manifest.num_samples
    stream = build_stream(cfg, VOCAB, n)
    inputs, labels = stream.next_batch()
    rows = torch.cat([inputs, torch.where(labels[:, -1:] == -100, PAD, labels[:, -1:])], 1).numpy()
    starts = np.cumsum([0] + [s.samples for s in manifest.shards])
    placed = np.full_like(rows, -1)
    for position in range(n):
        where = stream._reader.locate(position)[1]
        placed[starts[where.shard] + where.sample] = rows[position]
    assert not np.array_equal(rows, placed)  # the stream's order is a permutation, not shard order
    return placed


def test_read_manifest_missing(tmp_path):
    with pytest.raises(DataError, match="no manifest here"):
        read_manifest(str(tmp_path))
    assert list(iter_corpus([])) == []
