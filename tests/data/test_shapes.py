"""difflab.data.shapes: a seeded, balanced, antialiased RGB shapes set whose classes are told
apart by one hand-computed number, with areas equal to the shapes' closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.data import DataConfig, build_dataset
from difflab.data.shapes import (
    SHAPE_NAMES,
    SHAPES_N,
    render_shapes,
    shape_coverage,
    shapes_caption,
    shapes_tensor,
)

S = 128  # coverage tests render finely: discretisation errors ~1/S


def _radii(n: int, seed: int) -> torch.Tensor:
    """Each image's shape radius in pixels at size S (the 3rd of its 12 random numbers)."""
    p = torch.rand(n, 12, generator=torch.Generator().manual_seed(seed))
    return (0.3 + 0.3 * p[:, 2]) * S / 2


@pytest.fixture(scope="module")
def coverage():
    labels = torch.arange(120) % 6
    return labels, shape_coverage(labels, S, generator=torch.Generator().manual_seed(5))


def test_same_seed_same_set_other_seed_other_set_global_rng_untouched():
    state = torch.get_rng_state()
    a, la = shapes_tensor(60, 32, seed=3)
    b, lb = shapes_tensor(60, 32, seed=3)
    c, _ = shapes_tensor(60, 32, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert (a - c).abs().mean() > 0.1


def test_set_is_balanced_in_range_and_the_same_at_every_size():
    x, labels = shapes_tensor()
    assert x.shape == (SHAPES_N, 3, 32, 32) and x.dtype == torch.float32
    assert torch.bincount(labels).tolist() == [SHAPES_N // 6] * 6
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.9 and x.max() > 0.9  # uses the range
    # rendered at 64 px and area-averaged to 32: the same images up to antialiasing
    big, _ = shapes_tensor(60, 64)
    down = torch.nn.functional.avg_pool2d(big, 2)
    assert (down - x[:60]).abs().mean() < 0.02


def test_shape_areas_equal_their_closed_forms(coverage):
    labels, alpha = coverage
    area = alpha.sum(dim=(1, 2)) / _radii(len(labels), 5) ** 2  # in units of r^2
    closed = {
        "disc": math.pi,
        "square": 1.6**2,
        "triangle": math.sqrt(3) / 4 * 1.9**2,
        "ring": math.pi * (0.94**2 - 0.5**2),
        "cross": 2 * (2 * 0.6) - 0.6**2,
    }
    for k, name in enumerate(SHAPE_NAMES):
        got = area[labels == k]
        if name in closed:
            assert got.mean() == pytest.approx(closed[name], rel=3e-3), name
        else:  # stripes: half of the disc
            assert got.mean() == pytest.approx(math.pi / 2, rel=0.03)
        assert (got.max() - got.min()) / got.mean() < 0.01  # every draw covers the same area


def test_shapes_stay_inside_and_are_antialiased(coverage):
    _, alpha = coverage
    border = torch.cat([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], dim=1)
    assert border.max() == 0.0
    partial = ((alpha > 0.05) & (alpha < 0.95)).sum(dim=(1, 2))
    assert (partial > 0).all()  # edge pixels are partly covered


def test_one_moment_separates_the_six_classes(coverage):
    """The scale- and rotation-invariant second moment of area, sum(r^2) / area^2, takes
    disjoint ranges per class, ordered as the closed forms (disc 1/(2 pi), square 1/6, ...)."""
    labels, alpha = coverage
    ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    mass = alpha.sum(dim=(1, 2))
    cx = (alpha * xs).sum(dim=(1, 2)) / mass
    cy = (alpha * ys).sum(dim=(1, 2)) / mass
    r2 = (xs - cx[:, None, None]) ** 2 + (ys - cy[:, None, None]) ** 2
    moment = (alpha * r2).sum(dim=(1, 2)) / mass**2
    ranges = [(moment[labels == k].min(), moment[labels == k].max()) for k in range(6)]
    assert ranges[0][0] == pytest.approx(1 / (2 * math.pi), rel=2e-3)  # disc
    assert ranges[1][0] == pytest.approx(1 / 6, rel=2e-3)  # square
    order = sorted(range(6), key=lambda k: ranges[k][0])
    assert [SHAPE_NAMES[k] for k in order] == [
        "disc", "square", "triangle", "cross", "ring", "stripes"
    ]  # fmt: skip
    for lo, hi in zip(order, order[1:]):
        assert ranges[lo][1] < ranges[hi][0]  # no overlap


def test_render_shapes_is_coverage_composited():
    labels = torch.arange(12) % 6
    images = render_shapes(labels, 32, generator=torch.Generator().manual_seed(9))
    alpha = shape_coverage(labels, 32, generator=torch.Generator().manual_seed(9))
    assert images.shape == (12, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    inside, outside = alpha == 1, alpha == 0
    for i in range(12):  # flat shape colour; background differs by >= 0.35 in each channel
        fg = images[i][:, inside[i]]
        assert (fg - fg[:, :1]).abs().max() < 1e-6
        gap = (images[i][:, outside[i]].mean(dim=1) - fg[:, 0]).abs()
        assert gap.min() > 0.35 - 0.15  # minus at most the background gradient


def test_data_source_shapes():
    ds, report = build_dataset(DataConfig(source="shapes", image_size=32, channels=3))
    x, labels = shapes_tensor()
    item = ds[7]
    assert torch.equal(item["image"], x[7]) and item["class_label"] == int(labels[7]) == 1
    assert item["text"] == shapes_caption(1) == "a picture of a square"
    assert report.classes == {name: 500 for name in SHAPE_NAMES}
    assert report.output_size == (3, 32, 32)
    grey, _ = build_dataset({"source": "shapes", "image_size": 16, "channels": 1})
    assert grey[7]["image"].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="shape labels must be in 0..5"):
        render_shapes(torch.tensor([6]), generator=torch.Generator())
