"""Sources and transforms: digits, class folders, npz arrays, resize/crop/flip, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import DataConfig, build_dataset, digits_accuracy, digits_tensor
from difflab.data.transforms import ImageTransform, center_crop, random_flip, resize_shorter


def test_digits_size_range_labels_captions():
    ds, report = build_dataset({"source": "digits", "image_size": 8})
    assert len(ds) == 1797 and report.used == 1797 and ds.num_classes == 10
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1
    # sklearn's 0..16 maps to x/8 - 1 exactly
    from sklearn.datasets import load_digits

    raw = load_digits()
    torch.testing.assert_close(x[5, 0], torch.tensor(raw.images[5] / 8 - 1, dtype=torch.float32))
    assert ds[5]["class_label"] == raw.target[5]
    assert ds[7]["text"] == "a handwritten digit seven" and ds[7]["class_label"] == 7
    assert sum(report.classes.values()) == 1797 and report.classes["0"] == 178


def test_digits_upsampled_keep_range_and_classifier_sees_the_same_digits():
    x16, labels = digits_tensor(16)
    assert x16.shape == (1797, 1, 16, 16) and x16.min() >= -1 and x16.max() <= 1
    assert digits_accuracy(x16[:300], labels[:300]) > 0.97  # area-averaged back to 8x8
    shuffled = labels[:300].roll(1)
    assert digits_accuracy(x16[:300], shuffled) < 0.3


def test_image_folder_classes_sorted_to_indices(tmp_path):
    for name, color in (("zebra", 10), ("ant", 200), ("moth", 90)):
        (tmp_path / name).mkdir()
        Image.new("RGB", (6, 4), (color, color, color)).save(tmp_path / name / "x.png")
    ds, report = build_dataset(
        {"source": "folder", "path": str(tmp_path), "image_size": 4, "channels": 3}
    )
    assert ds.class_names == ["ant", "moth", "zebra"]
    labels = [ds[i]["class_label"] for i in range(3)]
    assert labels == [0, 1, 2]
    assert ds[0]["image"].shape == (3, 4, 4)
    torch.testing.assert_close(ds[0]["image"], torch.full((3, 4, 4), 200 / 127.5 - 1))
    assert "text" not in ds[0] and report.classes == {"ant": 1, "moth": 1, "zebra": 1}


def test_npz_loading_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 2, 2, 1, 0]))
    ds, report = build_dataset(
        {"source": "npz", "path": str(tmp_path / "d.npz"), "image_size": 6, "channels": 3}
    )
    assert len(ds) == 5 and report.classes == {"0": 2, "1": 1, "2": 2}
    expect = torch.from_numpy(images[3]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(ds[3]["image"], expect)
    assert ds[3]["class_label"] == 1


def test_npz_grayscale_without_labels_and_bad_arrays(tmp_path):
    np.savez(tmp_path / "g.npz", images=np.full((2, 4, 4), 255, np.uint8))
    ds, _ = build_dataset({"source": "npz", "path": str(tmp_path / "g.npz"), "image_size": 4})
    assert set(ds[0]) == {"image"} and (ds[1]["image"] == 1).all()
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        build_dataset({"source": "npz", "path": str(tmp_path / "f.npz")})
    np.savez(tmp_path / "n.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no 'images' array"):
        build_dataset({"source": "npz", "path": str(tmp_path / "n.npz")})


def test_resize_shorter_side_and_center_crop():
    img = Image.new("L", (40, 20))
    assert resize_shorter(img, 10).size == (20, 10)
    assert resize_shorter(Image.new("L", (20, 40)), 10).size == (10, 20)
    arr = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)  # H=5, W=7
    crop = np.asarray(center_crop(Image.fromarray(arr), 3))
    np.testing.assert_array_equal(crop, arr[1:4, 2:5])
    t = ImageTransform(8, 3)
    assert t(Image.new("RGBA", (30, 16), (0, 0, 0, 0))).shape == (3, 8, 8)
    assert (t(Image.new("RGBA", (30, 16), (0, 0, 0, 0))) == 1).all()  # alpha -> white


def test_random_flip_uses_the_passed_generator():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4).repeat(8, 1, 1, 1)
    a = random_flip(x, torch.Generator().manual_seed(3))
    torch.manual_seed(0)  # global RNG must not matter
    b = random_flip(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flipped = [(a[i] == x[i].flip(-1)).all().item() for i in range(len(x))]
    assert 0 < sum(flipped) < len(x)  # some flipped, some not
    assert all(flipped[i] or torch.equal(a[i], x[i]) for i in range(len(x)))
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        random_flip(x, None)
    ds, _ = build_dataset({"source": "digits", "image_size": 8, "random_flip": True},
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    ds2, _ = build_dataset({"source": "digits", "image_size": 8, "random_flip": True},
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert all(torch.equal(ds[i]["image"], ds2[i]["image"]) for i in range(20))


def test_config_errors_and_round_trip():
    cfg = DataConfig(source="digits", image_size=8)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="did you mean 'image_size'"):
        DataConfig.from_dict({"image_sise": 8})
    with pytest.raises(ValueError, match="did you mean 'folder'"):
        DataConfig(source="folders", path="x")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        DataConfig(channels=4)
    with pytest.raises(ValueError, match="not a directory"):
        build_dataset({"source": "folder", "path": "/nonexistent/dir"})


def test_sixteen_bit_grayscale_png_is_scaled_not_saturated(tmp_path):
    values = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(values).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    ds, _ = build_dataset({"source": "folder", "path": str(tmp_path), "image_size": 4})
    expect = torch.tensor([0.0, 1.0, 128.0, 255.0]) / 127.5 - 1
    torch.testing.assert_close(ds[0]["image"][0, 0], expect)


def test_npz_labels_that_are_not_class_indices_are_a_clear_error(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    np.savez(tmp_path / "ids.npz", images=images, labels=np.array([0, 1, 10**9]))
    with pytest.raises(ValueError, match=r"ids\.npz: labels must be class indices 0\.\.K-1"):
        build_dataset({"source": "npz", "path": str(tmp_path / "ids.npz"), "image_size": 4})
    np.savez(tmp_path / "gap.npz", images=images, labels=np.array([0, 3, 3]))  # allowed
    ds, report = build_dataset({"source": "npz", "path": str(tmp_path / "gap.npz")})
    assert ds.num_classes == 4 and "classes with no image: 1, 2" in report.notes


def test_null_caption_is_a_missing_caption_not_the_word_none(tmp_path):
    for k in range(2):
        Image.new("L", (4, 4), 100).save(tmp_path / f"{k}.png")
    rows = [{"file_name": "0.png", "text": "a cat"}, {"file_name": "1.png", "text": None}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"source": "captions", "path": str(tmp_path), "image_size": 4}
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no caption: 1\.png"):
        build_dataset(cfg)
    ds, report = build_dataset({**cfg, "allow_missing_captions": True})
    assert [ds[i]["text"] for i in range(2)] == ["a cat", ""]
    assert report.missing_captions == ["1.png"] and report.captioned == 1
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": 5}))
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: 'text' must be a string"):
        build_dataset(cfg)
