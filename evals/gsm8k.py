"""GSM8K for offline clusters: lm-eval's own `gsm8k` / `gsm8k_cot` task definitions
(prompt, few-shot, stop sequences, answer filters and metrics unchanged), pointed at local
GSM8K-format jsonl files ({"question": ..., "answer": "... #### 42"}) through lm-eval's
`dataset_path: json` loader.

`--gsm8k-path` is a directory holding test.jsonl (and optionally train.jsonl, the few-shot
pool of plain `gsm8k`), or a single jsonl file used as the test split.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from rdp.data_pipeline.jsonl import read_jsonl
from rdp.data_pipeline.manifest import DataError

LOCAL_SUFFIX = "_local"
UPSTREAM_FILES = {"gsm8k": "gsm8k.yaml", "gsm8k_cot": "gsm8k-cot.yaml"}


def _upstream_config(task: str) -> dict:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / UPSTREAM_FILES[task]
    return yaml.safe_load(path.read_text())


def _check_jsonl(path: Path) -> None:
    """DataError (one line at the CLI, naming file:line) before lm-eval's loader sees the file."""
    for number, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: GSM8K rows are JSON objects, got {type(row).__name__}")
        missing = {"question", "answer"} - set(row)
        if missing:
            raise DataError(f"{path}:{number}: GSM8K rows need 'question' and 'answer', missing {sorted(missing)}")


def write_local_tasks(data_path: str | Path, out_dir: str | Path) -> dict[str, str]:
    """Write task YAMLs for the local data; returns {"gsm8k": "gsm8k_local", ...} and the
    caller passes `out_dir` to lm-eval's TaskManager(include_path=...)."""
    data_path = Path(data_path)
    if data_path.is_dir():
        test, train = data_path / "test.jsonl", data_path / "train.jsonl"
    else:
        test, train = data_path, data_path.parent / "train.jsonl"
    if not test.is_file():
        raise FileNotFoundError(f"--gsm8k-path {data_path}: no test.jsonl there")
    _check_jsonl(test)
    files = {"test": str(test.resolve())}
    if train.is_file() and train != test:
        _check_jsonl(train)
        files["train"] = str(train.resolve())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in UPSTREAM_FILES:
        config = _upstream_config(task)
        config.update(task=task + LOCAL_SUFFIX, dataset_path="json", dataset_kwargs={"data_files": files})
        config.pop("dataset_name", None)
        config.pop("tag", None)  # keep the upstream tag groups pointing at the upstream tasks
        if "train" not in files:
            config.pop("training_split", None)
            if config.get("fewshot_split") == "train":  # no pool for few-shot examples
                config.pop("fewshot_split")
                config["num_fewshot"] = 0
        (out_dir / f"{task}{LOCAL_SUFFIX}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names[task] = task + LOCAL_SUFFIX
    return names
