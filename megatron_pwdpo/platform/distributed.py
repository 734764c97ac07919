"""Process-group set-up: rank discovery (torchrun or Slurm), backend, model parallel.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
under ``srun`` without torchrun the same facts come from ``SLURM_PROCID``,
``SLURM_NTASKS`` and ``SLURM_LOCALID`` (and the sbatch script exports
``MASTER_ADDR``/``MASTER_PORT``). A plain ``python`` process is a world of one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_pwdpo.platform import decisions as platform
from megatron_pwdpo.platform.launch import free_port


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int


def world_from_env(env: dict[str, str] | None = None) -> WorldInfo:
    """Rank, world size and local rank from torchrun's or Slurm's variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return WorldInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
        )
    return WorldInfo(0, 1, 0)


def init_distributed(
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    virtual_pipeline: int | None,
    timeout_s: int,
    cpu: bool = False,
) -> WorldInfo:
    """Start the default process group and Megatron's model-parallel groups.

    gloo on CPU (with the CPU bridge installed), NCCL on GPU; ``cpu=True`` stays on the
    CPU (gloo) where CUDA is available too (the converters). Every collective fails
    after ``timeout_s`` instead of hanging: the default group gets it to the second,
    Megatron's groups (TP, PP, DP, embedding...) rounded up to whole minutes (their
    ``distributed_timeout_minutes``; left out, they would wait 30 minutes on a dead peer).
    """
    from megatron.core import parallel_state

    from megatron_pwdpo.platform import compat, cpu_bridge

    compat.install()
    world = world_from_env()
    if world.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(world.rank), str(world.world_size)
    os.environ["LOCAL_RANK"] = str(world.local_rank)
    backend = platform.plan_backend(platform.CPU if cpu else platform.detect())
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    else:
        cpu_bridge.install()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=world.rank,
            world_size=world.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        distributed_timeout_minutes=group_timeout_minutes(timeout_s),
    )
    return world


def group_timeout_minutes(timeout_s: int) -> int:
    """``timeout_s`` as Megatron's ``distributed_timeout_minutes`` (rounded up, >= 1)."""
    return max(1, math.ceil(timeout_s / 60))


def shutdown() -> None:
    """Destroy Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """The device this rank computes on."""
    if platform.detect().cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
