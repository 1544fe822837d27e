"""What a model is evaluated with when its own training data cannot say: prompts read from a
file or a captioned folder, and a folder of real reference images.

Owns: reading ``--prompts`` (a text file, one prompt per line, or the captions of a captioned
image folder, as ``difflab.data`` reads them), a short identity of a prompt list (recorded next
to the numbers and part of a sweep cell's key), and the data config that reads ``--reference``
(a folder of images, resized on the shorter side and centre-cropped to the model's size, with
the model's channels). A Stable Diffusion model has no training data, so both come from here;
on a difflab run they replace the run's ``data:`` section.

Knows nothing of metrics or sampling: `difflab.eval.sweep` uses these.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["prompts_identity", "read_prompts", "reference_folder_config"]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of ``path``: a UTF-8 text file, one prompt per line (blank lines skipped,
    surrounding spaces stripped), or a captioned image folder's captions in its file order
    (``metadata.jsonl`` or ``<stem>.txt`` sidecars; every image must have one).

    Repeats are kept: evaluation cycles over the list (sample ``i`` uses prompt ``i % N``), so a
    captioned folder's samples follow its caption distribution.
    """
    p = Path(path)
    if p.is_dir():
        from difflab.data import build_dataset

        dataset, _ = build_dataset({"source": "captions", "path": str(p), "image_size": 1})
        prompts = [t.strip() for t in dataset.texts]  # type: ignore[attr-defined]
    elif p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"prompts file {p}: not UTF-8 text ({err.reason})") from None
        prompts = [line.strip() for line in text.splitlines()]
    else:
        raise FileNotFoundError(
            f"prompts file {p} not found (expected a text file, one prompt per line, or a "
            "captioned image folder)"
        )
    prompts = [t for t in prompts if t]
    if not prompts:
        raise ValueError(f"{p} holds no prompts (expected one non-empty prompt per line)")
    return prompts


def prompts_identity(prompts: Sequence[str]) -> dict[str, Any]:
    """``{"count": N, "sha256": <16 hex digits>}`` of a prompt list (order counts)."""
    digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
    return {"count": len(prompts), "sha256": digest[:16]}


def reference_folder_config(
    folder: str | os.PathLike, pixel_shape: Sequence[int]
) -> dict[str, Any]:
    """The data config reading a folder of real images at a model's ``(C, H, W)``: shorter
    side resized to ``H`` (PIL bicubic), centre ``H x H`` crop, ``C`` channels (grey or RGB),
    no flips. Images in subfolders count too (read as class folders; labels are unused)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"reference folder {root} not found (expected a folder of real images)"
        )
    c, h, w = (int(v) for v in pixel_shape)
    if h != w:
        raise ValueError(
            f"reference folder {root}: the model makes {h}x{w} images; reference images are "
            "centre-cropped squares, so only square models are supported"
        )
    return {"source": "folder", "path": str(root), "image_size": h, "channels": c,
            "center_crop": True, "random_flip": False}  # fmt: skip
