"""Weights & Biases as a third home for the per-step metrics, beside metrics.jsonl and
TensorBoard, when the config names a project (`train.wandb_project`).

`train.wandb_mode=offline` writes the run under RUN_DIR/wandb/ without any network (upload it
later with `wandb sync RUN_DIR/wandb/offline-run-*`); `online` streams to the W&B server. The
W&B run id is kept in RUN_DIR/wandb/run_id, so a resumed or requeued job continues the same
W&B run instead of starting a new one.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional

from rdp.pretrain.config import ConfigError, RunConfig, to_dict

RUN_ID_FILE = "run_id"


def check_wandb(config: RunConfig) -> None:
    """Fail before start-up when W&B is asked for but cannot be used."""
    if not config.train.wandb_project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("config field 'train.wandb_project': set, but the wandb package is not installed "
                          "(pip install wandb)") from None


class WandbSink:
    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, config: RunConfig, run_dir: Path) -> Optional["WandbSink"]:
        """A sink for this run, or None when the config does not ask for W&B."""
        t = config.train
        if not t.wandb_project:
            return None
        import wandb

        directory = run_dir / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        run = wandb.init(project=t.wandb_project, entity=t.wandb_entity or None, mode=t.wandb_mode,
                         name=t.wandb_run_name or run_dir.resolve().name, id=run_id, resume="allow",
                         dir=str(run_dir), config=to_dict(config),
                         # no stdout/stderr capture: the progress bar and the run's own lines stay as they are
                         settings=wandb.Settings(console="off", silent=True))
        return cls(run)

    def log(self, record: dict, step: int) -> None:
        """The numeric fields of one step's metrics record (the same as metrics.jsonl), under train/."""
        values = {f"train/{key}": int(value) if isinstance(value, bool) else value
                  for key, value in record.items() if isinstance(value, (int, float)) and key != "step"}
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
