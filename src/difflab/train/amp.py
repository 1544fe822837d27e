"""Mixed precision: which autocast dtype and whether a gradient scaler is needed.

Owns the choice ``no | bf16 | fp16`` per device: bf16 autocast works on CPU and CUDA; fp16
autocast with ``torch.amp.GradScaler`` is meant for CUDA. On other devices fp16 falls back to
bf16 with a warning: PyTorch's CPU fp16 convolutions run a reference kernel, about 360x
slower than bf16 (64-channel 3x3 conv, 16x16, one thread). The fp16 + GradScaler code path
itself is device-independent and is tested on CPU (``tests/train/test_fp16.py``).
Knows nothing of models or losses.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .._validate import check_choice
from .config import MIXED_PRECISIONS

__all__ = ["Precision", "resolve_precision"]


@dataclass(frozen=True)
class Precision:
    """The resolved mixed-precision mode for one device.

    :param mode: "no", "bf16" or "fp16" (after any fallback).
    :param device_type: "cpu" or "cuda" (autocast's ``device_type``).
    """

    mode: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        """Autocast dtype, None when running in float32."""
        return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling (Micikevicius et al. 2018)."""
        return self.mode == "fp16"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast context for the forward pass (a no-op in float32)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for fp16 (disabled ones pass gradients through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """Pick the precision for ``device``; fp16 off CUDA falls back to bf16 with a warning."""
    check_choice("mixed_precision", mode, MIXED_PRECISIONS)
    device_type = torch.device(device).type
    if mode == "fp16" and device_type != "cuda":
        warnings.warn(
            f"mixed_precision='fp16' needs CUDA (fp16 convolutions on {device_type} are "
            f"hundreds of times slower than bf16); using bf16 on {device_type}",
            stacklevel=2,
        )
        mode = "bf16"
    if mode == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16; training in float32", stacklevel=2)
        mode = "no"
    return Precision(mode, device_type)
