"""Trainable LoHa and LoKr adapters: LyCORIS' algorithms for ``difflab finetune --adapter``.

Owns :class:`LoHaLayer` and :class:`LoKrLayer`, the shapes and initialisation of their
factors (LyCORIS' own, so its files and these layers hold the same tensors) and LyCORIS'
rule for splitting a dimension into two Kronecker factors (:func:`lokr_factorization`).
It does not own the update ``ΔW`` they add — that is
:func:`difflab.finetune.lycoris.adapter_delta`, the one home of the formulas, which also
reads these adapters from other tools' files — nor the multiplier, fuse / unfuse, removal
or the adapter file: the layers subclass :class:`~difflab.finetune.lora.LoRALayer`, so
``lora_layers``, ``set_lora_scale``, ``fuse_lora``, ``save_lora`` / ``load_lora`` and
``save_kohya`` handle them as they handle LoRA.

- LoHa (Hyeon-Woo et al. 2022, "FedPara", eq. 2): ``ΔW = (α/r) (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``,
  each product of rank ``r``, so ``ΔW`` has rank up to ``r²``. A convolution's factors are
  flattened over its kernel, ``w*_b`` being ``(r, in·kh·kw)``. LyCORIS' initialisation:
  ``w1_a``, ``w2_a`` normal with std 0.1 and 0 — the zero factor makes ``ΔW = 0`` — and
  ``w1_b``, ``w2_b`` normal with std 1.
- LoKr (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning
  to Model Evaluation", sec. 3): ``ΔW = s · kron(w1, w2)`` with ``in = in_m · in_n`` and
  ``out = out_l · out_k`` split by :func:`lokr_factorization`, ``w1`` ``(out_l, in_m)`` and
  ``w2`` ``(out_k, in_n, kh, kw)``. ``w2`` is stored as ``w2_a @ w2_b`` (``(out_k, r)``,
  ``(r, in_n·kh·kw)``) when ``r < max(out_k, in_n) / 2``, and ``s = α/r`` then; with both
  factors whole, ``s = 1`` whatever ``α`` (LyCORIS' rule). Initialisation: ``w1`` and ``w2_a``
  uniform in ``±1/√fan_in`` (PyTorch's default), ``w2`` / ``w2_b`` zero, so ``ΔW = 0``.

A layer computes ``base(x) + m · op(x, ΔW)`` with ``op`` the base's own product or
convolution (LyCORIS' dense, non-bypass form).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layer import LoRALayer, _features, uniform_fan_in
from .lycoris import adapter_delta, base_op

__all__ = ["LoHaLayer", "LoKrLayer", "factor_shapes", "lokr_factorization"]


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split ``dimension = m · n``, ``m ≤ n``: ``(factor, dimension / factor)``
    when ``factor`` divides it; otherwise the divisors ``m`` are walked upwards while
    ``m ≤ factor`` (``-1``: no bound) until one reaches ``√dimension``, the last one taken.

    E.g. ``128 -> (8, 16)``, ``127 -> (1, 127)``, ``(128, factor=4) -> (4, 32)``.
    """
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    bound = dimension if factor < 0 else min(factor, dimension)
    m = 1
    for d in range(2, bound + 1):
        if dimension % d == 0:
            m = d
            if d * d >= dimension:
                break
    return min(m, dimension // m), max(m, dimension // m)


def _kernel(base: nn.Module) -> tuple[int, ...]:
    return tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()


def factor_shapes(
    kind: str, base: nn.Module, rank: int, factor: int = -1
) -> dict[str, tuple[int, ...]]:
    """The LyCORIS tensors of a ``"loha"`` or ``"lokr"`` adapter of ``rank`` on ``base``
    (``factor``: LoKr's), by name, with their shapes (see the module docstring)."""
    fan_in, fan_out = _features(base)
    kernel = _kernel(base)
    if kind == "loha":
        flat_in = fan_in * math.prod(kernel)
        return {"hada_w1_a": (fan_out, rank), "hada_w1_b": (rank, flat_in),
                "hada_w2_a": (fan_out, rank), "hada_w2_b": (rank, flat_in)}  # fmt: skip
    if kind != "lokr":
        raise ValueError(f"unknown LyCORIS adapter kind {kind!r} (choices: loha, lokr)")
    in_m, in_n = lokr_factorization(fan_in, factor)
    out_l, out_k = lokr_factorization(fan_out, factor)
    shapes: dict[str, tuple[int, ...]] = {"lokr_w1": (out_l, in_m)}
    if rank >= max(out_k, in_n) / 2:  # the rank would not make w2 smaller: keep it whole
        shapes["lokr_w2"] = (out_k, in_n, *kernel)
    else:
        shapes["lokr_w2_a"] = (out_k, rank)
        shapes["lokr_w2_b"] = (rank, in_n * math.prod(kernel))
    return shapes


class _DenseAdapter(LoRALayer):
    """A :class:`LoRALayer` whose update ``ΔW`` is rebuilt from LyCORIS-named parameters by
    ``adapter_delta`` and applied through the base's own operation."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        factor: int = -1,
        generator: torch.Generator | None = None,
    ) -> None:
        nn.Module.__init__(self)
        fan_in, fan_out = _features(base)
        self._setup(base, rank, alpha, max_rank=max(fan_in, fan_out))
        if factor != -1 and factor < 1:
            raise ValueError(f"the LoKr factor must be -1 (automatic) or >= 1, got {factor}")
        self.factor = int(factor)
        self._names: list[str] = []
        weight = self.base.weight
        for name, shape in factor_shapes(self.kind, base, rank, factor).items():
            value = self._initial(name, shape, generator).to(weight.device, weight.dtype)
            self.register_parameter(name, nn.Parameter(value))
            self._names.append(name)

    def _initial(self, name: str, shape: tuple[int, ...], gen: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def factors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._names}

    def delta_weight(self) -> Tensor:
        """``m · ΔW`` (``adapter_delta`` of the factors and ``α``), shaped like the weight."""
        tensors = {**self.factors(), "alpha": torch.tensor(self.alpha)}
        delta = adapter_delta(self.kind, tensors).reshape(self.base.weight.shape)
        return delta * self.multiplier

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.fused or self.multiplier == 0.0:
            return out
        return out + base_op(self.base, x, self.delta_weight().to(x.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, " + ", ".join(
            f"{name}={tuple(getattr(self, name).shape)}" for name in self._names
        )


class LoHaLayer(_DenseAdapter):
    """LoHa (FedPara's Hadamard product of two rank-``r`` products) on a ``Linear`` or
    ``Conv2d``; ``α`` defaults to ``r`` (scale 1)."""

    kind = "loha"
    label = "LoHa"

    def _initial(self, name: str, shape: tuple[int, ...], gen: torch.Generator | None) -> Tensor:
        if name == "hada_w2_a":  # LyCORIS: the zero factor, so ΔW starts at 0
            return torch.zeros(shape)
        std = 0.1 if name == "hada_w1_a" else 1.0
        return torch.randn(shape, generator=gen) * std

    @property
    def scale(self) -> float:
        """``m · α / r``."""
        return self.multiplier * self.alpha / self.rank


class LoKrLayer(_DenseAdapter):
    """LoKr (a Kronecker product ``w1 ⊗ w2``, ``w2`` low-rank when ``r`` is small) on a
    ``Linear`` or ``Conv2d``; ``factor`` bounds the smaller side of each split
    (:func:`lokr_factorization`)."""

    kind = "lokr"
    label = "LoKr"

    def _initial(self, name: str, shape: tuple[int, ...], gen: torch.Generator | None) -> Tensor:
        if name in ("lokr_w2", "lokr_w2_b"):  # LyCORIS: the zero factor, so ΔW starts at 0
            return torch.zeros(shape)
        return uniform_fan_in(shape, gen)

    @property
    def scale(self) -> float:
        """``m · α / r`` with ``w2`` decomposed, ``m`` with both factors whole (LyCORIS)."""
        return self.multiplier * (1.0 if "lokr_w2" in self._names else self.alpha / self.rank)
