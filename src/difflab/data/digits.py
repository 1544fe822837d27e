"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits.

1,797 grayscale images in 10 classes (the UCI "optdigits" test set, pixel values 0..16),
shipped inside scikit-learn, so nothing is downloaded.  Also owns an independent classifier
of these digits (an RBF SVM on the real 8x8 images) used to score class-conditional samples.
Knows nothing of models.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .folders import ArrayDataset
from .report import DataReport

__all__ = [
    "DIGIT_NAMES",
    "digits_accuracy",
    "digits_caption",
    "digits_classifier",
    "digits_tensor",
    "load_digits_dataset",
    "to_digits_features",
]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits_caption(label: int) -> str:
    """``"a handwritten digit seven"`` for label 7."""
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)  # (N,8,8) 0..16


def digits_tensor(image_size: int = 8) -> tuple[Tensor, Tensor]:
    """All digits as ``([1797, 1, S, S] float in [-1, 1], labels [1797])``.

    Pixel values 0..16 map linearly to [-1, 1] (x/8 - 1).  ``image_size != 8`` resizes
    with bilinear interpolation (``align_corners=False``; antialiased when shrinking).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    images, labels = _load()
    x = torch.from_numpy(images).unsqueeze(1) / 8.0 - 1.0  # (N, 1, 8, 8) in [-1, 1]
    if image_size != 8:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False,
            antialias=image_size < 8,
        ).clamp(-1.0, 1.0)  # fmt: skip
    return x, torch.from_numpy(labels)


def load_digits_dataset(
    image_size: int = 8,
    channels: int = 1,
    *,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[ArrayDataset, DataReport]:
    """The embedded digits with class labels and captions (``"a handwritten digit seven"``)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    x, labels = digits_tensor(image_size)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    label_list = labels.tolist()
    texts = [digits_caption(k) for k in label_list]
    report = DataReport(source="digits", root=None, found=len(label_list), used=len(label_list))
    counts = np.bincount(labels.numpy(), minlength=10)
    report.classes = {str(k): int(counts[k]) for k in range(10)}
    report.captioned = len(texts)
    report.sizes["8x8"] = len(label_list)
    report.output_size = (channels, image_size, image_size)
    if image_size != 8:
        report.notes.append(f"resized 8x8 -> {image_size}x{image_size} (bilinear)")
    dataset = ArrayDataset(
        x, label_list, texts, [str(k) for k in range(10)],
        random_flip=random_flip, generator=generator,
    )  # fmt: skip
    return dataset, report


def to_digits_features(images: Tensor) -> np.ndarray:
    """Images ``[N, C, H, W]`` in [-1, 1] -> the classifier's features ``[N, 64]`` in 0..16.

    Channels are averaged, the image is area-averaged to 8x8 (H and W multiples of 8) or
    bilinearly resized otherwise, and [-1, 1] maps back to 0..16.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    x = images.detach().float().cpu().mean(dim=1, keepdim=True)  # (N, 1, H, W)
    h, w = x.shape[-2:]
    if (h, w) != (8, 8):
        if h % 8 == 0 and w % 8 == 0:
            x = F.avg_pool2d(x, kernel_size=(h // 8, w // 8))  # area averaging
        else:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    x = ((x.clamp(-1, 1) + 1.0) * 8.0).reshape(x.shape[0], 64)
    return x.numpy().astype(np.float64)


@lru_cache(maxsize=1)
def digits_classifier() -> Any:
    """An RBF SVM (``SVC(gamma=0.001, C=10)``) fitted on all 1,797 real 8x8 digits.

    It never sees generated images, so its accuracy on class-conditional samples measures
    how recognisable they are (about 99% on held-out real digits).
    """
    from sklearn.svm import SVC

    images, labels = _load()
    return SVC(gamma=0.001, C=10.0).fit(images.reshape(len(images), 64), labels)


def digits_accuracy(images: Tensor, labels: Tensor | list[int]) -> float:
    """Fraction of ``images [N, C, H, W]`` in [-1, 1] that the SVM classifies as ``labels``."""
    pred = digits_classifier().predict(to_digits_features(images))
    target = np.asarray(torch.as_tensor(labels).cpu().tolist())
    if target.shape != pred.shape:
        raise ValueError(f"got {len(pred)} images but {target.size} labels")
    return float((pred == target).mean())
