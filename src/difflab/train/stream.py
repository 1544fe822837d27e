"""The order in which training samples are seen, and the position within it.

Owns the data order: epoch ``e`` visits the data set in the permutation drawn from a
generator seeded with ``(seed, e)`` (no global RNG), in global batches of ``batch_size``
(an incomplete last batch is dropped).  The position is ``(epoch, index)`` — samples
consumed in the epoch — so a resumed run continues in the same order.  Under torchrun every
rank walks the same global order and loads only its own rows.  Knows nothing of models.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

__all__ = ["BatchStream", "epoch_order"]

_SEED_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs map to distinct generator seeds


def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """The permutation of ``range(n)`` used in ``epoch`` (long ``[n]``)."""
    gen = torch.Generator().manual_seed((seed * _SEED_STRIDE + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


class BatchStream:
    """Yields this rank's rows of successive global batches, tracking ``(epoch, index)``.

    :param dataset: map-style data set of dicts (``image``, optional ``class_label``, ``text``).
    :param batch_size: global batch size; must be a multiple of ``world_size``.
    :param seed: seed of the per-epoch permutations.
    :param rank: this process's rank; it loads rows ``[rank*b, (rank+1)*b)`` of each batch,
        ``b = batch_size // world_size``.
    :param num_workers: DataLoader worker processes (0 = load in this process).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        epoch: int = 0,
        index: int = 0,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"train.batch_size={batch_size} must be divisible by the world size {world_size}"
            )
        self.n = len(dataset)  # type: ignore[arg-type]
        if self.n < batch_size:
            raise ValueError(
                f"the data set has {self.n} samples, fewer than train.batch_size={batch_size}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.local = batch_size // world_size
        self.seed, self.rank, self.num_workers = seed, rank, num_workers
        self.epoch, self.index = epoch, index
        self._it: Generator[dict[str, Any], None, None] | None = None

    @property
    def position(self) -> dict[str, int]:
        """``{"epoch": e, "index": i}``: the next batch starts at sample ``i`` of epoch ``e``."""
        return {"epoch": self.epoch, "index": self.index}

    def next(self) -> dict[str, Any]:
        """This rank's rows of the next global batch, collated."""
        if self._it is None:
            self._it = self._batches()
        return next(self._it)

    def close(self) -> None:
        """Stop the loader's worker processes (if any); ``next`` starts a new one."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def _plan(self) -> Iterator[tuple[int, int, list[int]]]:
        """``(epoch, start, this rank's rows)`` of every batch from the current position on."""
        per_epoch = (self.n // self.batch_size) * self.batch_size
        epoch, index = self.epoch, self.index
        lo = self.rank * self.local
        while True:
            if index >= per_epoch:
                epoch, index = epoch + 1, 0
            order = epoch_order(self.seed, epoch, self.n)
            for start in range(index, per_epoch, self.batch_size):
                yield epoch, start, order[start + lo : start + lo + self.local].tolist()
            index = per_epoch

    def _batches(self) -> Generator[dict[str, Any], None, None]:
        loader: Any
        if self.num_workers > 0:
            # One loader over every epoch: its workers start once (a loader per epoch would
            # respawn them each epoch) and read ahead across epoch boundaries.
            loader = DataLoader(
                self.dataset,
                batch_sampler=_Rows(self._plan()),
                num_workers=self.num_workers,
                collate_fn=default_collate,
            )
        else:
            loader = (default_collate([self.dataset[i] for i in r]) for _, _, r in self._plan())
        for (epoch, start, _), batch in zip(self._plan(), loader):
            self.epoch, self.index = epoch, start + self.batch_size
            yield batch


class _Rows:
    """The row lists of a plan, as the (endless) batch sampler of one DataLoader."""

    def __init__(self, plan: Iterator[tuple[int, int, list[int]]]) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[list[int]]:
        return (rows for _, _, rows in self.plan)
