"""Image transforms: channel conversion, resize (shorter side), centre crop, random flip.

PIL in, float tensors ``[C, H, W]`` in [-1, 1] out.  Every random choice is drawn from a
``torch.Generator`` passed in, never from global state.  Knows nothing of models.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "ImageTransform",
    "center_crop",
    "convert_channels",
    "random_flip",
    "resize_shorter",
    "to_tensor",
]

_MODES = {1: "L", 3: "RGB"}


def convert_channels(img: Image.Image, channels: int) -> Image.Image:
    """Grayscale (``channels=1``, PIL's ITU-R 601 luma) or RGB (``channels=3``).

    Transparent images are composited on white first, so alpha does not turn into black.
    16-bit grayscale (PNG bit depth 16: PIL modes ``I;16*`` and ``I``) is scaled to 8 bits
    as ``round(v / 257)`` (65535 -> 255), not clipped as PIL's own conversion does.
    """
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert(_MODES[channels])


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (aspect kept; bicubic, antialiased by PIL)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(size, round(h * size / w)))
    else:
        new = (max(size, round(w * size / h)), size)
    return img.resize(new, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central ``size x size`` square (offsets rounded as torchvision does)."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from an image of {w}x{h}")
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> Tensor:
    """uint8 PIL image -> float32 ``[C, H, W]`` in [-1, 1] (x / 127.5 - 1)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def random_flip(x: Tensor, generator: torch.Generator | None, p: float = 0.5) -> Tensor:
    """Flip ``x [..., H, W]`` left-right with probability ``p``, drawn from ``generator``.

    A batch ``[B, C, H, W]`` gets one independent draw per sample.
    """
    if generator is None:
        raise ValueError("random_flip needs an explicit torch.Generator (no global RNG)")
    if x.ndim == 4:
        flip = torch.rand(x.shape[0], generator=generator) < p  # (B,)
        return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    if torch.rand((), generator=generator).item() < p:
        return x.flip(-1)
    return x


class ImageTransform:
    """channels -> resize (shorter side) -> centre crop (or squash) -> tensor -> flip.

    :param image_size: output side in pixels.
    :param channels: 1 (grayscale) or 3 (RGB).
    :param center_crop: resize the shorter side then crop the centre square; if False the
        image is resized to ``image_size x image_size`` directly (aspect not kept).
    :param random_flip: horizontal flip with probability 1/2 from the generator passed to
        ``__call__``.
    """

    def __init__(
        self, image_size: int, channels: int, *, center_crop: bool = True, random_flip: bool = False
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        convert_channels(Image.new("L", (1, 1)), channels)  # validates channels
        self.image_size = image_size
        self.channels = channels
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        img = convert_channels(img, self.channels)
        s = self.image_size
        if self.center_crop:
            img = center_crop(resize_shorter(img, s), s)
        elif img.size != (s, s):
            img = img.resize((s, s), Image.Resampling.BICUBIC)
        x = to_tensor(img)  # (C, s, s)
        return random_flip(x, generator) if self.random_flip else x

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, channels={self.channels}, "
            f"center_crop={self.center_crop}, random_flip={self.random_flip})"
        )
