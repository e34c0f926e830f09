"""torch.distributed and megatron-core parallel state, set up in one place.

Ranks come from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`),
from SLURM (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, first host of `SLURM_JOB_NODELIST`)
or, with neither, a single process on a free loopback port. The backend is NCCL when CUDA is
present and gloo otherwise; on CPU the megatron-core adaptations in `cpu_compat` are applied
before any megatron module is built.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaswift.args.parallel import ParallelArgs
from megaswift.logging_utils import log
from megaswift.runtime import cpu_compat, megatron_fixes
from megaswift.runtime.context import Runtime, current, set_current


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    first = nodes.split(",")[0]
    if "[" in first:  # node[01-04] -> node01
        stem, rest = first.split("[", 1)
        first = stem + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def rank_info() -> RankInfo:
    """The launcher's view of this process (torchrun, SLURM or a lone process)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", _slurm_master())
        env.setdefault("MASTER_PORT", "29500")
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                        int(env.get("SLURM_LOCALID", 0)))
    return RankInfo(0, 1, 0)


def init_distributed(parallel: ParallelArgs, runtime: Runtime | None = None,
                     timeout_minutes: int = 30) -> RankInfo:
    """Start torch.distributed and megatron-core's parallel groups for `parallel` on `runtime`
    (default: the defaults' resolution), which becomes the process's runtime decision.

    Validates the layout against the world size before any group is created, so a bad layout
    fails on every rank with the same message naming the flags.
    """
    info = rank_info()
    parallel.validate_world_size(info.world_size)
    runtime = set_current(runtime or current())
    use_cuda = runtime.cuda
    if info.rank == 0:
        for note in runtime.notes:
            log(note)
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    else:
        cpu_compat.apply()
    megatron_fixes.at_startup()
    if not dist.is_initialized():
        if info.world_size == 1 and "MASTER_ADDR" not in os.environ:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            init_method = "env://"
        dist.init_process_group(
            backend=runtime.backend,
            init_method=init_method,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            **parallel.sizes().group_sizes(),
            distributed_timeout_minutes=timeout_minutes,
        )
        # the model-parallel RNG states every forward may fork (SP embeddings, dropout); training
        # seeds them again with --seed before its model is built
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(42)
    return info


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the default process group (idempotent)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def device() -> torch.device:
    """The device this rank computes on; collectives on tensors use it (NCCL needs CUDA tensors)."""
    return current().device()
