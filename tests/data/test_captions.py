"""Captions as SD trainers treat them: cleaning, sidecars, truncation count, tag shuffling."""

from __future__ import annotations

import torch
from PIL import Image

from difflab.data import CaptionTransform, DataConfig, build_dataset
from difflab.data.captions import clean_caption, count_truncated


def test_clean_caption_known_answers():
    assert clean_caption("a  cat &amp; a dog\n see https://x.org/a.png ") == "a cat & a dog see"
    assert clean_caption("&amp;quot;hi&amp;quot;") == '"hi"'  # double-escaped
    assert clean_caption("www.site.com  red\tcar") == "red car"
    decomposed = "cafe\u0301"  # e + combining acute
    assert clean_caption(decomposed) == "caf\u00e9" and len(clean_caption(decomposed)) == 4


def test_count_truncated_by_token_length():
    texts = ["a b", "a b c d", "a b c d e f"]
    assert count_truncated(texts, lambda t: len(t.split()), 4) == 1
    assert count_truncated(texts, lambda t: len(t.split()) + 2, 4) == 2  # bos/eos count


def test_shuffle_keeps_the_first_tags_and_is_seeded():
    tf = CaptionTransform(shuffle_tags=True, keep_tokens=2)
    text = "sks, dog, grass, sky, ball, red collar"
    a = [tf(text, torch.Generator().manual_seed(5)) for _ in range(1)]
    b = [tf(text, torch.Generator().manual_seed(5)) for _ in range(1)]
    assert a == b  # same seed, same order
    gen = torch.Generator().manual_seed(0)
    seen = {tf(text, gen) for _ in range(40)}
    assert len(seen) > 5  # it does shuffle
    for out in seen:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"]
        assert sorted(tags[2:]) == sorted(["grass", "sky", "ball", "red collar"])


def test_caption_dropout_rate():
    tf = CaptionTransform(dropout=0.25)
    gen = torch.Generator().manual_seed(0)
    empty = sum(tf("a photo", gen) == "" for _ in range(4000))
    assert abs(empty / 4000 - 0.25) < 0.03


def _folder(root, captions):
    root.mkdir()
    for k, (ext, text) in enumerate(captions):
        Image.new("RGB", (8, 8), (k * 40, 0, 0)).save(root / f"{k}.png")
        (root / f"{k}{ext}").write_text(text, encoding="utf-8")
    return root


def test_captioned_folder_cleans_reads_caption_sidecars_and_shuffles(tmp_path):
    root = _folder(tmp_path / "d", [(".txt", "a &amp; b"), (".caption", "x, y, z")])
    cfg = DataConfig(source="captions", path=str(root), image_size=8, channels=3,
                     shuffle_tags=True, keep_tokens=1)  # fmt: skip
    ds, report = build_dataset(cfg, generator=torch.Generator().manual_seed(0))
    assert ds.texts == ["a & b", "x, y, z"]
    assert "captions cleaned (HTML entities, URLs, NFC, spaces): 1 changed" in str(report)
    firsts = {ds[1]["text"] for _ in range(20)}
    assert all(t.startswith("x, ") for t in firsts) and len(firsts) == 2
    raw = DataConfig(source="captions", path=str(root), image_size=8, channels=3,
                     clean_captions=False)  # fmt: skip
    assert build_dataset(raw)[0].texts[0] == "a &amp; b"
