"""Aspect-ratio buckets (NovelAI's aspect-ratio bucketing, as kohya-ss sd-scripts trains).

Owns the bucket resolutions (every ``W x H`` in multiples of ``step`` with ``W·H`` at most
the square's area and aspect ratio at most ``max_ratio``), the assignment of each image to
the bucket of nearest aspect ratio (distance in ``log(W/H)``), the data set that resizes
each image to its bucket *without cropping* (the aspect error is that of the bucket grid),
and its histogram for the data report.  The batch order (every batch from one bucket) is
``difflab.train.stream.BucketBatchStream``.  Knows nothing of models.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .folders import FileDataset
from .transforms import convert_channels, random_flip, to_tensor

__all__ = ["BucketDataset", "assign_buckets", "bucket_sizes"]


def bucket_sizes(max_area: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Every ``(W, H)``, multiples of ``step``, ``W·H <= max_area``, each the largest ``H`` for
    its ``W`` (NovelAI), with its transpose, aspect ratio ``<= max_ratio``; sorted by ``W/H``.

    >>> bucket_sizes(32 * 32, 8, max_ratio=2.0)
    [(24, 40), (32, 32), (40, 24)]
    """
    if step < 1 or max_area < step * step:
        raise ValueError(f"no bucket of side >= step {step} fits in an area of {max_area}")
    if max_ratio < 1:
        raise ValueError(f"data.bucket_max_ratio must be >= 1, got {max_ratio}")
    out = set()
    for w in range(step, max_area // step + 1, step):
        h = (max_area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.update({(w, h), (h, w)})  # portrait and landscape alike
    return sorted(out, key=lambda s: (s[0] / s[1], s[0]))


def assign_buckets(
    sizes: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]]
) -> list[int]:
    """Index into ``buckets`` of the nearest aspect ratio (``|log W/H - log Wb/Hb|``, the
    first on a tie) for each image size ``(W, H)``."""
    logs = [math.log(w / h) for w, h in buckets]
    out = []
    for w, h in sizes:
        r = math.log(w / h)
        out.append(min(range(len(logs)), key=lambda i: abs(logs[i] - r)))
    return out


class BucketDataset(FileDataset):
    """A ``FileDataset`` whose images are resized to their bucket's ``W x H`` (no crop).

    :param buckets: the bucket sizes ``(W, H)``.
    :param bucket_ids: each image's bucket (``assign_buckets``).
    """

    def __init__(
        self,
        base: FileDataset,
        buckets: Sequence[tuple[int, int]],
        bucket_ids: Sequence[int],
    ) -> None:
        super().__init__(
            base.paths, base.transform, base.labels, base.texts, base.class_names,
            generator=base.generator,
        )  # fmt: skip
        self.caption_transform = base.caption_transform
        self.buckets = [tuple(b) for b in buckets]
        self.bucket_ids = list(bucket_ids)

    @classmethod
    def from_files(cls, base: FileDataset, buckets: Sequence[tuple[int, int]]) -> BucketDataset:
        """Read each file's size (header only) and bucket it."""
        sizes = []
        for path in base.paths:
            with Image.open(Path(path)) as img:
                sizes.append(img.size)
        return cls(base, buckets, assign_buckets(sizes, buckets))

    def histogram(self) -> Counter[str]:
        """``"WxH"`` -> images in that bucket."""
        return Counter(f"{self.buckets[b][0]}x{self.buckets[b][1]}" for b in self.bucket_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        w, h = self.buckets[self.bucket_ids[index]]
        with Image.open(self.paths[index]) as file:
            img = convert_channels(file, self.transform.channels)
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BICUBIC)
        x = to_tensor(img)  # (C, h, w)
        if self.transform.random_flip:
            x = random_flip(x, self.generator)
        return self._item(index, x)
