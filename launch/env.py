"""Who am I, how many are we, where do we meet: the process environment of whichever
launcher started this process.

Checked in this order, the first that applies wins:
  1. torchrun / the deepspeed launcher / anything torch-style: RANK, WORLD_SIZE, LOCAL_RANK,
     MASTER_ADDR, MASTER_PORT already set.
  2. mpirun (Open MPI, MPICH, Intel MPI): rank and size from the MPI environment; rank 0
     picks its address and a free port and broadcasts them through mpi4py.
  3. srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID inside a job step; the first host of
     the node list is the master and the port is derived from the job id, so every task
     computes the same rendezvous without talking.
  4. a single process.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torch | mpi | slurm | single

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def export(self) -> None:
        """Publish as torch-style variables, the form torch.distributed and DeepSpeed read."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK=str(self.local_rank), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))


class LaunchError(RuntimeError):
    user_facing = True


def _int_var(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r} is not an integer") from None


def routable_address() -> str:
    """This host's address as other nodes reach it. Debian maps the host name to 127.0.1.1, so
    a loopback answer is replaced by the address of the interface the routing table would use
    to leave the host (a UDP connect sends nothing)."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    if not address.startswith("127."):
        return address
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
    except OSError:
        return address


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: "gpu[01-03,07],login1" ->
    [gpu01, gpu02, gpu03, gpu07, login1] (zero padding kept, as scontrol does)."""
    hosts: list[str] = []
    # top-level commas separate hosts; commas inside brackets separate ranges
    for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        hosts.extend(_expand_host(part))
    return hosts


def _expand_host(pattern: str) -> list[str]:
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)", pattern)
    if not match:
        return [pattern]
    prefix, ranges, rest = match.groups()
    heads = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            heads.append(f"{prefix}{i:0{len(lo)}d}")
    return [head + tail for head in heads for tail in _expand_host(rest)]


def slurm_port(job_id: str | int) -> int:
    # every task derives the same port from the job id; jobs sharing a node get different ones
    return 15000 + int(job_id) % 20000


def _from_torch(env) -> ProcessEnv:
    world = _int_var(env, "WORLD_SIZE")
    rank = _int_var(env, "RANK")
    local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise LaunchError("RANK and WORLD_SIZE are set but MASTER_ADDR / MASTER_PORT are not; "
                          "launch with torchrun or set both")
    return ProcessEnv(rank, world, local_rank, env.get("MASTER_ADDR", "127.0.0.1"),
                      int(env.get("MASTER_PORT", DEFAULT_PORT)), "torch")


_MPI_VARS = (  # (rank, size, local rank) as each MPI flavour names them
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
)


def _mpi_flavour(env):
    for names in _MPI_VARS:
        if names[0] in env and names[1] in env:
            return names
    return None


def _from_mpi(env, names) -> ProcessEnv:
    rank_var, size_var, local_var = names
    rank, world = _int_var(env, rank_var), _int_var(env, size_var)
    local_rank = _int_var(env, local_var) if local_var in env else 0
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError("launched by mpirun but mpi4py is not installed (pip install mpi4py)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world:
        raise LaunchError(f"{size_var}={world} but MPI.COMM_WORLD has {comm.Get_size()} processes")
    address = None
    if comm.Get_rank() == 0:
        host = env.get("MASTER_ADDR") or routable_address()
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port()
        address = (host, port)
    host, port = comm.bcast(address, root=0)
    return ProcessEnv(rank, world, local_rank, host, port, "mpi")


def _in_srun_step(env) -> bool:
    # inside the batch script itself SLURM_PROCID is 0 and SLURM_NTASKS counts the whole
    # allocation, yet only one process runs: only an srun step says how many tasks it started
    return "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env)


def _from_slurm(env) -> ProcessEnv:
    rank = _int_var(env, "SLURM_PROCID")
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    world = _int_var(env, size_var) if size_var in env else 1
    local_rank = _int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    if "MASTER_ADDR" in env:
        master = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError("srun step without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST: cannot find the master host")
        master = expand_nodelist(nodelist)[0]
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    else:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        port = slurm_port(job) if job else DEFAULT_PORT
    return ProcessEnv(rank, world, local_rank, master, port, "slurm")


def discover(env=None) -> ProcessEnv:
    """The process environment of this process (see the module docstring for the order)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        found = _from_torch(env)
    elif (names := _mpi_flavour(env)) is not None:
        found = _from_mpi(env, names)
    elif _in_srun_step(env):
        found = _from_slurm(env)
    else:
        found = ProcessEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                           int(env.get("MASTER_PORT", 0)) or free_port(), "single")
    if not 0 <= found.rank < found.world_size:
        raise LaunchError(f"{found.launcher} launch: rank {found.rank} is outside world size {found.world_size}")
    return found
