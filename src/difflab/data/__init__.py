"""Training data: the embedded digits, the synthetic RGB shapes, image folders, captioned
folders, ``.npz`` arrays.

Owns ``DataConfig`` (the ``data:`` section of a run config), ``build_dataset`` and the
``DataReport`` printed before training.  Every source yields
``dict(image=[C, H, W] float in [-1, 1], class_label=int, text=str)`` (the last two only
when the source has them).  Knows nothing of models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from .._validate import check_choice, unknown_message
from .buckets import BucketDataset, bucket_sizes
from .captions import CaptionTransform
from .digits import digits_accuracy, digits_caption, digits_tensor, load_digits_dataset
from .folders import ArrayDataset, FileDataset, load_captioned_folder, load_image_folder, load_npz
from .report import DataReport
from .shapes import SHAPE_NAMES, load_shapes_dataset, shapes_caption, shapes_tensor
from .transforms import ImageTransform, random_flip

__all__ = [
    "SOURCES",
    "ArrayDataset",
    "BucketDataset",
    "CaptionTransform",
    "DataConfig",
    "DataReport",
    "FileDataset",
    "SHAPE_NAMES",
    "ImageTransform",
    "build_dataset",
    "digits_accuracy",
    "digits_caption",
    "digits_tensor",
    "random_flip",
    "shapes_caption",
    "shapes_tensor",
]

SOURCES = ("digits", "shapes", "folder", "captions", "npz")
Source = Literal["digits", "shapes", "folder", "captions", "npz"]
EMBEDDED = ("digits", "shapes")  # made in memory: no data.path


@dataclass
class DataConfig:
    """The ``data:`` section of a run config.

    :param source: ``digits`` (embedded, class labels + captions), ``shapes`` (synthetic
        RGB shapes in 6 classes, labels + captions, `difflab.data.shapes`), ``folder`` (class =
        subfolder), ``captions`` (metadata.jsonl or sidecar .txt), ``npz`` (arrays).
    :param path: folder or ``.npz`` file (unused for ``digits`` and ``shapes``).
    :param image_size: output side in pixels (images are square).
    :param channels: 1 (grayscale) or 3 (RGB).
    :param center_crop: resize the shorter side then crop the centre; else squash to square.
    :param random_flip: horizontal flips, drawn from the dataset's generator.
    :param allow_missing_captions: captioned folders: keep images without a caption (as
        ``""``) instead of raising.
    :param min_side: skip (and report) images whose shorter side is below this.
    :param clean_captions: captions lose HTML entities, URLs, odd whitespace; NFC
        (``data.captions.clean_caption``).
    :param caption_dropout: probability a caption is read as ``""`` (kohya's
        ``caption_dropout_rate``; on top of ``diffusion.cond_drop_prob``).
    :param shuffle_tags: shuffle comma-separated tags each time a caption is read, keeping
        the first ``keep_tokens`` in place.
    :param buckets: aspect-ratio buckets (``data.buckets``): images keep their shape,
        resized to the bucket (area ``image_size**2``) of nearest aspect ratio; each batch
        from one bucket.
    :param bucket_step: bucket sides are multiples of this (``None``: the network's size
        multiple, the autoencoder's factor times the U-Net's downsampling, set by the trainer;
        8 when ``build_dataset`` is called alone).
    :param bucket_max_ratio: the longest bucket side is at most this times the shortest.
    :param mix: ``{path: ..., fraction: 0.2, source: folder}``: a second, general data set
        of which exactly ``round(fraction * batch_size)`` samples join every batch.
    """

    source: Source = "digits"
    path: str | None = None
    image_size: int = 16
    channels: int = 1
    center_crop: bool = True
    random_flip: bool = False
    allow_missing_captions: bool = False
    min_side: int | None = None
    clean_captions: bool = True
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    buckets: bool = False
    bucket_step: int | None = None
    bucket_max_ratio: float = 2.0
    mix: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_choice("data source", self.source, SOURCES)
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"data.image_size must be a positive integer, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {self.channels}")
        if self.source not in EMBEDDED and self.path is None:
            raise ValueError(f"data.path is required for source '{self.source}'")
        self.caption_transform()  # validates dropout / keep_tokens
        if self.buckets and self.source not in ("folder", "captions"):
            raise ValueError(
                f"data.buckets needs images of their own shapes (source folder or captions), "
                f"got source {self.source!r}"
            )
        if self.bucket_step is not None and self.bucket_step < 1:
            raise ValueError(f"data.bucket_step must be >= 1, got {self.bucket_step}")
        if self.mix is not None:
            self.mix_config()  # validates

    def caption_transform(self) -> CaptionTransform:
        """The per-read caption transform these settings describe."""
        return CaptionTransform(
            dropout=float(self.caption_dropout), shuffle_tags=self.shuffle_tags,
            keep_tokens=self.keep_tokens,
        )  # fmt: skip

    def mix_config(self) -> tuple[DataConfig, float]:
        """``data.mix`` as the general data set's config (this one's sizes) and its fraction."""
        mix = dict(self.mix or {})
        unknown = [k for k in mix if k not in ("path", "fraction", "source")]
        if unknown or "path" not in mix or "fraction" not in mix:
            raise ValueError(
                f"data.mix must be {{path: FOLDER, fraction: F, source: folder|captions}}, got "
                f"{self.mix!r}"
            )
        fraction = mix["fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"data.mix.fraction must be a number in (0, 1), got {fraction!r}")
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"data.mix.fraction must be in (0, 1), got {fraction!r}")
        fields = {**self.to_dict(), "source": mix.get("source", "folder"), "path": mix["path"],
                  "mix": None, "buckets": False}  # fmt: skip
        return DataConfig.from_dict(fields), float(fraction)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError with a did-you-mean."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                raise ValueError(unknown_message("data config key", key, known))
        return cls(**dict(data))


def _is_npz_file(path: str | None) -> bool:
    """True for an existing ``.npz`` file: ``source: folder`` templates then just work."""
    return path is not None and Path(path).suffix.lower() == ".npz" and Path(path).is_file()


def build_dataset(
    cfg: DataConfig | Mapping[str, Any] | Any, *, generator: torch.Generator | None = None
) -> tuple[Dataset, DataReport]:
    """Build the dataset a config names, and the report of what was found and used.

    :param generator: source of random flips (default: a CPU generator seeded with 0 when
        ``random_flip`` is on).  Its state is ``dataset.generator.get_state()``.
    :raises ValueError: bad config, missing folder, missing captions (unless allowed),
        or no usable image at all.
    """
    if not isinstance(cfg, DataConfig):
        spec: Any = cfg
        if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
            spec = dataclasses.asdict(spec)  # e.g. difflab.train's copy of the data section
        cfg = DataConfig.from_dict(spec)
    captions = cfg.caption_transform()
    if (cfg.random_flip or captions.active) and generator is None:
        generator = torch.Generator().manual_seed(0)
    transform = ImageTransform(
        cfg.image_size, cfg.channels, center_crop=cfg.center_crop, random_flip=cfg.random_flip
    )
    dataset: Dataset
    path = cfg.path or ""  # DataConfig requires it for every source but digits
    if cfg.source == "digits":
        dataset, report = load_digits_dataset(
            cfg.image_size, cfg.channels, random_flip=cfg.random_flip, generator=generator
        )
    elif cfg.source == "shapes":
        dataset, report = load_shapes_dataset(
            cfg.image_size, cfg.channels, random_flip=cfg.random_flip, generator=generator
        )
    elif cfg.source == "folder" and _is_npz_file(path):
        dataset, report = load_npz(path, transform, generator=generator)
        report.notes.append("data.path is a .npz file: read as data.source npz")
    elif cfg.source == "folder":
        dataset, report = load_image_folder(
            path, transform, generator=generator, min_side=cfg.min_side
        )
    elif cfg.source == "captions":
        dataset, report = load_captioned_folder(
            path,
            transform,
            allow_missing_captions=cfg.allow_missing_captions,
            generator=generator,
            min_side=cfg.min_side,
            clean=cfg.clean_captions,
        )
        if captions.active:
            dataset.caption_transform = captions
    else:
        dataset, report = load_npz(path, transform, generator=generator)
    report.output_size = (cfg.channels, cfg.image_size, cfg.image_size)
    if report.used == 0:
        raise ValueError(f"no usable images in {report.root}\n{report}")
    if cfg.buckets:
        step = cfg.bucket_step or 8
        sizes = bucket_sizes(cfg.image_size**2, step, cfg.bucket_max_ratio)
        dataset = BucketDataset.from_files(dataset, sizes)  # type: ignore[arg-type]
        report.buckets = dataset.histogram()
        report.notes.append(
            f"aspect-ratio buckets: {len(sizes)} sizes of area <= {cfg.image_size}^2 in steps "
            f"of {step}; images resized to their bucket, not cropped"
        )
    return dataset, report
