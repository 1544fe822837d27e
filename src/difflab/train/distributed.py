"""Distributed setup under ``torchrun``: process group, device, rank helpers.

Owns reading ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, initialising the process group (gloo
on CPU, NCCL on GPU), the few collectives the loop needs and :func:`wrap_ddp`, the one
place a network is wrapped for data parallelism (``DistributedDataParallel``).  Knows
nothing of architectures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "any_rank",
    "rank0_says",
    "setup_distributed",
    "teardown_distributed",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``.

    Under tensor parallelism (``tensor_parallel`` ranks share one model replica, torchtitan's
    ``("dp", "tp")`` mesh: rank = ``data_rank * tensor_parallel + tp index``) every rank of a
    group sees the same rows: ``data_rank`` of ``data_world`` is the replica's index, the one
    the data stream and the batch draws use.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when setup_distributed created the process group
    tensor_parallel: int = 1  # ranks per model replica (train.tensor_parallel)

    @property
    def data_rank(self) -> int:
        """Index of this rank's data-parallel replica (its rows of each global batch)."""
        return self.rank // self.tensor_parallel

    @property
    def data_world(self) -> int:
        """Number of data-parallel replicas: ``world_size / tensor_parallel``."""
        return self.world_size // self.tensor_parallel

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and sample grids."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(
    device: str | torch.device | None = None, *, tensor_parallel: int = 1
) -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    :param device: force a device; default CUDA (``cuda:LOCAL_RANK``) when available, else CPU.
    :param tensor_parallel: ranks per model replica; must divide the world size.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tensor_parallel < 1 or world % tensor_parallel:
        raise ValueError(
            f"train.tensor_parallel={tensor_parallel} needs a world size divisible by it; this "
            f"job has {world} process(es) (torchrun --nproc_per_node a multiple of it, or 1)"
        )
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was asked for but torch sees no CUDA device "
                f"(torch {torch.__version__}); use 'cpu' or leave the device unset"
            )
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
        if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(dev)!r} does not exist: torch sees {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(device=dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        owns = True
    return DistInfo(rank, world, local, dev, owns, tensor_parallel)


def teardown_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` in a single process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` across the ranks (itself in a single
    process): gradients are averaged over the ranks in the backward pass."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def rank0_says(flag: bool, info: DistInfo) -> bool:
    """Rank 0's ``flag`` on every rank (a broadcast)."""
    value = torch.tensor([float(flag)], device=info.device)
    if info.distributed:
        dist.broadcast(value, src=0)
    return bool(value.item())


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` is true on any rank (a max all-reduce)."""
    if not info.distributed:
        return flag
    value = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
