"""torch.distributed and megatron-core parallel_state, set up from whatever launched us.

    ctx = init_distributed(tensor_parallel=2, backend="auto")
    ... build the model on megatron layers, hand `MegatronMPU()` to DeepSpeed as its mpu ...

A single process still gets a (one-rank) process group, so training has one code path.
Calling init_distributed again in the same process keeps the process group and rebuilds the
parallel_state groups only when the TP degree changes (tests run several layouts in one
launch to pay megatron's import once).
"""
from __future__ import annotations

import atexit
import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rdp.launch.env import LaunchError, ProcessEnv, discover


@dataclass(frozen=True)
class ParallelContext:
    env: ProcessEnv
    backend: str
    device: torch.device
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def resolve_backend(choice: str = "auto") -> str:
    if choice == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if choice == "nccl" and not torch.cuda.is_available():
        raise LaunchError("parallel.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    if choice not in ("nccl", "gloo"):
        raise LaunchError(f"parallel.backend must be auto, nccl or gloo, got {choice!r}")
    return choice


def init_distributed(tensor_parallel: int = 1, backend: str = "auto", timeout_minutes: int = 30) -> ParallelContext:
    from megatron.core import parallel_state

    if dist.is_initialized():
        env = ProcessEnv(dist.get_rank(), dist.get_world_size(), _current_local_rank(), "", 0, "existing")
        backend = dist.get_backend()
    else:
        env = discover()
        env.export()
        backend = resolve_backend(backend)
        if backend == "nccl":
            # with one GPU bound per task (srun --gpus-per-task=1) every task sees device 0
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        atexit.register(shutdown)
    if env.world_size % tensor_parallel != 0:
        from rdp.pretrain.config import ConfigError

        raise ConfigError(f"config field 'parallel.tensor_parallel': {tensor_parallel} does not divide the "
                          f"{env.world_size} launched processes")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        # gloo side groups are only for CPU-side collectives next to NCCL; with gloo as the
        # main backend they would be duplicates
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 create_gloo_process_groups=backend == "nccl",
                                                 distributed_timeout_minutes=timeout_minutes)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return ParallelContext(env, backend, device, tensor_parallel, parallel_state.get_tensor_model_parallel_rank(),
                           parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank())


def _current_local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", 0))


def shutdown() -> None:
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """megatron-core's parallel_state under the names DeepSpeed asks its `mpu` for
    (model parallel = tensor parallel here: no pipeline stages)."""

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.ps.get_data_parallel_group())

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0
