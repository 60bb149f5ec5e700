"""`rdp data inspect DIR [--verify]`: what a shard directory holds, and whether it is intact."""
from __future__ import annotations

import hashlib
import os
from typing import Iterator

from rdp.data_pipeline.manifest import (DataError, Manifest, is_local, join_location, local_path, read_manifest,
                                    sample_key, sample_member_bytes)


class _HashingReader:
    """A file object that hashes and counts what tarfile reads through it."""

    def __init__(self, raw):
        self.raw, self.digest, self.count = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 22):
            pass


def verify_shard(base: str, manifest: Manifest, shard_index: int) -> str | None:
    """Stream one shard through webdataset's tar iterator; None if it matches the manifest,
    else the reason."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import tar_file_iterator

    entry = manifest.shards[shard_index]
    location = join_location(base, entry.name)
    if is_local(location) and not os.path.exists(local_path(location)):
        return "missing"
    key_prefix = entry.name.rsplit("/", 1)[-1].removeprefix("shard-").removesuffix(".tar")
    expected_bytes = sample_member_bytes(manifest.seq_len, manifest.itemsize)
    count = 0
    try:
        stream = gopen(location, "rb")
        reader = _HashingReader(stream)
        try:
            for member in tar_file_iterator(reader):
                key, _, extension = member["fname"].partition(".")
                if key_prefix.isdigit() and key != sample_key(int(key_prefix), count):
                    return f"member {count} is {member['fname']!r}, expected key {sample_key(int(key_prefix), count)}"
                if extension != manifest.dtype:
                    return f"member {member['fname']!r}: dtype {extension!r}, the manifest says {manifest.dtype}"
                if len(member["data"]) != expected_bytes:
                    return f"member {member['fname']!r}: {len(member['data'])} bytes, expected {expected_bytes}"
                count += 1
            reader.drain()
        finally:
            stream.close()
    except Exception as exc:  # noqa: BLE001 - tar, transport and pipe errors all mean a bad shard
        return f"unreadable ({exc})"
    if count != entry.samples:
        return f"{count} samples, the manifest says {entry.samples}"
    if reader.count != entry.bytes:
        return f"{reader.count} bytes, the manifest says {entry.bytes}"
    if reader.digest.hexdigest() != entry.sha256:
        return "sha256 does not match the manifest"
    return None


def describe(base: str, manifest: Manifest) -> Iterator[str]:
    yield f"manifest      {join_location(base, 'manifest.json')}"
    yield f"shards        {len(manifest.shards)}  samples {manifest.num_samples:,}  seq_len {manifest.seq_len}  dtype {manifest.dtype}  mode {manifest.mode}"
    framing = ("BOS + " if manifest.add_bos else "") + "text" + (" + EOS" if manifest.add_eos else "")
    yield (f"tokens        {manifest.total_tokens:,} corpus (incl. BOS/EOS)  padding {manifest.padding_tokens:,}  "
           f"dropped {manifest.dropped_tokens:,}  documents {framing}")
    yield (f"tokenizer     {manifest.tokenizer or '?'}  fingerprint {manifest.tokenizer_fingerprint}  vocab {manifest.vocab_size}  "
           f"bos {manifest.bos_token_id} eos {manifest.eos_token_id} pad {manifest.pad_token_id}")
    for source in manifest.sources:
        yield f"source        {source['path']}  {source['bytes']:,} bytes  sha256 {source['sha256'][:16]}..."
    for entry in manifest.shards[:5]:
        yield f"shard         {entry.name}  {entry.samples} samples  {entry.bytes:,} bytes  sha256 {entry.sha256[:16]}..."
    if len(manifest.shards) > 5:
        yield f"              ... {len(manifest.shards) - 5} more"


def decode_samples(base: str, manifest: Manifest, tokenizer_path: str, count: int) -> Iterator[str]:
    from rdp.data_pipeline.reader import ShardCache
    from rdp.data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

    if tokenizer_fingerprint(tokenizer_path) != manifest.tokenizer_fingerprint:
        raise DataError(f"tokenizer {tokenizer_path}: its fingerprint does not match the manifest's")
    tokenizer = load_tokenizer(tokenizer_path)
    cache = ShardCache(base, manifest, verify=False)
    for index in range(min(count, manifest.shards[0].samples)):
        tokens = [int(t) for t in cache.read(0, index) if t != manifest.pad_token_id]
        text = tokenizer.decode(tokens)
        yield f"sample {index}: {text[:300]!r}" + (f" ... ({len(text)} characters)" if len(text) > 300 else "")
    cache.close()


def inspect(base: str, verify: bool = False, samples: int = 3, tokenizer: str | None = None,
            print_fn=print) -> int:
    manifest = read_manifest(base)
    for line in describe(base, manifest):
        print_fn(line)
    tokenizer = tokenizer or manifest.tokenizer
    if samples and tokenizer and os.path.exists(tokenizer):
        for line in decode_samples(base, manifest, tokenizer, samples):
            print_fn(line)
    elif samples:
        print_fn("(no tokenizer file to decode samples with; pass --tokenizer)")
    if not verify:
        return 0
    bad = []
    for index, entry in enumerate(manifest.shards):
        reason = verify_shard(base, manifest, index)
        if reason:
            bad.append(entry.name)
            print_fn(f"BAD shard {entry.name}: {reason}")
    if bad:
        print_fn(f"verify: {len(bad)} of {len(manifest.shards)} shard(s) failed: {', '.join(bad)}")
        return 1
    print_fn(f"verify: all {len(manifest.shards)} shards match the manifest")
    return 0
