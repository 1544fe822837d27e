"""The order in which training samples are seen, and the position within it.

Owns the data order: epoch ``e`` visits the data set in the permutation drawn from a
generator seeded with ``(seed, e)`` (no global RNG), in global batches of ``batch_size``
(an incomplete last batch is dropped).  The position is ``(epoch, index)`` — samples
consumed in the epoch — so a resumed run continues in the same order.  Under torchrun every
rank walks the same global order and loads only its own rows.  With aspect-ratio buckets
(``BucketBatchStream``) every batch holds images of one bucket: per epoch each bucket's
images are permuted and cut into full batches, and the batches are permuted, all from the
``(seed, epoch)`` generator, so the position resumes exactly.  Knows nothing of models.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

__all__ = ["BatchStream", "BucketBatchStream", "epoch_order"]

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

    def set_position(self, position: dict[str, Any]) -> None:
        """Continue from a saved :attr:`position`."""
        self.close()
        self.epoch, self.index = int(position["epoch"]), int(position["index"])

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


class BucketBatchStream(BatchStream):
    """A ``BatchStream`` whose every global batch holds images of one bucket.

    :param bucket_ids: each sample's bucket; buckets with fewer images than a batch never
        fill one and are left out (a ValueError when none can).
    """

    def __init__(self, dataset: Any, batch_size: int, *, bucket_ids: Sequence[int], **kw: Any):
        super().__init__(dataset, batch_size, **kw)
        self.bucket_ids = list(bucket_ids)
        counts = Counter(self.bucket_ids)
        if max(counts.values()) < batch_size:
            raise ValueError(
                f"no aspect bucket holds train.batch_size={batch_size} images (the largest "
                f"holds {max(counts.values())}); lower train.batch_size or raise data.bucket_step"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` (sample indices), in the order they are seen."""
        gen = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + epoch) % (2**63))
        members: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_ids):
            members.setdefault(b, []).append(i)
        batches = []
        for b in sorted(members):
            idx = members[b]
            perm = torch.randperm(len(idx), generator=gen).tolist()
            shuffled = [idx[k] for k in perm]
            full = len(shuffled) // self.batch_size * self.batch_size
            batches += [shuffled[s : s + self.batch_size] for s in range(0, full, self.batch_size)]
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[k] for k in order]

    def _plan(self) -> Iterator[tuple[int, int, list[int]]]:
        epoch, index = self.epoch, self.index
        lo = self.rank * self.local
        while True:
            batches = self.epoch_batches(epoch)
            for k in range(index // self.batch_size, len(batches)):
                yield epoch, k * self.batch_size, batches[k][lo : lo + self.local]
            epoch, index = epoch + 1, 0


class MixedStream:
    """``data.mix``: every global batch is ``main``'s rows followed by ``mix``'s rows, so
    each batch holds exactly ``mix.batch_size`` samples of the general data set.

    The general data's class labels become ``-1`` (the trainer trains them on the null
    label: they teach the unconditional model) and a boolean ``mix`` entry marks its rows.

    :param main: the run's own data, ``batch_size - m`` rows a batch.
    :param mix: the general data, ``m`` rows a batch (its own order and position).
    """

    def __init__(self, main: BatchStream, mix: BatchStream) -> None:
        self.main, self.mix = main, mix
        first, other = main.dataset[0], mix.dataset[0]
        if "text" in first and "text" not in other:
            raise ValueError(
                "data.mix: the run trains on captions, and the mixed data set has none; mix "
                "a captioned data set (data.mix.source: captions)"
            )

    @property
    def epoch(self) -> int:
        """The main data's epoch."""
        return self.main.epoch

    @property
    def position(self) -> dict[str, Any]:
        """The main position, with the mixed data's under ``mix``."""
        return {**self.main.position, "mix": self.mix.position}

    def set_position(self, position: dict[str, Any]) -> None:
        """Continue from a saved :attr:`position`."""
        self.main.set_position(position)
        self.mix.set_position(position["mix"])

    def next(self) -> dict[str, Any]:
        """The next mixed batch (this rank's rows)."""
        a, b = self.main.next(), self.mix.next()
        na, nb = len(a["image"]), len(b["image"])
        out: dict[str, Any] = {"image": torch.cat([a["image"], b["image"]])}
        if "class_label" in a:
            out["class_label"] = torch.cat([a["class_label"], torch.full((nb,), -1)])
        if "text" in a:
            out["text"] = list(a["text"]) + list(b["text"])
        out["mix"] = torch.cat(
            [torch.zeros(na, dtype=torch.bool), torch.ones(nb, dtype=torch.bool)]
        )
        return out

    def close(self) -> None:
        """Stop both loaders' workers."""
        self.main.close()
        self.mix.close()
