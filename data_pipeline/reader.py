"""Random access to samples of one WebDataset shard, with every check that names the shard.

Local shards (paths, file://) are opened with webdataset's gopen and read by seeking to
first_offset + i * stride: resuming anywhere costs one seek, never a replay. Remote shards
(http(s)://, pipe: commands, anything gopen opens) are fetched whole once through gopen,
then read the same way from memory. With verify, a shard's sha256 is checked against the
manifest the first time this process opens it.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict

import numpy as np

from rdp.data_pipeline.manifest import (TAR_BLOCK, DataError, Manifest, ShardEntry, is_local, join_location,
                                    local_path, read_remote, sample_key, sample_member_bytes)


def parse_member_header(block: bytes) -> tuple[str, int]:
    """Name and size of a ustar member header, checksum verified. tarfile.TarInfo.frombuf does
    the same and more, at ~50x the cost per sample; webdataset's writer only emits these fields."""
    if len(block) != TAR_BLOCK or block[257:262] != b"ustar":
        raise ValueError("not a ustar header")
    try:
        size = int(block[124:136].rstrip(b"\0 ") or b"0", 8)
        stored = int(block[148:156].rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError("unreadable size or checksum field") from None
    if stored != sum(block[:148]) + sum(block[156:]) + 8 * 0x20:
        raise ValueError("bad checksum")
    return block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), size


class OpenShard:
    def __init__(self, location: str, entry: ShardEntry, shard_index: int, manifest: Manifest, verify: bool):
        self.location, self.entry, self.shard_index = location, entry, shard_index
        self.dtype, self.seq_len, self.vocab_size = manifest.dtype, manifest.seq_len, manifest.vocab_size
        self.data_bytes = sample_member_bytes(manifest.seq_len, manifest.itemsize)
        if is_local(location):
            from webdataset.gopen import gopen

            path = local_path(location)
            if not os.path.exists(path):
                raise DataError(f"shard {location}: missing (listed in the manifest)")
            size = os.path.getsize(path)
            self._check_size(size)
            self.file = gopen(location, "rb")
            if verify:
                digest = hashlib.sha256()
                while block := self.file.read(1 << 22):
                    digest.update(block)
                self._check_digest(digest.hexdigest())
        else:
            data = read_remote(location, what="shard")
            self._check_size(len(data))
            if verify:
                self._check_digest(hashlib.sha256(data).hexdigest())
            self.file = io.BytesIO(data)

    def _check_size(self, size: int) -> None:
        if size != self.entry.bytes:
            kind = "truncated" if size < self.entry.bytes else "larger than listed"
            raise DataError(f"shard {self.location}: {kind}: {size} bytes, the manifest says {self.entry.bytes}")

    def _check_digest(self, digest: str) -> None:
        if digest != self.entry.sha256:
            raise DataError(f"shard {self.location}: sha256 {digest[:16]}... does not match the manifest's "
                            f"{self.entry.sha256[:16]}... (corrupt or replaced)")

    def read(self, index: int) -> np.ndarray:
        """Sample `index` of this shard: seq_len+1 token ids as int64."""
        if not 0 <= index < self.entry.samples:
            raise IndexError(f"shard {self.location}: sample {index} of {self.entry.samples}")
        self.file.seek(self.entry.first_offset + index * self.entry.stride)
        raw = self.file.read(self.entry.stride)
        where = f"shard {self.location}, sample {index}"
        if len(raw) < TAR_BLOCK:
            raise DataError(f"{where}: truncated tar (no member header)")
        try:
            name, size = parse_member_header(raw[:TAR_BLOCK])
        except ValueError as exc:
            raise DataError(f"{where}: corrupt tar header ({exc})") from None
        key, _, extension = name.partition(".")
        if key != sample_key(self.shard_index, index):
            raise DataError(f"{where}: member {name!r} where {sample_key(self.shard_index, index)} "
                            f"was expected (shard does not match its manifest layout)")
        if extension != self.dtype:
            raise DataError(f"{where}: member {name!r} has dtype {extension!r}, the manifest says {self.dtype}")
        if size != self.data_bytes:
            raise DataError(f"{where}: {size} bytes of tokens, expected {self.data_bytes} "
                            f"(seq_len {self.seq_len} + 1 tokens of {self.dtype})")
        payload = raw[TAR_BLOCK:TAR_BLOCK + size]
        if len(payload) != size:
            raise DataError(f"{where}: truncated tar (member data cut short)")
        tokens = np.frombuffer(payload, dtype="<u2" if self.dtype == "uint16" else "<u4").astype(np.int64)
        if tokens.max(initial=0) >= self.vocab_size:
            raise DataError(f"{where}: token id {int(tokens.max())} >= vocab_size {self.vocab_size}")
        return tokens

    def close(self) -> None:
        self.file.close()


class ShardCache:
    """A few open shards per process (the stream moves through shards in order)."""

    def __init__(self, base: str, manifest: Manifest, verify: bool, capacity: int = 4):
        self.base, self.manifest, self.verify, self.capacity = base, manifest, verify, capacity
        self._open: OrderedDict[int, OpenShard] = OrderedDict()

    def get(self, shard_index: int) -> OpenShard:
        shard = self._open.get(shard_index)
        if shard is None:
            entry = self.manifest.shards[shard_index]
            shard = OpenShard(join_location(self.base, entry.name), entry, self._key_index(entry, shard_index),
                              self.manifest, self.verify)
            self._open[shard_index] = shard
            while len(self._open) > self.capacity:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(shard_index)
        return shard

    @staticmethod
    def _key_index(entry: ShardEntry, position_in_manifest: int) -> int:
        # keys carry the shard's own number (shard-000012.tar holds 000012_*), which is also
        # its position in the manifest for everything `rdp data shard` writes
        stem = entry.name.rsplit("/", 1)[-1]
        digits = stem.removeprefix("shard-").removesuffix(".tar")
        return int(digits) if digits.isdigit() else position_in_manifest

    def read(self, shard_index: int, sample_index: int) -> np.ndarray:
        return self.get(shard_index).read(sample_index)

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()
