"""Datasets read from disk: class folders, captioned folders and ``.npz`` arrays.

Owns the scanning of a folder (every candidate image opened and decoded once, so corrupt
files are named in the report rather than crashing training), caption lookup
(``metadata.jsonl`` with ``file_name``/``text`` as the Hugging Face imagefolder, or a
sidecar ``.txt`` with the image's stem) and the two ``Dataset`` classes every source yields.
Knows nothing of models.
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .captions import CAPTION_EXTENSIONS, CaptionTransform, clean_caption
from .report import DataReport
from .transforms import ImageTransform, random_flip

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "FileDataset",
    "load_captioned_folder",
    "load_image_folder",
    "load_npz",
]

MAX_NPZ_CLASSES = 10_000  # more classes than this (and than images) are not class indices
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class _Base(Dataset):
    """Shared item layout: ``dict(image=[C,H,W] in [-1,1], class_label=int, text=str)``.

    ``class_label`` is present when the source has classes, ``text`` when it has captions
    (an allowed missing caption is ``""``, the empty prompt).
    """

    def __init__(
        self,
        labels: Sequence[int] | None,
        texts: Sequence[str] | None,
        class_names: Sequence[str] | None,
        generator: torch.Generator | None,
    ) -> None:
        self.labels = None if labels is None else [int(v) for v in labels]
        self.texts = None if texts is None else list(texts)
        self.class_names = list(class_names) if class_names else []
        self.generator = generator  # flips are drawn from here; its state can be saved
        self.caption_transform: CaptionTransform | None = None  # per-access caption draws

    @property
    def num_classes(self) -> int | None:
        """Number of classes, ``None`` when unlabelled."""
        return len(self.class_names) if self.labels is not None else None

    def _item(self, index: int, image: Tensor) -> dict[str, Any]:
        item: dict[str, Any] = {"image": image}
        if self.labels is not None:
            item["class_label"] = self.labels[index]
        if self.texts is not None:
            text = self.texts[index]
            if self.caption_transform is not None:
                text = self.caption_transform(text, self.generator)
            item["text"] = text
        return item


class ArrayDataset(_Base):
    """Images held in memory as one float tensor ``[N, C, H, W]`` in [-1, 1]."""

    def __init__(
        self,
        images: Tensor,
        labels: Sequence[int] | None = None,
        texts: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        *,
        random_flip: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(labels, texts, class_names, generator)
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
        self.images = images
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        x = self.images[index]
        if self.random_flip:
            x = random_flip(x, self.generator)
        return self._item(index, x)


class FileDataset(_Base):
    """Images decoded from files on each access through an ``ImageTransform``."""

    def __init__(
        self,
        paths: Sequence[Path],
        transform: ImageTransform,
        labels: Sequence[int] | None = None,
        texts: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(labels, texts, class_names, generator)
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with Image.open(self.paths[index]) as img:
            x = self.transform(img, self.generator)
        return self._item(index, x)


# ---------------------------------------------------------------------------- scanning
def _is_image_name(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _probe(path: Path, root: Path, report: DataReport, min_side: int | None) -> bool:
    """Decode ``path`` fully; record its size, or why it is skipped. True when usable."""
    rel = str(path.relative_to(root))
    try:
        with Image.open(path) as img:
            img.load()
            size = img.size
    except Exception as err:  # PIL raises many types for bad bytes
        report.skip(rel, f"unreadable image ({type(err).__name__}: {err})")
        return False
    if min_side is not None and min(size) < min_side:
        report.skip(rel, f"too small: {size[0]}x{size[1]} < {min_side} on the shorter side")
        return False
    report.sizes[f"{size[0]}x{size[1]}"] += 1
    return True


def _check_root(path: str | Path | None, source: str) -> Path:
    if path is None:
        raise ValueError(f"data.path is required for source '{source}'")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data.path {str(root)!r} is not a directory (source '{source}')")
    return root


def load_image_folder(
    path: str | Path,
    transform: ImageTransform,
    *,
    generator: torch.Generator | None = None,
    min_side: int | None = None,
) -> tuple[FileDataset, DataReport]:
    """Class folders as torchvision's ImageFolder: ``root/<class>/<image>``.

    Class names are the sorted subfolder names and map to indices 0..K-1.  A folder with
    no subfolders is read as unlabelled images.  Files below a class folder are found
    recursively; files at the root of a labelled folder are skipped (no class).
    """
    root = _check_root(path, "folder")
    report = DataReport(source="folder", root=str(root))
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    groups: list[tuple[int | None, list[Path]]] = []
    if class_dirs:
        for p in sorted(root.iterdir()):
            if _is_image_name(p):
                report.found += 1
                report.skip(p.name, "not inside a class subfolder")
        for k, d in enumerate(class_dirs):
            groups.append((k, sorted(p for p in d.rglob("*") if _is_image_name(p))))
    else:
        groups.append((None, sorted(p for p in root.iterdir() if _is_image_name(p))))
    paths: list[Path] = []
    labels: list[int] = []
    for label, files in groups:
        report.found += len(files)
        for p in files:
            if _probe(p, root, report, min_side):
                paths.append(p)
                labels.append(label if label is not None else -1)
    names = [d.name for d in class_dirs]
    if class_dirs:
        counts = Counter(labels)
        report.classes = {name: counts.get(k, 0) for k, name in enumerate(names)}
    report.used = len(paths)
    dataset = FileDataset(
        paths, transform, labels if class_dirs else None, None, names, generator=generator
    )
    return dataset, report


def _read_text(path: Path) -> str:
    """A caption file as UTF-8 text; ValueError naming the file when it is not (e.g. cut
    short inside a character)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); is it truncated?"
        ) from None


def _read_metadata(root: Path, report: DataReport) -> dict[str, str | None]:
    """``metadata.jsonl`` -> {relative path: caption}; bad lines are errors with line numbers.

    ``"text": null`` is a missing caption (reported, an error unless allowed)."""
    meta = root / "metadata.jsonl"
    captions: dict[str, str | None] = {}
    if not meta.is_file():
        return captions
    for n, line in enumerate(_read_text(meta).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise ValueError(f"{meta}:{n}: each line needs 'file_name' and 'text' keys")
        text = row["text"]
        if text is not None and not isinstance(text, str):
            raise ValueError(
                f"{meta}:{n}: 'text' must be a string (or null for no caption), "
                f"got {type(text).__name__} {text!r:.40}"
            )
        captions[Path(str(row["file_name"])).as_posix()] = text  # None: no caption
    report.notes.append(f"captions from metadata.jsonl ({len(captions)} rows)")
    return captions


def load_captioned_folder(
    path: str | Path,
    transform: ImageTransform,
    *,
    allow_missing_captions: bool = False,
    generator: torch.Generator | None = None,
    min_side: int | None = None,
    clean: bool = False,
) -> tuple[FileDataset, DataReport]:
    """Images with captions: ``metadata.jsonl`` (``file_name``, ``text``) or a sidecar
    ``<stem>.txt`` / ``<stem>.caption`` (``CAPTION_EXTENSIONS``, first found wins).

    With ``clean`` every caption goes through ``captions.clean_caption`` (HTML entities,
    URLs, NFC, whitespace) and the report counts the ones it changed.

    Images are found recursively.  A usable image without a caption is an error naming
    the files, unless ``allow_missing_captions`` (then its caption is ``""`` and the report
    lists it).  ``metadata.jsonl`` takes precedence over a sidecar file.
    """
    root = _check_root(path, "captions")
    report = DataReport(source="captions", root=str(root))
    table = _read_metadata(root, report)
    files = sorted(p for p in root.rglob("*") if _is_image_name(p))
    report.found = len(files)
    paths: list[Path] = []
    texts: list[str] = []
    changed = 0
    for p in files:
        if not _probe(p, root, report, min_side):
            continue
        rel = p.relative_to(root).as_posix()
        sidecar = next((s for e in CAPTION_EXTENSIONS if (s := p.with_suffix(e)).is_file()), None)
        if table.get(rel) is not None:
            text: str | None = table[rel]
        elif sidecar is not None:
            text = _read_text(sidecar).strip()
        else:
            text = None
        if text is not None and clean:
            cleaned = clean_caption(text)
            changed += cleaned != text
            text = cleaned
        if text is None:
            report.missing_captions.append(rel)
            text = ""
        else:
            report.captioned += 1
        paths.append(p)
        texts.append(text)
    report.used = len(paths)
    if clean:
        report.notes.append(
            f"captions cleaned (HTML entities, URLs, NFC, spaces): {changed} changed"
        )
    if report.missing_captions and not allow_missing_captions:
        shown = ", ".join(report.missing_captions[:10])
        more = len(report.missing_captions) - 10
        raise ValueError(
            f"{len(report.missing_captions)} image(s) in {root} have no caption: {shown}"
            + (f" and {more} more" if more > 0 else "")
            + " (add metadata.jsonl rows or <name>.txt files, or set "
            "data.allow_missing_captions=true)"
        )
    return FileDataset(paths, transform, None, texts, None, generator=generator), report


def load_npz(
    path: str | Path,
    transform: ImageTransform,
    *,
    generator: torch.Generator | None = None,
) -> tuple[ArrayDataset, DataReport]:
    """Arrays in a ``.npz``: ``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1, 3, 4)
    and optional integer ``labels [N]`` (classes 0..max)."""
    file = Path(path) if path is not None else None
    if file is None or not file.is_file():
        raise ValueError(f"data.path {str(path)!r} is not a file (source 'npz')")
    report = DataReport(source="npz", root=str(file))
    try:
        npz = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # not a zip: numpy tries .npy, then pickle
        raise ValueError(f"{file}: not a .npz archive of arrays ({err})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{file}: not a .npz archive of arrays (a single .npy array?)")
    try:
        with npz:
            if "images" not in npz.files:
                raise ValueError(f"{file} has no 'images' array (keys: {', '.join(npz.files)})")
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz.files else None
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # a truncated archive
        raise ValueError(f"{file}: a damaged .npz archive ({err})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"{file}: 'images' must be uint8 [N, H, W] or [N, H, W, C], "
            f"got {images.dtype} {list(images.shape)}"
        )
    if images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{file}: 'images' has {images.shape[-1]} channels in the last axis; "
            "expected 1, 3 or 4 (channels-last [N, H, W, C])"
        )
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    n = images.shape[0]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{file}: 'labels' must be integers of shape [{n}], "
                f"got {labels.dtype} {list(labels.shape)}"
            )
        if n and labels.min() < 0:
            raise ValueError(f"{file}: labels must be >= 0, got {int(labels.min())}")
        limit = max(n, MAX_NPZ_CLASSES)
        if n and int(labels.max()) >= limit:  # ids, not class indices
            raise ValueError(
                f"{file}: labels must be class indices 0..K-1 with K <= {limit} (the larger "
                f"of the image count and {MAX_NPZ_CLASSES}); got label {int(labels.max())}; "
                "map the labels to 0..K-1 first"
            )
    report.found = report.used = n
    report.sizes[f"{images.shape[2]}x{images.shape[1]}"] = n
    fixed = ImageTransform(
        transform.image_size, transform.channels, center_crop=transform.center_crop
    )
    tensors = [fixed(Image.fromarray(images[i])) for i in range(n)]  # flips happen per access
    stacked = (
        torch.stack(tensors)
        if tensors
        else torch.zeros(0, transform.channels, transform.image_size, transform.image_size)
    )
    names: list[str] = []
    if labels is not None:
        k = int(labels.max()) + 1 if n else 0
        names = [str(i) for i in range(k)]
        counts = Counter(int(v) for v in labels)
        report.classes = {str(i): counts.get(i, 0) for i in range(k)}
        empty = [str(i) for i in range(k) if not counts.get(i)]
        if empty:
            report.notes.append(f"classes with no image: {', '.join(empty[:10])}")
    dataset = ArrayDataset(
        stacked,
        None if labels is None else labels.tolist(),
        None,
        names,
        random_flip=transform.random_flip,
        generator=generator,
    )
    return dataset, report
