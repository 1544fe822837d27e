"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Owns the adapter itself: wrapping a network's linear and convolution layers
(:func:`add_lora`), the adapter file (:func:`save_lora` / :func:`load_lora`), the strength
multiplier, fusing into and unfusing from the base weights, and removing the wrappers.

A wrapped layer computes ``base(x) + m · (α / r) · up(down(x))`` (Hu et al. eq. 3) with a
rank-``r`` ``down`` (for a convolution: the base's kernel, stride and padding, as LoCon does)
and a 1x1 ``up`` that starts at zero, so a fresh adapter leaves the network unchanged.
``rslora`` scales by ``α / √r`` instead (Kalajdzievski 2023, rank-stabilised LoRA).
``m`` is the user's multiplier: 0 gives the base network exactly.

``dora`` (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5) splits
each output unit's weight into a trained magnitude and a direction:
``W' = mag · (W0 + ΔW) / ‖W0 + ΔW‖`` (norm per output unit over its inputs; ``mag`` starts at
``‖W0‖``, so a fresh adapter is the identity), with the norm treated as a constant in the
backward pass as the paper recommends (sec. 4.3). The multiplier scales ``ΔW`` and the
magnitude's change ``mag - ‖W0‖`` alike, so 0 is again the base network.

The file is safetensors: ``<module>.lora_down.weight`` / ``<module>.lora_up.weight`` per
layer (plus ``<module>.lora_magnitude`` for DoRA), and metadata ``format``
(``difflab-lora/1``), ``rank``, ``alpha``, ``rslora``, ``dora`` and ``modules``. Loading
is loud (USER_NEEDS 6): every module of the file must exist in the network with matching
shapes, or nothing is applied and the error lists what did not fit.

The maths is a few lines, so it is written here rather than taken from ``peft``: wrapping
keeps the U-Net's own module names and the file stays a plain, documented layout.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "LORA_FILE",
    "LORA_FORMAT",
    "LoRALayer",
    "LoRAReport",
    "add_lora",
    "fuse_lora",
    "load_lora",
    "lora_layers",
    "lora_state_dict",
    "remove_lora",
    "save_lora",
    "set_lora_scale",
    "unfuse_lora",
]

LORA_FORMAT = "difflab-lora/1"
LORA_FILE = "lora.safetensors"  # the adapter a `difflab finetune` run writes (EMA weights)
# Named target sets: "attention" = every linear layer of the attention blocks (ADM
# self-attention, LDM transformer blocks and DiT blocks: attention, MLP and adaLN
# modulation); "conv" = the residual blocks' convolutions.
TARGET_SETS = ("attention", "conv", "attention+conv")


class LoRALayer(nn.Module):
    """A linear or 2-d convolution layer plus a low-rank update (see the module docstring).

    :param base: the ``nn.Linear`` or ``nn.Conv2d`` to adapt; its weights are frozen.
    :param rank: ``r``, at most ``min(in, out)`` features.
    :param alpha: ``α``; the update is scaled by ``α / r`` (``α / √r`` with ``rslora``).
    :param dora: weight-decomposed LoRA (a trained magnitude per output unit).
    :param generator: draws the ``down`` initialisation (PyTorch's Linear default,
        uniform in ``±1/√fan_in``); ``up`` starts at zero.
    """

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
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRA adapts nn.Linear and nn.Conv2d, not {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        fan_in, fan_out = _features(base)
        if not 1 <= rank <= min(fan_in, fan_out):
            raise ValueError(
                f"LoRA rank must be in 1..{min(fan_in, fan_out)} for a {fan_in}->{fan_out} "
                f"layer, got {rank}"
            )
        self.base = base.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.rslora = bool(rslora)
        self.multiplier = 1.0
        self.fused = False
        self._unfused_weight: Tensor | None = None
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(base, nn.Linear):
            self.lora_down: nn.Module = nn.Linear(fan_in, rank, bias=False, **like)
            self.lora_up: nn.Module = nn.Linear(rank, fan_out, bias=False, **like)
        else:
            self.lora_down = nn.Conv2d(
                fan_in, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                bias=False, padding_mode=base.padding_mode, **like,
            )  # fmt: skip
            self.lora_up = nn.Conv2d(rank, fan_out, 1, bias=False, **like)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.lora_down.weight[0].numel())
            w = torch.empty(self.lora_down.weight.shape).uniform_(
                -bound, bound, generator=generator
            )
            self.lora_down.weight.copy_(w)
            self.lora_up.weight.zero_()
        self.dora = bool(dora)
        self.lora_magnitude: nn.Parameter | None = None
        if self.dora:
            self.lora_magnitude = nn.Parameter(self._base_norm())

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


def _features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _target_names(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the layers ``targets`` selects: a named set (``TARGET_SETS``) or fnmatch
    patterns over module names (e.g. ``["*.to_q", "*.to_kv"]``)."""
    from ..models.dit import DiTBlock
    from ..models.layers import AttentionBlock, SpatialTransformer
    from ..models.unet import ResBlock

    adaptable = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and name
    }
    if isinstance(targets, str) and targets in TARGET_SETS:
        kinds = targets.split("+")
        chosen = []
        for name, mod in model.named_modules():
            attention = isinstance(mod, (AttentionBlock, SpatialTransformer, DiTBlock))
            if ("attention" in kinds and attention) or (
                "conv" in kinds and isinstance(mod, ResBlock)
            ):
                want = nn.Linear if attention else nn.Conv2d
                chosen += [
                    f"{name}.{sub}" for sub, layer in mod.named_modules()
                    if sub and isinstance(layer, want)
                ]  # fmt: skip
        names = sorted(set(chosen) & set(adaptable), key=list(adaptable).index)
    else:
        if isinstance(targets, str):
            raise ValueError(
                f"unknown LoRA target set {targets!r} (choices: {', '.join(TARGET_SETS)}, or a "
                "list of module-name patterns such as ['*.to_q', '*.qkv'])"
            )
        names = [n for n in adaptable if any(fnmatch.fnmatchcase(n, p) for p in targets)]
    if not names:
        examples = ", ".join(list(adaptable)[:6])
        raise ValueError(
            f"LoRA targets {targets!r} match no linear or conv layer of this network "
            f"(its layers include: {examples}, ...)"
        )
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    targets: str | Sequence[str] = "attention",
    *,
    rslora: bool = False,
    dora: bool = False,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Wrap the layers ``targets`` selects in :class:`LoRALayer` and freeze everything else.

    :param targets: ``"attention"``, ``"conv"``, ``"attention+conv"`` or fnmatch patterns
        over module names.
    :return: the wrapped module names, in network order.
    :raises ValueError: nothing matches, a layer is already wrapped, or a bad rank.
    """
    names = _target_names(model, targets)
    model.requires_grad_(False)
    for name in names:
        if isinstance(model.get_submodule(name.rpartition(".")[0] or ""), LoRALayer):
            raise ValueError(f"{name} is already inside a LoRA layer; remove_lora() first")
        _set_module(
            model,
            name,
            LoRALayer(
                model.get_submodule(name),
                rank,
                alpha,
                rslora=rslora,
                dora=dora,
                generator=generator,
            ),  # fmt: skip
        )
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """``(module name, layer)`` for every LoRA layer of ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALayer):
            yield name, mod


def _require_lora(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("this network has no LoRA layers (add_lora or load_lora first)")
    return layers


def set_lora_scale(model: nn.Module, multiplier: float) -> None:
    """Set the user multiplier ``m`` of every LoRA layer (0 = the base network exactly)."""
    for _, layer in _require_lora(model):
        if layer.fused:
            raise ValueError("unfuse_lora() before changing the scale of a fused adapter")
        layer.multiplier = float(multiplier)


def fuse_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (no extra cost per call afterwards)."""
    for _, layer in _require_lora(model):
        layer.fuse()


def unfuse_lora(model: nn.Module) -> None:
    """Undo :func:`fuse_lora`: the base weights are restored bit for bit."""
    for _, layer in _require_lora(model):
        layer.unfuse()


def remove_lora(model: nn.Module) -> list[str]:
    """Replace every LoRA layer by its (unfused) base layer; returns the module names."""
    names = []
    for name, layer in list(lora_layers(model)):
        layer.unfuse()
        _set_module(model, name, layer.base)
        names.append(name)
    return names


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"<module>.lora_down.weight": ..., "<module>.lora_up.weight": ...}``."""
    out = {}
    for name, layer in _require_lora(model):
        out[f"{name}.lora_down.weight"] = layer.lora_down.weight.detach()
        out[f"{name}.lora_up.weight"] = layer.lora_up.weight.detach()
        if layer.lora_magnitude is not None:
            out[f"{name}.lora_magnitude"] = layer.lora_magnitude.detach()
    return out


def save_lora(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the adapter as safetensors with its rank, alpha and modules (atomically)."""
    from safetensors.torch import save

    from ..runs import atomic_write_bytes

    layers = _require_lora(model)
    first = layers[0][1]
    meta = {
        **(metadata or {}),
        "format": LORA_FORMAT,
        "rank": str(first.rank),
        "alpha": repr(first.alpha),
        "rslora": json.dumps(first.rslora),
        "dora": json.dumps(first.dora),
        "modules": json.dumps([name for name, _ in layers]),
    }
    tensors = {k: v.float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


@dataclass
class LoRAReport:
    """What :func:`load_lora` did: applied module names, and what did not fit."""

    applied: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # in the file, not in the network
    mismatched: list[str] = field(default_factory=list)  # shapes that do not fit
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"LoRA: {len(self.applied)} layers applied"]
        if self.unmatched:
            lines.append(f"  not in this network: {', '.join(self.unmatched)}")
        if self.mismatched:
            lines.append(f"  shape mismatch: {', '.join(self.mismatched)}")
        return "\n".join(lines)


def load_lora(
    model: nn.Module, path: str | Path, *, scale: float = 1.0, strict: bool = True
) -> LoRAReport:
    """Apply an adapter file to ``model`` (wrapping its layers where needed).

    Everything is checked before anything changes: with ``strict`` (the default) any module
    of the file missing from the network, any shape mismatch or any foreign key raises a
    ValueError listing them all; with ``strict=False`` the fitting layers are applied and the
    report lists the rest.
    """
    meta, state = read_tagged(path, LORA_FORMAT, "LoRA file")
    alpha, rslora = float(meta["alpha"]), json.loads(meta["rslora"])
    dora = json.loads(meta.get("dora", "false"))
    parts = ("down", "up")
    report = LoRAReport(metadata=meta)
    modules = json.loads(meta["modules"])
    known = {f"{m}.lora_{part}.weight" for m in modules for part in parts}
    if dora:
        known |= {f"{m}.lora_magnitude" for m in modules}
    report.unmatched += sorted(k for k in state if k not in known)
    plan = []
    for name in modules:
        down, up = state.get(f"{name}.lora_down.weight"), state.get(f"{name}.lora_up.weight")
        magnitude = state.get(f"{name}.lora_magnitude") if dora else None
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            report.unmatched.append(name)
            continue
        base = layer.base if isinstance(layer, LoRALayer) else layer
        if down is None or up is None or not isinstance(base, (nn.Linear, nn.Conv2d)):
            report.mismatched.append(name)
            continue
        rank = down.shape[0]
        want_down, want_up = _adapter_shapes(base, rank)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            report.mismatched.append(f"{name} (file {tuple(down.shape)}, layer {want_down})")
            continue
        if dora and (magnitude is None or tuple(magnitude.shape) != (want_up[0],)):
            report.mismatched.append(f"{name} (DoRA magnitude missing or of the wrong size)")
            continue
        plan.append((name, layer, rank, down, up, magnitude))
    if strict and (report.unmatched or report.mismatched):
        raise ValueError(f"LoRA file {path} does not fit this network:\n{report}")
    for name, layer, rank, down, up, magnitude in plan:
        if isinstance(layer, LoRALayer):
            layer.unfuse()
            layer = layer.base
        with torch.random.fork_rng(devices=[]):  # the init is overwritten: keep the caller's RNG
            layer = LoRALayer(layer, rank, alpha, rslora=rslora, dora=dora)
        _set_module(model, name, layer)
        with torch.no_grad():
            layer.lora_down.weight.copy_(down)
            layer.lora_up.weight.copy_(up)
            if magnitude is not None:
                assert layer.lora_magnitude is not None
                layer.lora_magnitude.copy_(magnitude)
        layer.multiplier = float(scale)
        report.applied.append(name)
    return report


def read_tagged(path: str | Path, fmt: str, what: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a safetensors file whose metadata ``format`` is ``fmt``.

    :raises FileNotFoundError: no such file. :raises ValueError: another format.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a difflab {what} (format {meta.get('format')!r})")
    return meta, tensors


def _adapter_shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    fan_in, fan_out = _features(base)
    if isinstance(base, nn.Linear):
        return (rank, fan_in), (fan_out, rank)
    return (rank, fan_in, *base.kernel_size), (fan_out, rank, 1, 1)
