"""The manifest beside a shard directory, and where its shards live.

A manifest is the contract between the shard writer and the stream: per shard its name,
sample count, byte size, sha256 and member layout; the tokenizer that made the tokens;
seq_len and dtype. The stream never lists directories: it trusts (and checks) this file.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
TAR_BLOCK = 512
SHARD_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*(/[A-Za-z0-9_.][A-Za-z0-9_.-]*)*$")


class DataError(RuntimeError):
    """Bad data input; the message names the file / shard / field. `rdp` prints it as one line."""

    user_facing = True


@dataclass
class ShardEntry:
    name: str  # relative to the manifest's location
    samples: int
    bytes: int
    sha256: str
    # Every sample is one tar member of the same size, so member i starts at
    # first_offset + i * stride: the offset index is arithmetic and costs nothing to store.
    first_offset: int = 0
    stride: int = 0


@dataclass
class Manifest:
    seq_len: int
    dtype: str  # uint16 | uint32
    vocab_size: int
    tokenizer_fingerprint: str
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    mode: str  # keep-all | truncate
    total_tokens: int  # corpus tokens including the EOS after each document
    padding_tokens: int
    dropped_tokens: int
    tokenizer: str = ""  # the .model path given to the writer (inspect decodes with it)
    # how documents were framed: BOS before each one, EOS after it. Manifests written before
    # these fields existed hold EOS-only documents, hence the defaults.
    add_bos: bool = False
    add_eos: bool = True
    sources: list[dict[str, Any]] = field(default_factory=list)
    shards: list[ShardEntry] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "uint16" else 4

    def to_json(self) -> str:
        data = asdict(self)
        data["num_samples"] = self.num_samples
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object")
        data.pop("num_samples", None)
        try:
            shards = [ShardEntry(**s) for s in data.pop("shards")]
            manifest = cls(shards=shards, **data)
        except (KeyError, TypeError) as exc:
            raise DataError(f"{where}: missing or unknown field ({exc})") from None
        if manifest.format_version != FORMAT_VERSION:
            raise DataError(f"{where}: format_version {manifest.format_version}, this reader knows {FORMAT_VERSION}")
        if manifest.dtype not in ("uint16", "uint32"):
            raise DataError(f"{where}: field 'dtype' must be uint16 or uint32, got {manifest.dtype!r}")
        for shard in manifest.shards:
            if not SHARD_NAME.match(str(shard.name)) or any(part in (".", "..") for part in str(shard.name).split("/")):
                # a name goes into paths, URLs and `pipe:` shell commands: plain relative words only
                raise DataError(f"{where}: shard name {shard.name!r} is not a plain relative path of letters, "
                                f"digits and _ . - (no leading '-', no '..')")
            if shard.samples <= 0 or shard.stride < TAR_BLOCK or shard.first_offset % TAR_BLOCK:
                raise DataError(f"{where}: shard {shard.name}: bad samples/stride/first_offset entry")
        return manifest


def sample_member_bytes(seq_len: int, itemsize: int) -> int:
    return (seq_len + 1) * itemsize


def member_stride(data_bytes: int) -> int:
    """A tar member = one 512-byte ustar header + data rounded up to whole blocks."""
    return TAR_BLOCK + -(-data_bytes // TAR_BLOCK) * TAR_BLOCK


def sample_key(shard_index: int, sample_index: int) -> str:
    return f"{shard_index:06d}_{sample_index:09d}"


# ---- locations: local directories, file://, http(s)://, and pipe: commands ----

def is_local(location: str) -> bool:
    return "://" not in location and not location.startswith("pipe:") or location.startswith("file://")


def local_path(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def join_location(base: str, name: str) -> str:
    """Where `name` (a shard or the manifest) lives under a source location.

    `base` is a directory or URL prefix, or a `pipe:` command with `{}` standing for the file
    name (e.g. `pipe:aws s3 cp s3://bucket/shards/{} -`)."""
    if "{}" in base:
        return base.replace("{}", name)
    if base.startswith("pipe:"):
        return f"{base.rstrip()} {name}" if base.endswith(" ") else base.rstrip("/") + "/" + name
    return base.rstrip("/") + "/" + name


def read_manifest(base: str) -> Manifest:
    location = join_location(base, MANIFEST_NAME)
    if is_local(location):
        path = local_path(location)
        if not os.path.exists(path):
            raise DataError(f"{location}: no manifest here (is {base!r} a shard directory written by `rdp data shard`?)")
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    else:
        text = read_remote(location, what="manifest").decode("utf-8")
    return Manifest.from_json(text, location)


# An http(s) transfer slower than 1 KiB/s for this long is abandoned: a stalled server gives
# an error naming the shard, never a hang.
STALL_SECONDS = 60
HTTP_RETRIES = 3


def read_remote(location: str, what: str) -> bytes:
    """All bytes behind a URL or pipe: command, opened by webdataset's gopen (via curl for http)."""
    import shlex

    from webdataset.gopen import gopen

    opened = location
    if location.startswith(("http://", "https://")):
        opened = (f"pipe:curl -f -s -S -L --connect-timeout 30 --retry {HTTP_RETRIES} --speed-limit 1024 "
                  f"--speed-time {STALL_SECONDS} {shlex.quote(location)}")
    try:
        stream = gopen(opened, "rb")
        try:
            data = stream.read()
        finally:
            stream.close()  # a pipe's close checks the command's exit status
    except Exception as exc:  # noqa: BLE001 - any transport failure names the file
        raise DataError(f"{what} {location}: cannot be read ({exc})") from None
    return data
