"""Configs for reasoning tasks: model.vocab_size, data.seq_len and model.max_seq_len come
from the task (largest id + 1, longest example of any split) unless the preset or an
override sets them, so `rdp reasoning DIR` fits any task directory without editing a YAML."""
from __future__ import annotations

from omegaconf import OmegaConf

from rdp.pretrain.config import RunConfig, load_config, resolve_preset

SIZED = ("model.vocab_size", "data.seq_len", "model.max_seq_len")
# a task has no BOS/EOS/PAD of its own: unless set, these unused ids point at token 0
SPECIAL_IDS = ("model.bos_token_id", "model.eos_token_id", "model.end_turn_token_id", "model.pad_token_id")


def _given(preset, overrides: list[str]) -> dict[str, str]:
    """Keys the preset or an override sets, with their values as written."""
    given = {}
    if preset is not None:
        try:
            layer = OmegaConf.load(resolve_preset(preset))
        except Exception:  # noqa: BLE001 - load_config reports a broken preset, naming file and line
            layer = OmegaConf.create({})
        for key in ("data.source", *SIZED, *SPECIAL_IDS):
            value = OmegaConf.select(layer, key)
            if value is not None:
                given[key] = str(value)
    for item in overrides:
        if "=" in item:
            key, value = item.split("=", 1)
            given[key.strip()] = value.strip()
    return given


def load_task_config(preset, overrides: list[str] | None = None) -> RunConfig:
    """load_config, sized from the task when data.source names one (task:NAME_OR_DIR)."""
    from rdp.data_pipeline.tasks import load_task, task_of_source

    overrides = list(overrides or [])
    given = _given(preset, overrides)
    spec = task_of_source(given.get("data.source", ""))
    if spec is None:
        return load_config(preset, overrides)
    task = load_task(spec)
    sized = [f"{key}=0" for key in SPECIAL_IDS if key not in given]
    if "model.vocab_size" not in given:
        sized.append(f"model.vocab_size={task.vocab_size}")
    if "data.seq_len" not in given:
        sized.append(f"data.seq_len={task.seq_len}")
    if "model.max_seq_len" not in given:
        seq_len = int(given["data.seq_len"]) if "data.seq_len" in given else task.seq_len
        sized.append(f"model.max_seq_len={max(seq_len, task.seq_len)}")
    return load_config(preset, sized + overrides)
