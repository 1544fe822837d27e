"""The one progress bar every loop shows (sampling, training, bits/dim).

Owns ``progress``: a tqdm bar that switches off when stderr is not a terminal.  A bottom
layer: it imports nothing of difflab, so ``diffusion``, ``samplers`` and ``train`` all use it
without importing one another.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress"]

T = TypeVar("T")


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    disable: bool | None = None,
    leave: bool = False,
) -> Iterable[T]:
    """A tqdm progress bar that is off when stderr is not a terminal (logs stay clean);
    ``leave=True`` keeps the finished bar on screen (training)."""
    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=leave)
