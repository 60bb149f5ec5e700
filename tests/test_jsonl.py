"""The shared JSON-lines reader and the three readers built on it."""
from __future__ import annotations

import gzip
import json
import re

import pytest

from rdp.data_pipeline.jsonl import read_jsonl
from rdp.data_pipeline.manifest import DataError

ROWS = [{"text": "a", "n": [1, 2]}, [3, "x"], "plain", {"nested": {"k": None}}]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_exact_objects_and_editor_line_numbers(tmp_path, name):
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), "   \t", json.dumps(ROWS[2]), json.dumps(ROWS[3]), ""]
    path = tmp_path / name
    text = "\n".join(lines) + "\n"
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, ROWS[0]), (3, ROWS[1]), (5, ROWS[2]), (6, ROWS[3])]


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"a": 1}\n\n{"a": oops}\n{"a": 2}\n')
    reader = read_jsonl(path)
    assert next(reader) == (1, {"a": 1})
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: not valid JSON \(Expecting value\)$"):
        next(reader)
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not UTF-8 text \(invalid start byte at byte 7\)$"):
        list(read_jsonl(path))


def _task_dir(path):
    from rdp.data_pipeline.task_dir import read_split

    return read_split(path)


def _corpus(path):
    from rdp.data_pipeline.corpus import read_documents

    return list(read_documents(str(path)))


def _gsm8k(path):
    from rdp.evals.gsm8k import write_local_tasks

    return write_local_tasks(path, path.parent / "tasks")


@pytest.mark.parametrize("read", [_task_dir, _corpus, _gsm8k])
def test_every_caller_reports_the_same_line(tmp_path, read):
    """Task splits, raw corpora and local GSM8K files fail alike: a DataError (one line at the
    CLI) naming the file and line, not a traceback."""
    path = tmp_path / "test.jsonl"
    good = {"input": [1], "labels": [1], "text": "t", "question": "q", "answer": "#### 1"}
    path.write_text(json.dumps(good) + "\n\n" + '{"input": [1,\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: not valid JSON \("):
        read(path)
