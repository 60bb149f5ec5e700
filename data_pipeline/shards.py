"""Corpus -> packed token windows -> WebDataset .tar shards + manifest.json.

Tokenization runs in worker processes (ordered imap, so the output does not depend on
their timing). Every sample is one tar member `<shard>_<index>.<dtype>` holding seq_len+1
little-endian token ids; all members of a dataset have the same size, which makes the
offset of any sample arithmetic (ShardEntry.first_offset + i * stride). Tar headers carry
fixed mtime/owner/mode, so the same inputs give byte-identical shards.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from rdp.data_pipeline.corpus import expand_inputs, file_sha256, iter_corpus
from rdp.data_pipeline.manifest import (MANIFEST_NAME, TAR_BLOCK, DataError, Manifest, ShardEntry,
                                    member_stride, sample_key, sample_member_bytes)
from rdp.data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

MODES = ("keep-all", "truncate")


@dataclass
class ShardOptions:
    seq_len: int
    mode: str = "keep-all"  # keep-all: documents run across windows; truncate: one window per document
    shard_bytes: int = 64 << 20
    num_workers: int = 2
    text_field: str = "text"
    docs_per_task: int = 64
    add_bos: bool = True  # BOS before every document (docs/data.md says why)
    # which documents this dataset takes (validation_split.py holds some out); None: all
    keep_document: Optional[Callable[[str], bool]] = None


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# ---- tokenization in worker processes ----

_TOKENIZER = None


def _init_worker(model_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(model_path)


def _encode(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int64) for ids in _TOKENIZER.encode(texts)]


def _chunks(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered(pool, chunks: Iterator[list[str]], window: int) -> Iterator[list[np.ndarray]]:
    """Tokenized chunks in input order, with at most `window` chunks in flight: unlike
    Pool.imap, neither the corpus nor finished results pile up in memory."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---- packing ----

class WindowPacker:
    """Each document becomes [BOS] + tokens + [EOS] (BOS only when bos_id is given).
    keep-all: the corpus is one token stream of such documents cut into
    windows tokens[k*L : k*L + L + 1]; consecutive windows share one token so that every
    next-token pair is trained exactly once and no token is lost; the last window is padded.
    truncate: each document starts its own window; longer documents are cut at L+1
    tokens (the rest is counted in dropped_tokens), shorter ones padded."""

    def __init__(self, seq_len: int, mode: str, eos_id: int, pad_id: int, bos_id: Optional[int] = None):
        if mode not in MODES:
            raise DataError(f"--mode {mode!r}: must be one of {', '.join(MODES)}")
        self.seq_len, self.mode, self.eos_id, self.pad_id = seq_len, mode, eos_id, pad_id
        self.prefix = np.array([] if bos_id is None else [bos_id], dtype=np.int64)
        self.buffer = np.empty(0, dtype=np.int64)
        self.total_tokens = self.padding_tokens = self.dropped_tokens = self.documents = 0

    def _pad(self, tokens: np.ndarray) -> np.ndarray:
        missing = self.seq_len + 1 - len(tokens)
        self.padding_tokens += missing
        return np.concatenate([tokens, np.full(missing, self.pad_id, dtype=np.int64)])

    def add(self, tokens: np.ndarray) -> Iterator[np.ndarray]:
        document = np.concatenate([self.prefix, tokens, [self.eos_id]])
        self.total_tokens += len(document)
        self.documents += 1
        width = self.seq_len + 1
        if self.mode == "truncate":
            self.dropped_tokens += max(0, len(document) - width)
            yield document[:width] if len(document) >= width else self._pad(document)
            return
        self.buffer = np.concatenate([self.buffer, document])
        count = (len(self.buffer) - 1) // self.seq_len  # windows that fit completely
        for k in range(count):
            yield self.buffer[k * self.seq_len: k * self.seq_len + width]
        self.buffer = self.buffer[count * self.seq_len:]

    def finish(self) -> Iterator[np.ndarray]:
        # one leftover token was already the last label of the previous window
        if self.mode == "keep-all" and len(self.buffer) > 1:
            yield self._pad(self.buffer)
        self.buffer = np.empty(0, dtype=np.int64)


# ---- tar shards ----

class _ShardSink:
    def __init__(self, output_dir: str, seq_len: int, dtype: str):
        self.output_dir, self.dtype = output_dir, dtype
        self.data_bytes = sample_member_bytes(seq_len, np.dtype(dtype).itemsize)
        self.stride = member_stride(self.data_bytes)
        self.entries: list[ShardEntry] = []
        self.samples_per_shard = 1
        self._writer = self._file = None
        self._count = 0

    def _open(self) -> None:
        import webdataset as wds

        name = f"shard-{len(self.entries):06d}.tar"
        self._file = open(os.path.join(self.output_dir, name + ".tmp"), "wb")
        self._name = name
        # fixed header fields: byte-identical shards for identical inputs
        self._writer = wds.TarWriter(self._file, encoder=False, compress=False, mtime=0,
                                     user="", group="", mode=0o444)
        self._count = 0

    def write(self, window: np.ndarray) -> None:
        if self._writer is None:
            self._open()
        payload = window.astype("<" + np.dtype(self.dtype).str[1:], copy=False).tobytes()
        assert len(payload) == self.data_bytes
        self._writer.write({"__key__": sample_key(len(self.entries), self._count), self.dtype: payload})
        self._count += 1
        if self._count == self.samples_per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        tmp = os.path.join(self.output_dir, self._name + ".tmp")
        size = os.path.getsize(tmp)
        if size < self._count * self.stride + 2 * TAR_BLOCK:
            raise DataError(f"{tmp}: tar is {size} bytes, expected at least {self._count * self.stride}")
        self._check_layout(tmp)
        self.entries.append(ShardEntry(name=self._name, samples=self._count, bytes=size,
                                       sha256=file_sha256(tmp), first_offset=0, stride=self.stride))
        os.replace(tmp, os.path.join(self.output_dir, self._name))
        self._writer = self._file = None

    def _check_layout(self, path: str) -> None:
        """The stream finds sample i at i * stride; make sure the tar writer laid it out so
        (a writer that added extended headers would break that silently)."""
        from rdp.data_pipeline.reader import parse_member_header

        with open(path, "rb") as f:
            for index in {0, self._count - 1}:
                f.seek(index * self.stride)
                name, size = parse_member_header(f.read(TAR_BLOCK))
                expected = f"{sample_key(len(self.entries), index)}.{self.dtype}"
                if (name, size) != (expected, self.data_bytes):
                    raise DataError(f"{path}: member {index} is {name!r} ({size} bytes) at offset "
                                    f"{index * self.stride}, expected {expected!r} ({self.data_bytes} bytes)")

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            os.remove(os.path.join(self.output_dir, self._name + ".tmp"))
            self._writer = self._file = None
        for entry in self.entries:
            os.remove(os.path.join(self.output_dir, entry.name))
        self.entries.clear()


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    value = text.strip().lower().rstrip("b").rstrip("i")
    scale = units.get(value[-1:], 1)
    try:
        return int(float(value[:-1] if value[-1:] in units else value) * scale)
    except ValueError:
        raise DataError(f"size {text!r}: expected e.g. 64MB, 512k or 1000000") from None


def write_shards(inputs: list[str], tokenizer_path: str, output_dir: str, options: ShardOptions) -> Manifest:
    if options.seq_len < 1:
        raise DataError(f"--seq-len {options.seq_len}: must be positive")
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.vocab_size()
    eos_id, pad_id, bos_id = tokenizer.eos_id(), tokenizer.pad_id(), tokenizer.bos_id()
    if eos_id < 0 or pad_id < 0 or (options.add_bos and bos_id < 0):
        raise DataError(f"tokenizer {tokenizer_path}: needs EOS and PAD ids, and BOS unless --no-bos "
                        f"(bos={bos_id}, eos={eos_id}, pad={pad_id})")
    os.makedirs(output_dir, exist_ok=True)
    existing = [n for n in os.listdir(output_dir) if n == MANIFEST_NAME or n.endswith((".tar", ".tar.tmp"))]
    if existing:
        raise DataError(f"--output {output_dir}: already holds {sorted(existing)[:3]}; refusing to overwrite")
    dtype = token_dtype(vocab_size)
    packer = WindowPacker(options.seq_len, options.mode, eos_id, pad_id, bos_id if options.add_bos else None)
    sink = _ShardSink(output_dir, options.seq_len, dtype)
    sink.samples_per_shard = max(1, (options.shard_bytes - 2 * TAR_BLOCK) // sink.stride)

    documents = iter_corpus(files, options.text_field)
    if options.keep_document is not None:
        documents = filter(options.keep_document, documents)
    chunks = _chunks(documents, options.docs_per_task)
    if options.num_workers > 0:
        context = multiprocessing.get_context("spawn")  # no fork of a possibly threaded parent
        pool = context.Pool(options.num_workers, initializer=_init_worker, initargs=(tokenizer_path,))
        encoded = _ordered(pool, chunks, window=4 * options.num_workers)
    else:
        pool = None
        _init_worker(tokenizer_path)
        encoded = map(_encode, chunks)
    try:
        for batch in encoded:
            for tokens in batch:
                for window in packer.add(tokens):
                    sink.write(window)
        for window in packer.finish():
            sink.write(window)
        sink.close_shard()
    except BaseException:
        sink.discard()  # a failed run leaves no half-written dataset behind (the directory had none)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if not sink.entries:
        raise DataError(f"inputs {inputs}: no documents with text")
    manifest = Manifest(
        seq_len=options.seq_len, dtype=dtype, vocab_size=vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_path), tokenizer=tokenizer_path,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, mode=options.mode,
        add_bos=options.add_bos, add_eos=True,
        total_tokens=packer.total_tokens, padding_tokens=packer.padding_tokens,
        dropped_tokens=packer.dropped_tokens,
        sources=[{"path": path, "bytes": os.path.getsize(path), "sha256": file_sha256(path)} for path in files],
        shards=sink.entries)
    tmp = os.path.join(output_dir, MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
    os.replace(tmp, os.path.join(output_dir, MANIFEST_NAME))  # the manifest appears last
    return manifest
