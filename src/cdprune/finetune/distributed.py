"""Small helpers for multi-process (``torchrun``) training and evaluation.

``torchrun --nproc_per_node N`` starts N copies of the program and tells each one who it is
through the ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` environment variables.
:func:`init_distributed` reads them and joins the process group; every other helper here is
a no-op in a single process, so library code can call them unconditionally.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
]

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo", "mpi")


@dataclass(frozen=True)
class DistInfo:
    """Who this process is in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_distributed: bool = False


def is_distributed() -> bool:
    """True when a process group is initialised (more than one process may be running)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, the only process that writes files and shows progress."""
    return get_rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; "
                          "launch with torchrun, which sets it") from None


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and a
    single-process :class:`DistInfo` is returned. If a process group already exists its
    rank and size are reported as they are.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``"mpi"``; by default ``nccl`` when CUDA is
            available, else ``gloo``. With CUDA each process is pinned to GPU
            ``LOCAL_RANK``.

    Raises:
        ConfigError: an unknown backend or malformed environment variables.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo()
    rank = _env_int("RANK", 0)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ConfigError(f"unknown distributed backend {backend!r}; use one of "
                          f"{', '.join(BACKENDS)}")
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; "
                          "run a single process instead")
    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.info("joined process group: rank %d of %d (local rank %d, backend %s)",
                rank, world_size, local_rank, backend)
    return DistInfo(rank, world_size, local_rank, True)


def barrier() -> None:
    """Wait for all processes (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it (unchanged when alone)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm running statistics, ...) of ``module`` from rank ``src``.

    DistributedDataParallel keeps parameters identical across ranks but each rank updates
    its BatchNorm statistics on its own batches, so they drift apart by one step; this makes
    all ranks hold exactly what rank ``src`` saves.
    """
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=src)


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if is_distributed():
        dist.destroy_process_group()
