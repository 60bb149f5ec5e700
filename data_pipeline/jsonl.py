"""The one JSON-lines reader: task directories, raw corpora and local GSM8K files all go
through it, so a broken line reads the same everywhere: `path:line: not valid JSON (...)`."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from rdp.data_pipeline.manifest import DataError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, object) for every non-blank line; line numbers count from 1 and
    include blank lines, so they match what an editor shows. `.gz` files are decompressed."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:  # decoded per line so a bad byte is reported at its line, not as a traceback
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            yield number, record
