"""Aspect-ratio buckets: sizes, nearest-ratio assignment, one bucket per batch, seeded order,
exact resume, no cropping."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from PIL import Image

from difflab.data import DataConfig, build_dataset
from difflab.data.buckets import assign_buckets, bucket_sizes
from difflab.train.stream import BucketBatchStream


def test_bucket_sizes_known_answer():
    assert bucket_sizes(32 * 32, 8) == [(24, 40), (32, 32), (40, 24)]  # ratio <= 2
    assert bucket_sizes(32 * 32, 8, 4.0) == [
        (16, 64), (16, 56), (16, 48), (24, 40), (32, 32), (40, 24), (48, 16), (56, 16), (64, 16)
    ]  # fmt: skip
    sd = bucket_sizes(512 * 512, 64)  # Stable Diffusion 1.x at 512^2, NovelAI's steps of 64
    assert (512, 512) in sd and (640, 384) in sd and (384, 640) in sd
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sd)
    assert all(max(w / h, h / w) <= 2.0 for w, h in sd)


def test_assignment_is_nearest_aspect_ratio():
    buckets = bucket_sizes(32 * 32, 8, 4.0)
    ids = assign_buckets([(100, 100), (300, 180), (90, 200), (1000, 100)], buckets)
    assert [buckets[i] for i in ids] == [(32, 32), (40, 24), (24, 40), (64, 16)]
    for w, h in [(123, 77), (50, 51), (80, 33)]:
        (i,) = assign_buckets([(w, h)], buckets)
        best = min(abs(math.log(w / h) - math.log(bw / bh)) for bw, bh in buckets)
        assert abs(math.log(w / h) - math.log(buckets[i][0] / buckets[i][1])) == best


def _images(root, sizes):
    root.mkdir()
    for k, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (10 * k, 100, 200)).save(root / f"{k:02d}.png")
    return root


SIZES = [(64, 64)] * 9 + [(80, 48)] * 7 + [(40, 70)] * 6


def test_bucketed_folder_resizes_without_crop_and_reports(tmp_path):
    root = _images(tmp_path / "imgs", SIZES)
    cfg = DataConfig(source="folder", path=str(root), image_size=32, channels=3, buckets=True)
    ds, report = build_dataset(cfg)
    assert report.buckets == Counter({"32x32": 9, "40x24": 7, "24x40": 6})
    assert "buckets: 24x40: 6, 32x32: 9, 40x24: 7" in str(report)
    assert ds[0]["image"].shape == (3, 32, 32) and ds[10]["image"].shape == (3, 24, 40)
    # a flat-coloured image stays flat: the whole content is resized, nothing cropped away
    assert torch.allclose(ds[10]["image"][1], torch.full((24, 40), 100 / 127.5 - 1), atol=1e-6)


def _stream(ids, **kw):
    data = [{"image": torch.zeros(1)}] * len(ids)
    return BucketBatchStream(data, 3, bucket_ids=ids, seed=7, **kw)


def test_batches_are_pure_seeded_and_cover_full_batches():
    ids = [0] * 9 + [1] * 7 + [2] * 6
    s = _stream(ids)
    for epoch in range(3):
        batches = s.epoch_batches(epoch)
        assert len(batches) == 3 + 2 + 2  # 7 -> 2 full batches of 3, one image sits out
        assert all(len({ids[i] for i in b}) == 1 for b in batches)
        assert len({i for b in batches for i in b}) == 21
        assert batches == _stream(ids).epoch_batches(epoch)  # same seed, same order
    assert s.epoch_batches(0) != s.epoch_batches(1)


def test_resume_continues_the_same_batches():
    ids = [0] * 9 + [1] * 7 + [2] * 6
    whole = _stream(ids)
    want = [whole.epoch_batches(e) for e in range(2)]
    plan = [rows for e in range(2) for rows in want[e]]
    s = _stream(ids)
    got = [next(p) for p in [s._plan()] for _ in range(4)]
    assert [g[2] for g in got] == plan[:4]
    s.set_position({"epoch": 0, "index": 4 * 3})
    rest = s._plan()
    assert [next(rest)[2] for _ in range(6)] == plan[4:10]


def test_no_bucket_fills_a_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="no aspect bucket holds train.batch_size=3"):
        _stream([0, 0, 1, 1, 2])
