"""Sampling for evaluation split over ``torchrun`` ranks, gathered on rank 0.

Owns :class:`Ranks` (which share of the sampling batches this process draws) and the two
collectives evaluation needs: gathering drawn batches to rank 0 and broadcasting rank 0's
result to every rank.  Images are seeded per image (image *i* uses seed
``seed + i``, `difflab.eval.sweep.sample_images`), so a batch drawn on any rank is the one a
single process draws; rank 0 concatenates the batches in order and scores the whole set,
which is therefore the single process's set.

The process group is made by the caller (``difflab eval`` / ``sweep`` through
``difflab.train.distributed.setup_distributed``); this module only reads it.  Knows nothing
of metrics or samplers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["Ranks"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks that share one evaluation (``rank`` of
    ``world_size``); ``Ranks()`` is a single process."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

    @classmethod
    def current(cls) -> Ranks:
        """The default process group's rank and size (a single process when there is none)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0 scores the samples and writes the results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def batches(self, n: int, batch_size: int) -> Iterator[tuple[int, int] | None]:
        """For each round of ``world_size`` batches, this rank's ``[s, e)`` of the batches
        ``[0, b), [b, 2b), ...`` covering ``n`` images (batch *k* goes to rank ``k % world``),
        or None when its share has run out before the others'."""
        starts = range(0, n, batch_size)
        for first in range(0, len(starts), self.world_size):
            k = first + self.rank
            yield (starts[k], min(starts[k] + batch_size, n)) if k < len(starts) else None

    def gather(self, obj: T) -> list[T] | None:
        """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None elsewhere (``[obj]`` in a
        single process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size if self.is_main else []
        dist.gather_object(obj, out if self.is_main else None, dst=0)
        return out if self.is_main else None

    def from_main(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (a broadcast)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]
