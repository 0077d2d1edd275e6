"""Where ranks come from: torchrun, Slurm (`srun`), MPI (`mpirun`) or a single process.

`detect_launch()` reads the launcher's environment variables, `init_distributed()` turns them into a
torch.distributed process group (nccl on GPUs, gloo on CPU ranks) and megatron-core's parallel state.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
import time
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_qwen.errors import ConfigError
from megatron_qwen.platform.cpu import apply_cpu_harness

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchInfo:
    """Rank layout of this process as the launcher described it."""

    launcher: str  # "torchrun", "slurm", "mpi" or "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _int_env(env, *names):
    for name in names:
        if env.get(name) not in (None, ""):
            return int(env[name])
    return None


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as ``gpu[01-03,07],login1`` into host names.

    Implemented here (rather than calling ``scontrol show hostnames``) so it works inside
    containers that do not ship the Slurm client.
    """
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def _slurm_step_layout(env) -> tuple[int, int, str, int]:
    """(local rank, tasks on this node, master address, master port) of a task of an ``srun`` step."""
    local_rank = _int_env(env, "SLURM_LOCALID") or 0
    # SLURM_TASKS_PER_NODE looks like "4(x2)" or "4,3": this node's count is the first number.
    per_node = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
    nodes = expand_slurm_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    return local_rank, int(per_node.group()) if per_node else 1, nodes[0] if nodes else "127.0.0.1", port


def detect_launch(env: dict | None = None) -> LaunchInfo:
    """Describe this process's rank from the launcher's environment.

    Precedence: torchrun's ``RANK``/``WORLD_SIZE`` (also set by our own launch scripts), then Open
    MPI's ``OMPI_COMM_WORLD_*`` or PMI's ``PMI_RANK``/``PMI_SIZE``, then Slurm's
    ``SLURM_PROCID``/``SLURM_NTASKS`` (only inside an ``srun`` step, i.e. with ``SLURM_STEP_ID`` set),
    else a single process. PMI without a local rank inside an ``srun`` step is ``srun --mpi=pmi2``: the
    step's Slurm variables give the local rank and the master. ``MASTER_ADDR``/``MASTER_PORT`` win when set;
    otherwise Slurm's first node (or localhost) and a port derived from the job id so that jobs sharing a
    node do not clash.
    """
    env = os.environ if env is None else env
    port = _int_env(env, "MASTER_PORT")
    addr = env.get("MASTER_ADDR")
    in_srun_step = env.get("SLURM_PROCID") not in (None, "") and env.get("SLURM_STEP_ID") not in (None, "")

    if env.get("RANK") not in (None, "") and env.get("WORLD_SIZE") not in (None, ""):
        launcher = "torchrun"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = _int_env(env, "LOCAL_RANK") or 0
        local_world = _int_env(env, "LOCAL_WORLD_SIZE") or world
    elif env.get("OMPI_COMM_WORLD_RANK") not in (None, ""):
        # Before Slurm: mpirun inside an allocation starts its daemons with srun, so every rank also
        # inherits that helper step's SLURM_PROCID.
        launcher = "mpi"
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = _int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0
        local_world = _int_env(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or world
    elif env.get("PMI_RANK") not in (None, "") and env.get("PMI_SIZE") not in (None, ""):
        rank, world = int(env["PMI_RANK"]), int(env["PMI_SIZE"])
        local_rank = _int_env(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
        local_world = _int_env(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
        if local_rank is None and in_srun_step:
            # srun's pmi2 plugin sets PMI_RANK/PMI_SIZE and nothing node-local: without SLURM_LOCALID every
            # task would take local rank 0, i.e. GPU 0. (MPICH's mpiexec, also inside an allocation, sets
            # MPI_LOCALRANKID; its helper step's SLURM_LOCALID would be wrong for it.)
            launcher = "slurm"
            local_rank, local_world, slurm_addr, slurm_port = _slurm_step_layout(env)
            addr, port = addr or slurm_addr, port or slurm_port
        else:
            launcher = "mpi"
            local_rank = local_rank or 0
            local_world = local_world or world
    elif in_srun_step:
        launcher = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank, local_world, slurm_addr, slurm_port = _slurm_step_layout(env)
        addr, port = addr or slurm_addr, port or slurm_port
    else:
        launcher, rank, world, local_rank, local_world = "single", 0, 1, 0, 1

    if rank < 0 or rank >= world:
        raise ValueError(
            f"{launcher} launch gave rank {rank} outside world size {world}: check the launcher's environment"
        )
    return LaunchInfo(
        launcher=launcher,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        master_addr=addr or "127.0.0.1",
        master_port=port or DEFAULT_MASTER_PORT,
    )


def local_gpu(local_rank: int) -> int:
    """The index, among the GPUs this process sees, of the GPU of the rank with node-local rank `local_rank`.

    Each rank sees every GPU of its node (torchrun, ``srun --gpus-per-node``): its local rank. A rank that
    sees exactly one GPU (``srun --gpus-per-task=1`` binds one per task): that one. Otherwise a local rank
    beyond the visible GPUs is refused rather than wrapped around onto a GPU another rank uses.
    """
    visible = torch.cuda.device_count()
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise ConfigError([
            f"local rank {local_rank} has no GPU: this node shows {visible} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {visible} ranks per node, or give "
            "each rank its own GPU (srun --gpus-per-task=1)"
        ])
    return local_rank


def use_cpu_ranks(device: str = "auto") -> bool:
    """Whether ranks run on CPU for ``parallel.device`` = `device`: ``cpu``, or ``auto`` without CUDA.

    Asking for CPU explicitly lets multi-rank tests run on a box with a single GPU, where several
    ranks cannot share the GPU under NCCL.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError([f"parallel.device={device!r} must be one of auto, cpu, cuda"])
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["parallel.device=cuda but torch.cuda.is_available() is False; use parallel.device=auto or "
                           "cpu"])
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    device: str = "auto",
    timeout_minutes: float = 10.0,
    seed: int = 1234,
    io_timeout_minutes: float | None = None,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
) -> LaunchInfo:
    """Create the process group for this launch and megatron-core's TP/PP/CP/DP groups (and the experts'
    EP/ETP groups: `etp` None is `tp`).

    nccl when ranks use GPUs, gloo on CPU ranks (where the CPU harness of
    `megatron_qwen.platform.cpu` is applied first). `timeout_minutes` bounds every collective of
    megatron-core's groups (all of a training step's) so a dead rank ends the job with an error
    instead of a silent hang; `io_timeout_minutes` (default: the same) bounds the collectives of the
    group of all ranks, where ranks wait for work one rank or the file system does (dataset index
    building on rank 0, checkpoint writes). Idempotent within a process.
    """
    info = detect_launch()
    cpu = use_cpu_ranks(device)
    if cpu:
        apply_cpu_harness()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        if not cpu:
            torch.cuda.set_device(local_gpu(info.local_rank))
        torch.distributed.init_process_group(
            backend="gloo" if cpu else "nccl",
            init_method=f"tcp://{_format_host(os.environ['MASTER_ADDR'])}:{os.environ['MASTER_PORT']}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes if io_timeout_minutes is None else io_timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
            context_parallel_size=cp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=tp if etp is None else etp,
            distributed_timeout_minutes=int(max(1, timeout_minutes)),
        )
    # Dropout streams differ between pipeline stages, as in Megatron-LM (initial weights do not come from
    # these streams: see megatron_qwen.model.init).
    seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return info


def _format_host(host: str) -> str:
    # IPv6 literals need brackets inside a tcp:// URL.
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    if host != "127.0.0.1" and host != "localhost":
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror as exc:
            raise RuntimeError(
                f"master address {host!r} does not resolve ({exc}); set MASTER_ADDR to a reachable host"
            ) from exc
    return host


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the process group (end of a run or a test)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def refuse(launch: LaunchInfo, message: str) -> int:
    """Report a request refused before any process group exists: rank 0 prints the one message; returns the
    exit status (2). The other ranks wait a moment first, because a launcher such as torchrun stops every rank
    as soon as one exits, which could cut rank 0 off before it has printed."""
    if launch.rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(2.0)
    return 2
