"""Whether a checkpoint can continue in this run, said in one line before anything is loaded.

DeepSpeed, left to find out itself, answers a changed model with a size-mismatch traceback
per tensor, and a changed layout with an assertion deep inside its ZeRO code.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rdp.pretrain.checkpoint import CheckpointError
from rdp.pretrain.config import ModelConfig, RunConfig


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from rdp.pretrain.model import build_model

    return {name: tuple(p.shape) for name, p in build_model(cfg, device="meta").named_parameters()}


def check_model_shape(directory: Path, saved: dict, config: RunConfig) -> None:
    """The checkpoint's model must have this run's parameter shapes; name the fields that differ."""
    try:  # the model section alone, unvalidated: its other sections (objective, data) do not shape parameters
        saved_model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved.get("model", {})))
    except OmegaConfBaseException as exc:
        raise CheckpointError(f"{directory}: its model config does not load (field "
                              f"{getattr(exc, 'full_key', None)!r}: {str(exc).strip().splitlines()[0]})") from None
    if parameter_shapes(saved_model) == parameter_shapes(config.model):
        return
    differ = [f"model.{f.name}={getattr(saved_model, f.name)!r} (this run: {getattr(config.model, f.name)!r})"
              for f in fields(ModelConfig) if getattr(saved_model, f.name) != getattr(config.model, f.name)]
    raise CheckpointError(f"{directory}: written for another model shape: {', '.join(differ)}; resume with the "
                          f"checkpoint's model settings, or start a new run in another train.run_dir")


def check_layout(directory: Path, state: dict, config: RunConfig, tp_size: int, dp_size: int) -> bool:
    """TP degree, ZeRO stage and precision must match; returns whether the ZeRO-1/2 optimizer
    state must be re-split over another number of data-parallel ranks."""
    p = config.parallel
    if state["tensor_parallel"] != tp_size:
        raise CheckpointError(f"{directory}: written with parallel.tensor_parallel={state['tensor_parallel']}, "
                              f"this run has {tp_size}; resume with the same TP degree")
    if state["zero_stage"] != p.zero_stage:
        raise CheckpointError(f"{directory}: written with parallel.zero_stage={state['zero_stage']}, "
                              f"this run has {p.zero_stage}; resume with the same ZeRO stage")
    if p.zero_stage == 3 and state["data_parallel"] != dp_size:
        raise CheckpointError(f"{directory}: ZeRO-3 state of {state['data_parallel']} data-parallel ranks cannot "
                              f"be loaded on {dp_size}; use ZeRO 0-2 to change the DP size")
    if state["precision"] != config.train.precision:
        raise CheckpointError(f"{directory}: written with train.precision={state['precision']}, "
                              f"this run has {config.train.precision}")
    resharding = state["data_parallel"] != dp_size
    if resharding and p.zero_stage == 0:
        return False  # every rank holds the whole optimizer state: nothing to re-split
    return resharding


# DeepSpeed's ZeRO-1/2 optimizer can merge the partitions of an elastic checkpoint and re-split
# them, but only through these private methods (pyproject pins the DeepSpeed versions tested)
ELASTIC_RESTORE = ("_load_global_state", "_restore_elastic_base_optimizer_state",
                   "_restore_from_elastic_fp32_weights", "_link_all_hp_params")


def reshard_zero_state(engine, directory: Path, tag: str, saved_dp: int) -> None:
    """Load the fp32 master weights and Adam moments of `saved_dp` ZeRO-1/2 partitions into
    this run's partitions (another number of data-parallel ranks)."""
    import deepspeed

    optimizer = engine.optimizer
    missing = [name for name in ELASTIC_RESTORE if not hasattr(optimizer, name)]
    if missing:
        raise CheckpointError(f"{directory}: re-splitting ZeRO state over another data-parallel size needs "
                              f"{type(optimizer).__name__}.{missing[0]}, which DeepSpeed {deepspeed.__version__} "
                              f"lacks (tested: 0.19.8); resume on {saved_dp} data-parallel ranks instead")
    saved_partitions = engine._get_all_zero_checkpoints(str(directory), tag)
    if saved_partitions is None or len(saved_partitions) != saved_dp:
        raise CheckpointError(f"{directory}: expected {saved_dp} ZeRO partitions")
    optimizer._load_global_state(saved_partitions[0])
    optimizer._restore_elastic_base_optimizer_state(saved_partitions)
    optimizer._restore_from_elastic_fp32_weights(saved_partitions)
    optimizer._link_all_hp_params()
