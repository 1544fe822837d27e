"""The adapter layer every kind subclasses: :class:`LoRALayer` (Hu et al. 2021, eq. 3; rsLoRA,
DoRA), the initialisation helper its factors share, and :func:`lora_layers`.

A bottom module of ``difflab.finetune``: ``lora`` (wrapping, the file, fuse/unfuse), ``lycoris``
(other tools' files) and ``loha_lokr`` (LyCORIS' LoHa/LoKr layers) all import it, and it
imports none of them, so the three never import one another in a circle.  The formulas and
the file layout are described in :mod:`difflab.finetune.lora`, which re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LoRALayer", "lora_layers", "uniform_fan_in"]


class LoRALayer(nn.Module):
    """A linear or 2-d convolution layer plus a low-rank update (see the module docstring).

    :param base: the ``nn.Linear`` or ``nn.Conv2d`` to adapt; its weights are frozen.
    :param rank: ``r``, at most ``min(in, out)`` features.
    :param alpha: ``α``; the update is scaled by ``α / r`` (``α / √r`` with ``rslora``).
    :param dora: weight-decomposed LoRA (a trained magnitude per output unit).
    :param generator: draws the ``down`` initialisation (PyTorch's Linear default,
        uniform in ``±1/√fan_in``); ``up`` starts at zero.
    """

    kind = "lora"
    label = "LoRA"
    lora_magnitude: nn.Parameter | None  # DoRA's trained magnitude (set by _setup / __init__)

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        rslora: bool = False,
        dora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        fan_in, fan_out = _features(base)
        self._setup(base, rank, alpha, max_rank=min(fan_in, fan_out))
        self.rslora = bool(rslora)
        base = self.base
        like: dict[str, Any] = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_down: nn.Linear | nn.Conv2d
        self.lora_up: nn.Linear | nn.Conv2d
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(fan_in, rank, bias=False, **like)
            self.lora_up = nn.Linear(rank, fan_out, bias=False, **like)
        else:
            # torch's stubs type Conv2d's kernel_size/stride/padding/dilation attributes as
            # tuple[int, ...] but its constructor's arguments as tuple[int, int].
            self.lora_down = nn.Conv2d(
                fan_in, rank, base.kernel_size, base.stride, base.padding, base.dilation,  # type: ignore[arg-type]
                bias=False, padding_mode=base.padding_mode, **like,
            )  # fmt: skip
            self.lora_up = nn.Conv2d(rank, fan_out, 1, bias=False, **like)
        with torch.no_grad():
            self.lora_down.weight.copy_(uniform_fan_in(self.lora_down.weight.shape, generator))
            self.lora_up.weight.zero_()
        self.dora = bool(dora)
        if self.dora:
            self.lora_magnitude = nn.Parameter(self._base_norm())

    def _setup(self, base: nn.Module, rank: int, alpha: float | None, max_rank: int) -> None:
        """What every adapter layer holds: the frozen base, ``r``, ``α``, the multiplier and
        the fuse state (``rslora`` / ``dora`` off)."""
        base = _layer(base)
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(f"{self.label} on grouped convolutions is not supported")
        fan_in, fan_out = _features(base)
        if not 1 <= rank <= max_rank:
            raise ValueError(
                f"{self.label} rank must be in 1..{max_rank} for a {fan_in}->{fan_out} "
                f"layer, got {rank}"
            )
        self.base: nn.Linear | nn.Conv2d = base.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.rslora = False
        self.dora = False
        self.lora_magnitude = None
        self.multiplier = 1.0
        self.fused = False
        self._unfused_weight: Tensor | None = None

    def factors(self) -> dict[str, Tensor]:
        """The trained tensors under their file names (``lora_down.weight``, ...; LoHa / LoKr:
        LyCORIS' ``hada_*`` / ``lokr_*``), plus ``lora_magnitude`` for DoRA."""
        out = {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}
        if self.lora_magnitude is not None:
            out["lora_magnitude"] = self.lora_magnitude
        return out

    def _base_norm(self) -> Tensor:
        """``‖W0‖`` per output unit (over its inputs and kernel taps)."""
        return self.base.weight.detach().flatten(1).norm(dim=1)

    def _dora_factor(self, weight: Tensor) -> Tensor:
        """``mag(m) / ‖weight‖`` per output unit, with ``mag(m) = ‖W0‖ + m (mag - ‖W0‖)``."""
        assert self.lora_magnitude is not None
        base = self._base_norm()
        magnitude = base + self.multiplier * (self.lora_magnitude - base)
        return magnitude / weight.flatten(1).norm(dim=1)

    @property
    def scale(self) -> float:
        """``m · α / r`` (``m · α / √r`` with rslora)."""
        denom = math.sqrt(self.rank) if self.rslora else self.rank
        return self.multiplier * self.alpha / denom

    def delta_weight(self) -> Tensor:
        """The dense update ``scale · up @ down``, shaped like ``base.weight``."""
        up = self.lora_up.weight.flatten(1)  # (out, r)
        down = self.lora_down.weight  # (r, in) or (r, in, kh, kw)
        delta = (up @ down.flatten(1)).view(self.base.weight.shape)
        return delta * self.scale

    def merged_weight(self) -> Tensor:
        """The adapted weight the layer applies: ``W0 + ΔW`` (DoRA: rescaled per unit)."""
        weight = self.base.weight + self.delta_weight()
        if self.dora:
            shape = (-1,) + (1,) * (weight.dim() - 1)
            weight = weight * self._dora_factor(weight).view(shape)
        return weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.fused or self.multiplier == 0.0:
            return out
        update = self.lora_up(self.lora_down(x)) * self.scale
        if not self.dora:
            return out + update
        # mag/‖V‖ · (W0 x + ΔW x) + b, the norm detached (DoRA sec. 4.3).
        factor = self._dora_factor((self.base.weight + self.delta_weight()).detach())
        shape = (-1,) if isinstance(self.base, nn.Linear) else (-1, 1, 1)
        bias = 0.0 if self.base.bias is None else self.base.bias.view(shape)
        return (out - bias + update) * factor.view(shape) + bias

    @torch.no_grad()
    def fuse(self) -> None:
        """Add the update into ``base.weight`` (the unfused weight is kept for unfuse)."""
        if self.fused:
            return
        merged = self.merged_weight().to(self.base.weight.dtype)
        self._unfused_weight = self.base.weight.detach().clone()
        self.base.weight.copy_(merged)
        self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore the base weight exactly as it was before :meth:`fuse`."""
        if not self.fused:
            return
        assert self._unfused_weight is not None
        self.base.weight.copy_(self._unfused_weight)
        self._unfused_weight = None
        self.fused = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, rslora={self.rslora}, dora={self.dora}"


def uniform_fan_in(shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
    """PyTorch's Linear / Conv default (kaiming uniform, ``a = √5``): uniform in
    ``±1/√fan_in`` with ``fan_in`` = the product of ``shape[1:]``."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return torch.empty(tuple(shape)).uniform_(-bound, bound, generator=generator)


def _layer(module: nn.Module) -> nn.Linear | nn.Conv2d:
    """``module`` itself when it is a layer LoRA adapts; a TypeError for any other."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"LoRA adapts nn.Linear and nn.Conv2d, not {type(module).__name__}")
    return module


def _features(module: nn.Module) -> tuple[int, int]:
    """``(fan_in, fan_out)``: features of a Linear, channels of a Conv2d."""
    layer = _layer(module)
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """``(module name, layer)`` for every LoRA layer of ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALayer):
            yield name, mod
