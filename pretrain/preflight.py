"""Checks a run makes before it starts any process group, model or engine, so a wrong path or
a backend this machine cannot run is one line naming the field, seconds after launch."""
from __future__ import annotations

from rdp.data_pipeline import check_data_files
from rdp.kernels import resolve_backend
from rdp.pretrain.config import RunConfig
from rdp.pretrain.wandb_sink import check_wandb


def preflight(config: RunConfig) -> None:
    check_data_files(config.data)
    resolve_backend(config.model.kernels)
    check_wandb(config)
