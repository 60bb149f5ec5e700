"""Checkpoint layout and loading.

    RUN_DIR/checkpoints/step_000040/   model.safetensors (consolidated full weights),
                                       trainer_state.pt, config.yaml
    RUN_DIR/checkpoints/latest         name of the newest complete checkpoint
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretrain.config import RunConfig, load_config, to_yaml
from pretrain.model import RecurrentDepthModel, model_from_state_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
LATEST_POINTER = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir or one checkpoint dir -> the checkpoint dir."""
    path = Path(path)
    if (path / WEIGHTS_FILE).exists():
        return path
    for candidate in (path / "checkpoints", path):
        pointer = candidate / LATEST_POINTER
        if pointer.exists():
            return candidate / pointer.read_text().strip()
    raise FileNotFoundError(f"{path}: not a checkpoint, checkpoints dir or run dir "
                            f"(no {WEIGHTS_FILE} and no checkpoints/{LATEST_POINTER})")


def save_model_weights(model: RecurrentDepthModel, directory: Path, config: RunConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(to_yaml(config))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> RecurrentDepthModel:
    """A ready single-device model from a training checkpoint of this project."""
    directory = resolve_checkpoint(path)
    config = load_config(directory / CONFIG_FILE)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    return model_from_state_dict(config.model, state, device).eval()
