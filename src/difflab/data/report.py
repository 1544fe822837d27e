"""The data report printed before training: what was found, used and skipped, and why.

Owns ``DataReport`` (files found/used/skipped with reasons, classes with counts, caption
coverage, a histogram of original image sizes).  Knows nothing of models or training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataReport"]

_SHOW = 10  # names listed per problem before "... and N more"


@dataclass
class DataReport:
    """What ``build_dataset`` saw on disk (USER_NEEDS 15: captioned data without silent loss).

    :param source: ``digits`` | ``folder`` | ``captions`` | ``npz``.
    :param root: the folder or file read (``None`` for the embedded digits).
    :param found: candidate image files (or array rows) found.
    :param used: images in the dataset.
    :param skipped: ``(path, reason)`` for every candidate left out.
    :param classes: class name -> number of images used (empty when unlabelled).
    :param captioned: used images that have a caption.
    :param missing_captions: used images without one (only when they are allowed).
    :param sizes: original ``"WxH"`` -> count over the images used.
    :param output_size: ``(C, H, W)`` of the tensors the dataset yields.
    :param notes: free-form lines (e.g. the resize rule used).
    :param buckets: aspect-ratio bucket ``"WxH"`` -> images (``data.buckets``).
    :param truncated_captions: captions longer than the text encoder's ``token_limit``.
    :param token_limit: the encoder's token limit (``None`` before the trainer counts).
    """

    source: str
    root: str | None = None
    found: int = 0
    used: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)
    captioned: int = 0
    missing_captions: list[str] = field(default_factory=list)
    sizes: Counter[str] = field(default_factory=Counter)
    output_size: tuple[int, int, int] | None = None
    notes: list[str] = field(default_factory=list)
    buckets: Counter[str] = field(default_factory=Counter)
    truncated_captions: int = 0
    token_limit: int | None = None

    @property
    def has_captions(self) -> bool:
        """True when the source carries captions at all."""
        return self.captioned > 0 or bool(self.missing_captions)

    def skip(self, path: str, reason: str) -> None:
        """Record a candidate left out, with why."""
        self.skipped.append((path, reason))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict of every field."""
        return {
            "source": self.source,
            "root": self.root,
            "found": self.found,
            "used": self.used,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "classes": dict(self.classes),
            "captioned": self.captioned,
            "missing_captions": list(self.missing_captions),
            "sizes": dict(self.sizes.most_common()),
            "output_size": list(self.output_size) if self.output_size else None,
            "notes": list(self.notes),
            "buckets": dict(self.buckets),
            "truncated_captions": self.truncated_captions,
            "token_limit": self.token_limit,
        }

    def __str__(self) -> str:
        where = f" ({self.root})" if self.root else ""
        lines = [f"data report: {self.source}{where}"]
        lines.append(
            f"  found {self.found}, used {self.used}, skipped {len(self.skipped)}"
            + (f"; output {'x'.join(map(str, self.output_size))}" if self.output_size else "")
        )
        for path, reason in self.skipped[:_SHOW]:
            lines.append(f"    skipped {path}: {reason}")
        if len(self.skipped) > _SHOW:
            lines.append(f"    ... and {len(self.skipped) - _SHOW} more skipped")
        if self.classes:
            counts = ", ".join(f"{k}={v}" for k, v in self.classes.items())
            lines.append(f"  classes ({len(self.classes)}): {counts}")
        if self.has_captions:
            pct = 100.0 * self.captioned / max(self.used, 1)
            lines.append(f"  captions: {self.captioned}/{self.used} ({pct:.1f}%)")
            for path in self.missing_captions[:_SHOW]:
                lines.append(f"    missing caption: {path}")
            if len(self.missing_captions) > _SHOW:
                lines.append(f"    ... and {len(self.missing_captions) - _SHOW} more missing")
        if self.sizes:
            top = self.sizes.most_common(_SHOW)
            hist = ", ".join(f"{s}: {n}" for s, n in top)
            more = (
                f", ... ({len(self.sizes) - _SHOW} more sizes)" if len(self.sizes) > _SHOW else ""
            )
            lines.append(f"  sizes: {hist}{more}")
        if self.buckets:
            shown = ", ".join(f"{s}: {n}" for s, n in sorted(self.buckets.items()))
            lines.append(f"  buckets: {shown}")
        if self.token_limit is not None:
            lines.append(
                f"  captions truncated at the encoder's {self.token_limit} tokens: "
                f"{self.truncated_captions}"
            )
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)
