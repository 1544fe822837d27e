"""The data report: corrupt files and missing captions are counted and named."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from difflab.data import build_dataset


def _img(path, size=(12, 10), color=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (color, color, color)).save(path)


@pytest.fixture
def captioned(tmp_path):
    root = tmp_path / "caps"
    _img(root / "a.png")
    _img(root / "b.png", size=(20, 10))
    _img(root / "sub" / "c.jpg")
    _img(root / "d.png")  # no caption anywhere
    (root / "bad.png").write_bytes(b"this is not a png at all")  # corrupt
    (root / "notes.md").write_text("not an image, ignored")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a grey square"})
        + "\n"
        + json.dumps({"file_name": "sub/c.jpg", "text": "another"})
        + "\n"
    )
    (root / "b.txt").write_text("sidecar caption\n")
    return root


def test_missing_caption_is_an_error_naming_the_file(captioned):
    with pytest.raises(ValueError, match=r"1 image\(s\).*no caption: d\.png.*allow_missing"):
        build_dataset({"source": "captions", "path": str(captioned), "channels": 3})


def test_allow_missing_captions_reports_counts(captioned):
    cfg = {"source": "captions", "path": str(captioned), "channels": 3, "image_size": 8}
    ds, report = build_dataset({**cfg, "allow_missing_captions": True})
    assert (report.found, report.used, len(report.skipped)) == (5, 4, 1)
    assert report.skipped[0][0] == "bad.png" and "unreadable image" in report.skipped[0][1]
    assert report.captioned == 3 and report.missing_captions == ["d.png"]
    assert report.sizes == {"12x10": 3, "20x10": 1}
    texts = sorted(ds[i]["text"] for i in range(len(ds)))
    assert texts == ["", "a grey square", "another", "sidecar caption"]
    assert ds[0]["image"].shape == (3, 8, 8)
    d = report.to_dict()
    assert d["skipped"][0]["path"] == "bad.png" and d["missing_captions"] == ["d.png"]
    text = str(report)
    for needle in ("found 5, used 4, skipped 1", "skipped bad.png", "captions: 3/4 (75.0%)",
                   "missing caption: d.png", "12x10: 3"):  # fmt: skip
        assert needle in text


def test_folder_report_counts_classes_and_corrupt_files(tmp_path):
    _img(tmp_path / "cat" / "1.png")
    _img(tmp_path / "cat" / "2.png")
    (tmp_path / "cat" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _img(tmp_path / "dog" / "1.png", size=(4, 4))
    _img(tmp_path / "loose.png")
    _, report = build_dataset({"source": "folder", "path": str(tmp_path), "min_side": 6})
    assert report.classes == {"cat": 2, "dog": 0}
    assert (report.found, report.used) == (5, 2)
    reasons = dict(report.skipped)
    assert set(reasons) == {"loose.png", "cat/3.png", "dog/1.png"}
    assert "class subfolder" in reasons["loose.png"]
    assert "unreadable" in reasons["cat/3.png"] and "too small" in reasons["dog/1.png"]


def test_no_usable_image_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no usable images"):
        build_dataset({"source": "folder", "path": str(tmp_path)})
