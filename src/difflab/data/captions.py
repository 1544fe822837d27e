"""Captions as the Stable Diffusion fine-tuning trainers (kohya-ss sd-scripts) treat them.

Owns caption cleaning (HTML entities, URLs, unicode NFC, repeated whitespace), the per-access
caption transform (caption dropout, tag shuffling that keeps the first ``keep_tokens`` tags
in place — kohya's ``--shuffle_caption`` / ``--keep_tokens`` / ``--caption_dropout_rate``)
and the count of captions longer than a text encoder's token limit.  Every random choice is
drawn from a ``torch.Generator`` passed in.  Knows nothing of models.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable, Iterable

import torch

__all__ = ["CAPTION_EXTENSIONS", "CaptionTransform", "clean_caption", "count_truncated"]

CAPTION_EXTENSIONS = (".txt", ".caption")  # sidecar files, looked for in this order
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """HTML entities decoded (``&amp;`` -> ``&``, twice for ``&amp;quot;``), URLs removed,
    unicode NFC, runs of whitespace as one space, trimmed.

    >>> clean_caption("a  cat &amp; a dog\\n see https://x.org/a.png ")
    'a cat & a dog see'
    """
    text = html.unescape(html.unescape(text))
    text = _URL.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    return _SPACE.sub(" ", text).strip()


def count_truncated(texts: Iterable[str], length: Callable[[str], int], limit: int) -> int:
    """How many of ``texts`` are longer than ``limit`` tokens by ``length`` (the encoder's
    tokenizer, special tokens included)."""
    return sum(length(t) > limit for t in texts)


class CaptionTransform:
    """Applied to a caption each time its image is read.

    :param dropout: probability the whole caption becomes ``""`` (the unconditional prompt).
    :param shuffle_tags: shuffle the comma-separated tags.
    :param keep_tokens: the first this many tags stay in place (a trigger word, a class).
    """

    def __init__(
        self, *, dropout: float = 0.0, shuffle_tags: bool = False, keep_tokens: int = 0
    ) -> None:
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1], got {dropout!r}")
        if keep_tokens < 0:
            raise ValueError(f"data.keep_tokens must be >= 0, got {keep_tokens!r}")
        self.dropout, self.shuffle_tags, self.keep_tokens = dropout, shuffle_tags, keep_tokens

    @property
    def active(self) -> bool:
        """Whether it changes anything (and draws from the generator)."""
        return self.dropout > 0 or self.shuffle_tags

    def __call__(self, text: str, generator: torch.Generator | None) -> str:
        if not self.active:
            return text
        if generator is None:
            raise ValueError("CaptionTransform needs an explicit torch.Generator (no global RNG)")
        if self.dropout > 0 and torch.rand((), generator=generator).item() < self.dropout:
            return ""
        if not self.shuffle_tags:
            return text
        tags = [t.strip() for t in text.split(",") if t.strip()]
        head, tail = tags[: self.keep_tokens], tags[self.keep_tokens :]
        order = torch.randperm(len(tail), generator=generator).tolist()
        return ", ".join(head + [tail[i] for i in order])
