"""PNG parameters round trip, uint8 quantisation and grid layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.images import make_grid, read_png_params, save_grid, save_image, to_uint8


def test_png_text_chunk_round_trip(tmp_path):
    params = {
        "run": "runs/demo",
        "weights": "ema",
        "sampler": "dpmpp_2m",
        "steps": 20,
        "spacing": "trailing",
        "guidance_scale": 2.5,
        "seed": 3,
        "class_labels": [7, 7, 1],
        "prompt": None,
        "difflab_version": "0.1.0",
    }
    images = torch.linspace(-1, 1, 3 * 3 * 4 * 5).reshape(3, 3, 4, 5)
    path = save_grid(images, tmp_path / "g.png", nrow=3, params=params)
    assert read_png_params(path) == params
    with Image.open(path) as img:  # plain PIL sees the same JSON under the "difflab" key
        assert "difflab" in img.text and img.mode == "RGB"
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_save_image_pixels_round_trip(tmp_path):
    x = torch.tensor([[[-1.0, 0.0], [1.0, 0.5]]])  # (1, 2, 2)
    path = save_image(x, tmp_path / "one.png", {"seed": 1})
    arr = np.asarray(Image.open(path))
    np.testing.assert_array_equal(arr, [[0, 128], [255, 191]])  # round((x + 1) * 127.5)
    assert read_png_params(path) == {"seed": 1}


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    np.testing.assert_array_equal(to_uint8(x)[0, 0, :, 0], [0, 0, 128, 255, 255])


def test_grid_places_image_i_at_row_i_div_nrow():
    n, h, w = 5, 2, 3
    images = torch.stack([torch.full((1, h, w), -1 + 0.4 * i) for i in range(n)])
    grid = np.asarray(make_grid(images, nrow=2, padding=1))
    assert grid.shape == (3 * (h + 1) + 1, 2 * (w + 1) + 1)  # 3 rows of 2
    expect = to_uint8(images)[:, 0, 0, 0]
    for i in range(n):
        r, c = divmod(i, 2)
        top, left = 1 + r * (h + 1), 1 + c * (w + 1)
        assert (grid[top : top + h, left : left + w] == expect[i]).all()
    assert grid[0].max() == 0  # padding


def test_png_without_params_reads_none(tmp_path):
    Image.new("L", (2, 2)).save(tmp_path / "plain.png")
    assert read_png_params(tmp_path / "plain.png") is None
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        make_grid(torch.zeros(2, 5, 4, 4))


def test_saved_pngs_honour_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = save_image(torch.zeros(1, 4, 4), tmp_path / "a.png")
        os.umask(0o077)
        private = save_image(torch.zeros(1, 4, 4), tmp_path / "b.png")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # was 0o600 from tempfile.mkstemp
    assert private.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
