"""An LPIPS-style perceptual distance (Zhang et al. 2018) from a local feature network.

Owns :class:`PerceptualLoss` and its file format.  LDM's autoencoder adds LPIPS to the pixel
loss (Rombach et al. 2022, appendix G); LPIPS needs an ImageNet-trained network, which
difflab never downloads, so the network comes from a local safetensors file:

* ``stages.{i}.{j}.weight`` ``[C_out, C_in, k, k]`` and ``stages.{i}.{j}.bias`` ``[C_out]``:
  convolution ``j`` of stage ``i`` (padding ``k // 2``, stride 1), each followed by ReLU;
  stages after the first begin with a 2x2 pooling (max, or average when the file's metadata
  has ``"pool": "avg"``).  The output of every stage is a tap — VGG-16's five blocks are
  LPIPS's relu1_2 ... relu5_3.
* ``lin.{i}.weight`` ``[C_i]`` (optional): non-negative weights of tap ``i``'s channels
  (LPIPS's learned 1x1 "lin" layers); missing ones are all ones.
* ``shift`` / ``scale`` ``[C]`` (optional): the input is ``(x - shift) / scale`` first.

``d(x, y) = Σ_i mean_hw Σ_c w_ic (f̂_i(x) - f̂_i(y))²_chw`` with ``f̂ = f / (||f||_c + 1e-10)``
(features unit-normalised over channels), one distance per image.  One-channel images are
repeated to the network's three channels.  The network is frozen; gradients flow to the
images.  Knows nothing of training.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PerceptualLoss"]

_KEY = re.compile(r"stages\.(\d+)\.(\d+)\.(weight|bias)|lin\.(\d+)\.weight|shift|scale")


def _unit(f: Tensor) -> Tensor:
    """Features normalised to unit length over channels (LPIPS's ``normalize_tensor``)."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance ``[B]`` between image batches ``[B, C, H, W]`` in [-1, 1].

    :param stages: per stage, its ``(weight, bias)`` convolutions (see the module doc).
    :param lin: per tap, channel weights ``[C_i]`` (None: ones).
    :param pool: ``max`` or ``avg`` pooling between stages.
    """

    shift: Tensor  # buffers [C]: images are compared as (x - shift) / scale
    scale: Tensor

    def __init__(
        self,
        stages: list[list[tuple[Tensor, Tensor]]],
        lin: list[Tensor | None] | None = None,
        *,
        pool: str = "max",
        shift: Tensor | None = None,
        scale: Tensor | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"unknown pooling {pool!r} (choices: max, avg)")
        self.pool = pool
        self.convs = nn.ModuleList()
        for convs in stages:
            stage = nn.ModuleList()
            for weight, bias in convs:
                with torch.random.fork_rng(devices=[]):  # the init is overwritten below
                    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1],
                                     padding=weight.shape[-1] // 2)  # fmt: skip
                with torch.no_grad():
                    conv.weight.copy_(weight)
                    assert conv.bias is not None  # built with bias=True
                    conv.bias.copy_(bias)
                stage.append(conv)
            self.convs.append(stage)
        widths = [int(s[-1][0].shape[0]) for s in stages]
        lin = lin or [None] * len(stages)
        for i, (w, c) in enumerate(zip(lin, widths)):
            w = torch.ones(c) if w is None else w.float()
            if w.shape != (c,) or bool((w < 0).any()):
                raise ValueError(f"lin.{i}.weight must be {c} non-negative weights, got {w}")
            self.register_buffer(f"lin{i}", w)
        self.in_channels = int(stages[0][0][0].shape[1])
        self.register_buffer("shift", torch.zeros(self.in_channels) if shift is None else shift)
        self.register_buffer("scale", torch.ones(self.in_channels) if scale is None else scale)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | Path) -> PerceptualLoss:
        """Read the network from a local safetensors file (the module doc's format)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual weights {str(path)!r} do not exist")
        tensors: dict[str, Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensors[key] = f.get_tensor(key).float()
        except Exception as err:  # SafetensorError: truncated or foreign
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
        odd = sorted(k for k in tensors if not _KEY.fullmatch(k))
        if odd or not any(k.startswith("stages.") for k in tensors):
            raise ValueError(
                f"{path}: expected stages.I.J.weight/bias, lin.I.weight, shift, scale keys "
                f"(an LPIPS-style feature network); got {odd[:4] or 'no stages'}"
            )
        stages: list[list[tuple[Tensor, Tensor]]] = []
        for i in range(1 + max(int(k.split(".")[1]) for k in tensors if k[:6] == "stages")):
            convs, j = [], 0
            while f"stages.{i}.{j}.weight" in tensors:
                bias = tensors.get(f"stages.{i}.{j}.bias")
                if bias is None:
                    raise ValueError(f"{path}: stages.{i}.{j}.bias is missing")
                convs.append((tensors[f"stages.{i}.{j}.weight"], bias))
                j += 1
            if not convs:
                raise ValueError(f"{path}: stage {i} has no stages.{i}.0.weight")
            stages.append(convs)
        lin = [tensors.get(f"lin.{i}.weight") for i in range(len(stages))]
        return cls(stages, lin, pool=meta.get("pool", "max"), shift=tensors.get("shift"),
                   scale=tensors.get("scale"))  # fmt: skip

    def features(self, x: Tensor) -> list[Tensor]:
        """The taps: every stage's output for images ``x [B, C, H, W]``."""
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"the perceptual network takes {self.in_channels}-channel images, got "
                f"{x.shape[1]} channels"
            )
        h = (x.float() - self.shift[:, None, None]) / self.scale[:, None, None]
        taps = []
        for i, stage in enumerate(self.convs):
            if i:
                h = F.max_pool2d(h, 2) if self.pool == "max" else F.avg_pool2d(h, 2)
            for conv in stage.children():  # a ModuleList of Conv2d
                h = F.relu(conv(h))
            taps.append(h)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``d(x, y)`` per image ``[B]`` (float32)."""
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for i, (fx, fy) in enumerate(zip(self.features(x), self.features(y))):
            w = getattr(self, f"lin{i}")[:, None, None]  # (C_i, 1, 1)
            total = total + (w * (_unit(fx) - _unit(fy)) ** 2).sum(1).mean((1, 2))
        return total
