"""Raw corpora: txt / jsonl (plain or .gz) / parquet files named by paths or globs.

A document is one txt file, one jsonl line's text field, or one parquet row's text column.
Files are read in sorted order of their expanded paths, so the document sequence (and with
it every shard byte) is a pure function of the inputs.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
from typing import Iterator

from rdp.data_pipeline.jsonl import read_jsonl
from rdp.data_pipeline.manifest import DataError

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz", ".ndjson", ".parquet")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Paths and globs -> a sorted, de-duplicated list of files; directories are walked."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"input {pattern!r}: no file matches")
        for match in matches:
            if os.path.isdir(match):
                files.extend(sorted(os.path.join(root, name) for root, _, names in os.walk(match)
                                    for name in names if name.endswith(SUFFIXES)))
            elif os.path.exists(match):
                files.append(match)
            else:
                raise DataError(f"input {match!r}: no such file")
    unique = sorted(set(files))
    for path in unique:
        if not path.endswith(SUFFIXES):
            raise DataError(f"input {path!r}: unknown format (expected one of {', '.join(SUFFIXES)})")
    if not unique:
        raise DataError(f"inputs {patterns}: no corpus files found (accepted extensions: {', '.join(SUFFIXES)})")
    return unique


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_documents(path: str, text_field: str = "text") -> Iterator[str]:
    try:
        if path.endswith((".txt", ".txt.gz")):
            with _open_text(path) as f:
                text = f.read()
            if text:
                yield text
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            if text_field not in parquet.schema_arrow.names:
                raise DataError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
            for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text:
                        yield text
        else:
            for line_number, record in read_jsonl(path):
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{path}:{line_number}: no string field {text_field!r}")
                if record[text_field]:
                    yield record[text_field]
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None


def iter_corpus(files: list[str], text_field: str = "text") -> Iterator[str]:
    for path in files:
        yield from read_documents(path, text_field)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
