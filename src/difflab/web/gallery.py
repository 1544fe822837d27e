"""The gallery: every image made through the page, one PNG each, in one folder.

Owns the folder's layout (``YYYYmmdd-HHMMSS-<job>-<i>.png``, each written by
``difflab.images.save_png`` with the image's own parameters: ``n=1``, its seed ``seed + i``
and its condition, so "use these settings" reproduces it exactly), listing newest first
with a filter on prompt text and class, reading one image's parameters and deleting.  The
folder is the whole state: a restarted server sees what an earlier one saved.  Knows nothing
of HTTP or of sampling.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..images import make_grid, read_png_params, save_png

__all__ = ["Gallery", "image_params"]

NAME = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{4,16}-[0-9]{1,4}\.png$")


def image_params(params: Mapping[str, Any], i: int) -> dict[str, Any]:
    """The parameters of image ``i`` of a batch drawn with ``params`` (image ``i`` uses seed
    ``seed + i`` and equals that seed drawn alone)."""
    one = dict(params)
    one["n"], one["seed"] = 1, int(params["seed"]) + i
    for key in ("class_labels", "negative_class", "prompt", "negative_prompt"):
        value = params.get(key)
        if isinstance(value, list) and len(value) == params["n"]:
            one[key] = [value[i]] if key in ("class_labels", "negative_class") else value[i]
    return one


class Gallery:
    """The images of ``folder`` (created on first save)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        """The file of image ``name``; ``FileNotFoundError`` for a name not in the gallery."""
        if not isinstance(name, str) or not NAME.match(name):
            raise FileNotFoundError(
                f"no gallery image {name!r} (names look like 20250101-120000-ab12-0.png)"
            )
        path = self.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"no gallery image {name!r}")
        return path

    def save(self, images: Any, params: Mapping[str, Any], job_id: str) -> list[str]:
        """Write each image of ``images [n, C, H, W]`` with its own parameters; their names."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        names = []
        for i in range(images.shape[0]):
            name = f"{stamp}-{job_id[:16]}-{i}.png"
            save_png(
                make_grid(images[i : i + 1], 1, padding=0),
                self.folder / name,
                image_params(params, i),
            )
            names.append(name)
        return names

    def params(self, name: str) -> dict[str, Any]:
        path = self.path(name)
        mtime = path.stat().st_mtime
        with self._lock:
            hit = self._cache.get(name)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        params = read_png_params(path) or {}
        with self._lock:
            self._cache[name] = (mtime, params)
        return params

    def list(
        self,
        *,
        query: str | None = None,
        class_label: int | None = None,
        offset: int = 0,
        limit: int = 60,
    ) -> tuple[int, list[dict[str, Any]]]:
        """``(matches, page)``: images whose prompt contains ``query`` (case-insensitive)
        and / or whose class is ``class_label``, newest first."""
        if not self.folder.is_dir():
            return 0, []
        names = sorted((p.name for p in self.folder.iterdir() if NAME.match(p.name)), reverse=True)
        hits = []
        for name in names:
            try:
                params = self.params(name)
            except (FileNotFoundError, ValueError, OSError):
                continue  # deleted meanwhile, or not one of ours
            if query and query.lower() not in _text(params.get("prompt")).lower():
                continue
            if class_label is not None and class_label not in (params.get("class_labels") or []):
                continue
            hits.append({"name": name, "params": params})
        return len(hits), hits[offset : offset + limit]

    def delete(self, name: str) -> None:
        self.path(name).unlink()
        with self._lock:
            self._cache.pop(name, None)

    def size(self, name: str) -> tuple[int, int]:
        with Image.open(self.path(name)) as im:
            return im.size


def _text(prompt: str | Sequence[str] | None) -> str:
    if prompt is None:
        return ""
    return prompt if isinstance(prompt, str) else " ".join(prompt)
