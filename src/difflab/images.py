"""Images out: tensors in [-1, 1] -> uint8, grids, PNGs that carry their generation parameters.

Owns ``to_uint8``, ``make_grid``, ``save_png`` / ``read_png_params`` (a PNG text chunk
``difflab`` holding every generation parameter as JSON, so any image can be reproduced, and
beside it AUTOMATIC1111's ``parameters`` chunk, whose text ``difflab.interop.a1111`` writes
and parses; ``read_png_parameters`` reads either), ``save_grid``, and the figures of plots
(``new_figure`` / ``save_figure``: matplotlib's object API on an Agg canvas, no pyplot and no
global backend change; written atomically).  Knows nothing of models or samplers.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from .runs import atomic_write_bytes

__all__ = [
    "A1111_KEY",
    "PNG_KEY",
    "make_grid",
    "new_figure",
    "png_bytes",
    "read_png_parameters",
    "read_png_params",
    "save_figure",
    "save_grid",
    "save_image",
    "save_png",
    "to_uint8",
]

PNG_KEY = "difflab"  # tEXt keyword of the generation-parameters chunk
A1111_KEY = "parameters"  # tEXt keyword AUTOMATIC1111's web UI writes and reads


def to_uint8(images: Tensor) -> np.ndarray:
    """``[N, C, H, W]`` (or ``[C, H, W]``) floats in [-1, 1] -> uint8 ``[N, H, W, C]``.

    Quantised as ``round((x + 1) * 127.5)`` after clamping, the rule FID code expects.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"images must be [N, C, H, W] with C in (1, 3, 4), got {tuple(images.shape)}"
        )
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pil(array: np.ndarray) -> Image.Image:
    """uint8 ``[H, W, C]`` -> PIL image (mode L, RGB or RGBA)."""
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def make_grid(
    images: Tensor, nrow: int | None = None, *, padding: int = 1, pad_value: int = 0
) -> Image.Image:
    """Tile ``images [N, C, H, W]`` in [-1, 1] into one PIL image, ``nrow`` images per row.

    ``nrow`` defaults to ``ceil(sqrt(N))``; ``padding`` pixels of ``pad_value`` separate the
    tiles and frame the grid.
    """
    arr = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = math.ceil(n / ncol)
    grid = np.full(
        (rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8
    )
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top : top + h, left : left + w] = arr[i]
    return _pil(grid)


def png_bytes(
    image: Image.Image,
    params: Mapping[str, Any] | None = None,
    *,
    size: tuple[int, int] | None = None,
) -> bytes:
    """``image`` encoded as PNG, with ``params`` as JSON in the ``difflab`` text chunk and,
    when they name a sampler, steps and seed, as A1111 text in the ``parameters`` chunk.

    :param size: ``(width, height)`` of one image for A1111's ``Size`` (a grid's tile);
        default ``image.size``.
    """
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text(PNG_KEY, json.dumps(dict(params), sort_keys=True, default=_jsonable))
        text = _a1111_text(params, size or image.size)
        if text is not None:
            info.add_text(A1111_KEY, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _a1111_text(params: Mapping[str, Any], size: tuple[int, int]) -> str | None:
    """A1111's ``parameters`` text for ``params`` (None when they lack sampler/steps/seed)."""
    from .interop.a1111 import can_format, format_parameters

    if not can_format(params):
        return None
    width, height = size
    return format_parameters({"width": width, "height": height, **params})


def save_png(
    image: Image.Image,
    path: str | Path,
    params: Mapping[str, Any] | None = None,
    *,
    size: tuple[int, int] | None = None,
) -> Path:
    """Write ``image`` as PNG, atomically (temp file + rename), with ``params`` in the
    ``difflab`` (JSON) and ``parameters`` (A1111) text chunks (``png_bytes``; ``size`` is
    one image's ``(width, height)``, default ``image.size``).  Returns the path written."""
    path = Path(path)
    atomic_write_bytes(path, png_bytes(image, params, size=size))  # honours the umask
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in PNG parameters")


def read_png_params(path: str | Path) -> dict[str, Any] | None:
    """The generation parameters stored by ``save_png`` (``None`` if the PNG has none)."""
    with Image.open(path) as img:
        text = getattr(img, "text", {}).get(PNG_KEY)
    return None if text is None else json.loads(text)


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """A PNG's generation parameters: difflab's JSON chunk if present, else its A1111
    ``parameters`` chunk parsed into difflab's names (``difflab.interop.a1111``).

    :raises FileNotFoundError: no such file.
    :raises ValueError: not a readable image, or an image with neither chunk.
    """
    from PIL import UnidentifiedImageError

    from .interop.a1111 import parse_parameters

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            chunks = dict(getattr(img, "text", None) or img.info)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image: {err}") from None
    if isinstance(chunks.get(PNG_KEY), str):
        try:
            return json.loads(chunks[PNG_KEY])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: its {PNG_KEY!r} text chunk is not JSON ({err})") from None
    if isinstance(chunks.get(A1111_KEY), str):
        return parse_parameters(chunks[A1111_KEY])
    raise ValueError(
        f"{path} holds no generation parameters: neither a {PNG_KEY!r} (difflab) nor a "
        f"{A1111_KEY!r} (AUTOMATIC1111) text chunk"
    )


def save_grid(
    images: Tensor,
    path: str | Path,
    nrow: int | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    padding: int = 1,
) -> Path:
    """``make_grid`` then ``save_png``: one PNG of ``images [N, C, H, W]`` in [-1, 1]."""
    size = (int(images.shape[-1]), int(images.shape[-2]))  # one tile, for A1111's Size
    return save_png(make_grid(images, nrow, padding=padding), path, params, size=size)


def save_image(image: Tensor, path: str | Path, params: Mapping[str, Any] | None = None) -> Path:
    """One image ``[C, H, W]`` in [-1, 1] as a PNG with its parameters."""
    return save_png(_pil(to_uint8(image)[0]), path, params)


def new_figure(n_rows: int, n_cols: int, width: float = 3.6, height: float = 2.8) -> Any:
    """A matplotlib ``(figure, axes[n_rows][n_cols])`` on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False)


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG atomically (a temporary file renamed into place)."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return path
