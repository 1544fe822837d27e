"""A synthetic RGB data set made here: coloured shapes in 6 classes, 32x32 by default.

3,000 images (500 per class: disc, square, triangle, ring, cross, stripes), each one shape of
random position, size, rotation and colour on a random background with a faint linear
gradient.  Shapes are drawn from signed distance functions with one-pixel antialiasing
(coverage ``clamp(0.5 - d / pixel, 0, 1)``), so the same set renders at any size.  Every
random number comes from one seeded ``torch.Generator`` (global RNG untouched), drawn before
rendering, so the set depends on the seed only.  A stand-in for CIFAR-10 on a machine without
downloads; its feature space for FID is `difflab.eval.ShapesClassifier`.  Knows nothing of
models.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .folders import ArrayDataset
from .report import DataReport

__all__ = [
    "SHAPES_N",
    "SHAPES_SEED",
    "SHAPE_NAMES",
    "load_shapes_dataset",
    "render_shapes",
    "shape_coverage",
    "shapes_caption",
    "shapes_tensor",
]

SHAPE_NAMES = ("disc", "square", "triangle", "ring", "cross", "stripes")
SHAPES_N = 3000  # images in the set (500 per class)
SHAPES_SEED = 0  # the set's seed; other seeds give fresh sets from the same distribution
_PARAMS = 12  # random numbers per image: centre 2, size 1, angle 1, bg 3, fg 3, gradient 2


def shapes_caption(label: int) -> str:
    """``"a picture of a ring"`` for label 3."""
    return f"a picture of a {SHAPE_NAMES[label]}"


def _box(u: Tensor, v: Tensor, hu: Tensor | float, hv: Tensor | float) -> Tensor:
    """Signed distance to an axis-aligned box of half sides ``(hu, hv)`` (negative inside)."""
    qu, qv = u.abs() - hu, v.abs() - hv
    outside = torch.sqrt(qu.clamp(min=0) ** 2 + qv.clamp(min=0) ** 2)
    return outside + torch.maximum(qu, qv).clamp(max=0)


def _triangle(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    """Signed distance to an equilateral triangle of half side ``r``, centred, apex up
    (Quilez's exact 2-D SDF)."""
    k = math.sqrt(3.0)
    u, v = u.abs() - r, -v + r / k  # image rows grow downwards: flip so the apex is up
    fold = u + k * v > 0
    u, v = torch.where(fold, (u - k * v) / 2, u), torch.where(fold, (-k * u - v) / 2, v)
    u = u - torch.minimum(torch.maximum(u, -2 * r), torch.zeros_like(u))
    return -torch.sqrt(u**2 + v**2) * torch.sign(v)


def _sdf(label: Tensor, u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    """Signed distance ``[N, S, S]`` of each image's shape in its own rotated frame."""
    radius = torch.sqrt(u**2 + v**2)
    period = 0.6 * r
    t = u / period - torch.floor(u / period)  # [0, 1) across each period
    band = ((t - 0.5).abs() - 0.25) * period  # negative on the middle half: stripes along v
    by_class = (
        radius - r,  # disc
        _box(u, v, 0.8 * r, 0.8 * r),  # square
        _triangle(u, v, 0.95 * r),  # triangle
        (radius - 0.72 * r).abs() - 0.22 * r,  # ring
        torch.minimum(_box(u, v, r, 0.3 * r), _box(u, v, 0.3 * r, r)),  # cross
        torch.maximum(radius - r, band),  # stripes inside a disc
    )
    out = torch.zeros_like(u)
    for k, d in enumerate(by_class):
        out = torch.where(label[:, None, None] == k, d, out)
    return out


def _geometry(p: Tensor, labels: Tensor, image_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel coverage ``[N, S, S]`` of each image's shape, and the pixel-centre grid ``x, y``
    ``[S, S]`` in [-1, 1], from the random numbers ``p [N, 12]``."""
    r = 0.3 + 0.3 * p[:, 2]  # radius in [-1, 1] image coordinates
    # every shape lies within 1.15 r of its centre (the square's corner): it stays inside
    cx, cy = ((2 * p[:, :2] - 1) * (0.98 - 1.15 * r[:, None])).unbind(1)
    theta = 2 * math.pi * p[:, 3]
    pixel = 2.0 / image_size
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) * pixel - 1.0
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (S, S) pixel centres
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]  # (N, S, S)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # the shape's rotated frame
    d = _sdf(labels, u, v, r[:, None, None])
    return (0.5 - d / pixel).clamp(0.0, 1.0), x, y  # antialiased coverage


def _draw(labels: Tensor, image_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Images ``[N, 3, S, S]`` in [0, 1] and their shapes' coverage ``[N, S, S]``."""
    if image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {image_size}")
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(SHAPE_NAMES)):
        raise ValueError(f"shape labels must be in 0..{len(SHAPE_NAMES) - 1}")
    p = torch.rand(len(labels), _PARAMS, generator=generator)  # (N, 12) in [0, 1)
    alpha, x, y = _geometry(p, labels, image_size)
    bg = p[:, 4:7]  # (N, 3)
    fg = (bg + 0.35 + 0.3 * p[:, 7:10]) % 1.0  # every channel differs from bg by >= 0.35
    grad, phi = 0.15 * p[:, 10], 2 * math.pi * p[:, 11]
    slope = x * torch.cos(phi)[:, None, None] + y * torch.sin(phi)[:, None, None]
    ramp = grad[:, None, None] * slope  # (N, S, S) the background's linear gradient
    back = (bg[:, :, None, None] + ramp[:, None]).clamp(0.0, 1.0)  # (N, 3, S, S)
    a = alpha[:, None]
    return back * (1 - a) + fg[:, :, None, None] * a, alpha


def render_shapes(labels: Tensor, image_size: int = 32, *, generator: torch.Generator) -> Tensor:
    """Draw one random shape of each class in ``labels [N]``: ``[N, 3, S, S]`` in [0, 1].

    The ``12 N`` random numbers are drawn from ``generator`` first, so the images do not
    depend on ``image_size`` beyond resolution.
    """
    return _draw(labels, image_size, generator)[0]


def shape_coverage(labels: Tensor, image_size: int = 32, *, generator: torch.Generator) -> Tensor:
    """The fraction of each pixel that the shape covers, ``[N, S, S]`` in [0, 1], of the
    images `render_shapes` draws from the same generator state."""
    return _draw(labels, image_size, generator)[1]


def shapes_tensor(
    n: int = SHAPES_N, image_size: int = 32, *, seed: int = SHAPES_SEED
) -> tuple[Tensor, Tensor]:
    """The shapes set as ``([n, 3, S, S] float in [-1, 1], labels [n])``; label ``i % 6``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    labels = torch.arange(n) % len(SHAPE_NAMES)
    images = render_shapes(labels, image_size, generator=torch.Generator().manual_seed(seed))
    return images * 2.0 - 1.0, labels


def load_shapes_dataset(
    image_size: int = 32,
    channels: int = 3,
    *,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[ArrayDataset, DataReport]:
    """The shapes set with class labels and captions (``"a picture of a ring"``); 1 channel
    is the mean of R, G, B."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    x, labels = shapes_tensor(SHAPES_N, image_size)
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    label_list = labels.tolist()
    k = len(SHAPE_NAMES)
    report = DataReport(source="shapes", root=None, found=len(label_list), used=len(label_list))
    counts = np.bincount(labels.numpy(), minlength=k)
    report.classes = {SHAPE_NAMES[i]: int(counts[i]) for i in range(k)}
    report.captioned = len(label_list)
    report.sizes[f"{image_size}x{image_size}"] = len(label_list)
    report.output_size = (channels, image_size, image_size)
    report.notes.append(f"synthetic, rendered at {image_size}x{image_size} (seed {SHAPES_SEED})")
    dataset = ArrayDataset(
        x, label_list, [shapes_caption(i) for i in label_list], list(SHAPE_NAMES),
        random_flip=random_flip, generator=generator,
    )  # fmt: skip
    return dataset, report
