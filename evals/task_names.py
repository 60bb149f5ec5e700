"""Which lm-eval tasks a sweep names, checked before any tokenizer or model is loaded.

A task is an lm-eval task name (built in, or defined under an `--include_path` directory),
a task YAML file, or a local GSM8K task. Indexing lm-eval's ~14,000 built-in task files
takes from seconds to a minute, so a name that occurs in no built-in YAML file at all is
rejected after a plain text scan; any other name is looked up in lm-eval's real index.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

YAML_SUFFIXES = (".yaml", ".yml")


class UnknownTask(ValueError):
    user_facing = True


@dataclass
class TaskPlan:
    names: dict[str, str] = field(default_factory=dict)  # what the user wrote -> lm-eval's task name
    include_paths: list[str] = field(default_factory=list)
    needs_builtin: bool = False  # some task is one of lm-eval's own: index them


def is_task_file(task: str) -> bool:
    return task.endswith(YAML_SUFFIXES)


def _task_in_file(path: Path) -> str:
    if not path.is_file():
        raise UnknownTask(f"task file {path}: no such file")
    from lm_eval.tasks._index import TaskIndex

    try:
        entry = TaskIndex.entry_from_path(path)
    except Exception as exc:  # noqa: BLE001 - YAML and shape errors both mean an unusable file
        raise UnknownTask(f"task file {path}: not an lm-eval task config ({exc})") from None
    if entry is None:
        raise UnknownTask(f"task file {path}: has no 'task:' or 'group:' name")
    return entry.name


@lru_cache(maxsize=1)
def _builtin_yaml_text() -> bytes:
    import lm_eval

    chunks = []
    for directory, _, files in os.walk(Path(lm_eval.__file__).parent / "tasks"):
        for name in files:
            if name.endswith(YAML_SUFFIXES):
                with open(os.path.join(directory, name), "rb") as handle:
                    chunks.append(handle.read())
    return b"\n".join(chunks)


def surely_not_builtin(name: str) -> bool:
    """True when `name` occurs in no built-in task file: every name lm-eval indexes is
    written in one (a task's `task:`, a group's `group:`, a `tag:`)."""
    return name.encode() not in _builtin_yaml_text()


def _included_names(include_paths: list[str]) -> set[str]:
    if not include_paths:
        return set()
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=include_paths, include_defaults=False).all_tasks)


def plan_tasks(tasks: list[str], include_paths: list[str], local: dict[str, str],
               builtin_names: Callable[[list[str]], set[str]]) -> TaskPlan:
    """Resolve every lm-eval task or raise UnknownTask naming it. `local` maps names rdp
    rewrote (the GSM8K tasks on local files) to theirs; `builtin_names(include_paths)` gives
    lm-eval's whole index and is called only when some name needs it."""
    plan = TaskPlan(include_paths=[str(p) for p in include_paths])
    for path in include_paths:
        if not Path(path).is_dir():
            raise UnknownTask(f"--include_path {path}: no such directory")
    included: Optional[set[str]] = None
    unresolved = []
    for task in tasks:
        if task in local:
            plan.names[task] = local[task]
        elif is_task_file(task):
            plan.names[task] = _task_in_file(Path(task))
            parent = str(Path(task).resolve().parent)  # its `include:` files resolve from there
            if parent not in plan.include_paths:
                plan.include_paths.append(parent)
        else:
            if included is None:
                included = _included_names(include_paths)
            if task in included:
                plan.names[task] = task
            else:
                unresolved.append(task)
    for task in unresolved:
        if surely_not_builtin(task) or task not in builtin_names(plan.include_paths):
            where = " or a task in --include_path" if include_paths else ""
            raise UnknownTask(f"unknown task {task!r}: not an lm-eval task{where}, a task YAML file, humaneval or a "
                              f"reasoning task (see `lm_eval ls tasks`)")
        plan.names[task] = task
        plan.needs_builtin = True
    return plan
