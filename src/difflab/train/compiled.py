"""``torch.compile`` for training: where inductor caches the compiled network.

Owns the run's compile cache (``RUN/compile_cache``: inductor's FX-graph and AOTAutograd
caches, pointed there through ``TORCHINDUCTOR_CACHE_DIR`` while a trainer lives, so a resumed
run loads the compiled kernels instead of generating and building them again).  Every
difflab network traces as one graph (``tests/models/test_compile.py`` walks them through
``torch._dynamo.explain``).  Knows nothing of losses, data or optimisers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["COMPILE_CACHE", "inductor_cache"]

COMPILE_CACHE = "compile_cache"  # inside the run directory
_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@contextlib.contextmanager
def inductor_cache(folder: str | Path) -> Iterator[Path]:
    """Point inductor's on-disk caches at ``folder`` inside the block; the caller's setting
    (or its absence) is restored on exit.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it looks a compiled graph up or
    stores one, so kernels compiled lazily at the first step inside the block land there.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    before = os.environ.get(_CACHE_ENV)
    os.environ[_CACHE_ENV] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop(_CACHE_ENV, None)
        else:
            os.environ[_CACHE_ENV] = before
