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

The same machinery (multiplier, fuse / unfuse, removal, the file, the run's save and resume)
carries LyCORIS' LoHa and LoKr adapters, :class:`~difflab.finetune.loha_lokr.LoHaLayer` and
:class:`~difflab.finetune.loha_lokr.LoKrLayer`: subclasses whose update is a dense product
(``add_lora(..., kind="loha")``). Their tensors are stored under LyCORIS' names
(``<module>.hada_w1_a``, ``<module>.lokr_w1``, ...) and the file's metadata ``kind`` names
them (absent = ``lora``; LoKr adds ``lokr_factor``).

The maths is a few lines, so it is written here rather than taken from ``peft``: wrapping
keeps the U-Net's own module names and the file stays a plain, documented layout.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .layer import LoRALayer, _features, lora_layers

__all__ = [
    "ADAPTER_KINDS",
    "LORA_FILE",
    "LORA_FORMAT",
    "LoRALayer",
    "LoRAReport",
    "adapter_layer",
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
# What a wrapped layer adds: "lora" (Hu et al. 2021), "loha" (LyCORIS' Hadamard product,
# Hyeon-Woo et al. 2022) or "lokr" (LyCORIS' Kronecker product); see difflab.finetune.loha_lokr.
ADAPTER_KINDS = ("lora", "loha", "lokr")


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


def adapter_layer(
    kind: str,
    base: nn.Module,
    rank: int,
    alpha: float | None = None,
    *,
    rslora: bool = False,
    dora: bool = False,
    factor: int = -1,
    generator: torch.Generator | None = None,
) -> LoRALayer:
    """A fresh adapter of ``kind`` (``ADAPTER_KINDS``) around ``base``: :class:`LoRALayer`,
    or LyCORIS' LoHa / LoKr (:mod:`difflab.finetune.loha_lokr`; ``factor`` is LoKr's).

    :raises ValueError: an unknown kind, or rsLoRA / DoRA asked of LoHa / LoKr.
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r} (choices: {', '.join(ADAPTER_KINDS)})")
    if kind == "lora":
        return LoRALayer(base, rank, alpha, rslora=rslora, dora=dora, generator=generator)
    if rslora or dora:
        raise ValueError(f"{'rslora' if rslora else 'dora'} is a LoRA option, not one of {kind}")
    from .loha_lokr import LoHaLayer, LoKrLayer

    if kind == "loha":
        return LoHaLayer(base, rank, alpha, generator=generator)
    return LoKrLayer(base, rank, alpha, factor=factor, generator=generator)


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    targets: str | Sequence[str] = "attention",
    *,
    kind: str = "lora",
    rslora: bool = False,
    dora: bool = False,
    factor: int = -1,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Wrap the layers ``targets`` selects in adapters of ``kind`` (:func:`adapter_layer`)
    and freeze everything else.

    :param targets: ``"attention"``, ``"conv"``, ``"attention+conv"`` or fnmatch patterns
        over module names.
    :return: the wrapped module names, in network order.
    :raises ValueError: nothing matches, a layer is already wrapped, or a bad rank or kind.
    """
    names = _target_names(model, targets)
    model.requires_grad_(False)
    for name in names:
        if isinstance(model.get_submodule(name.rpartition(".")[0] or ""), LoRALayer):
            raise ValueError(f"{name} is already inside a LoRA layer; remove_lora() first")
        layer = adapter_layer(
            kind, model.get_submodule(name), rank, alpha, rslora=rslora, dora=dora,
            factor=factor, generator=generator,
        )  # fmt: skip
        _set_module(model, name, layer)
    return names


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
    """``{"<module>.<factor>": ...}`` over :meth:`LoRALayer.factors` (``lora_down.weight``,
    ``lora_up.weight``, ``lora_magnitude``; LoHa / LoKr: ``hada_*`` / ``lokr_*``)."""
    return {
        f"{name}.{key}": value.detach()
        for name, layer in _require_lora(model)
        for key, value in layer.factors().items()
    }


def save_lora(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the adapter as safetensors with its kind, rank, alpha and modules (atomically)."""
    from safetensors.torch import save

    from ..runs import atomic_write_bytes

    layers = _require_lora(model)
    first = layers[0][1]
    kinds = {layer.kind for _, layer in layers}
    if len(kinds) > 1:
        raise ValueError(f"one adapter file holds one kind of adapter, this network has {kinds}")
    meta = {
        **(metadata or {}),
        "format": LORA_FORMAT,
        "kind": first.kind,
        "rank": str(first.rank),
        "alpha": repr(first.alpha),
        "rslora": json.dumps(first.rslora),
        "dora": json.dumps(first.dora),
        "modules": json.dumps([name for name, _ in layers]),
    }
    if first.kind == "lokr":
        meta["lokr_factor"] = str(first.factor)
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
    kind = meta.get("kind", "lora")
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"{path} holds adapters of unknown kind {kind!r} "
                         f"(choices: {', '.join(ADAPTER_KINDS)})")  # fmt: skip
    opts = dict(rslora=json.loads(meta["rslora"]), dora=json.loads(meta.get("dora", "false")),
                factor=int(meta.get("lokr_factor", "-1")))  # fmt: skip
    alpha = float(meta["alpha"])
    report = LoRAReport(metadata=meta)
    modules = json.loads(meta["modules"])
    known = {f"{m}.{key}" for m in modules for key in _FILE_KEYS[kind]}
    report.unmatched += sorted(k for k in state if k not in known)
    plan = []
    for name in modules:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            report.unmatched.append(name)
            continue
        base = layer.base if isinstance(layer, LoRALayer) else layer
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            report.mismatched.append(name)
            continue
        rank = _file_rank(kind, state, name, int(meta["rank"]))
        want = _factor_shapes(kind, base, rank, **opts)
        tensors = {key: state[f"{name}.{key}"] for key in want if f"{name}.{key}" in state}
        got = {key: tuple(t.shape) for key, t in tensors.items()}
        if got != want:
            diff = "; ".join(
                f"{key}: file {got.get(key, 'none')}, layer {want.get(key, 'none')}"
                for key in sorted({*got, *want})
                if got.get(key) != want.get(key)
            )
            report.mismatched.append(f"{name} ({diff})")
            continue
        plan.append((name, layer, rank, tensors))
    if strict and (report.unmatched or report.mismatched):
        raise ValueError(f"LoRA file {path} does not fit this network:\n{report}")
    for name, layer, rank, tensors in plan:
        if isinstance(layer, LoRALayer):
            layer.unfuse()
            layer = layer.base
        with torch.random.fork_rng(devices=[]):  # the init is overwritten: keep the caller's RNG
            layer = adapter_layer(kind, layer, rank, alpha, **opts)
        _set_module(model, name, layer)
        with torch.no_grad():
            for key, param in layer.factors().items():
                param.copy_(tensors[key])
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


# Every tensor name a module of each kind may have in a difflab adapter file.
_FILE_KEYS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_magnitude"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}


def _file_rank(kind: str, state: dict[str, Tensor], name: str, default: int) -> int:
    """A module's rank as its tensors give it (LoKr's whole factors have none: the file's)."""
    key = {"lora": "lora_down.weight", "loha": "hada_w1_b", "lokr": "lokr_w2_b"}[kind]
    tensor = state.get(f"{name}.{key}")
    return default if tensor is None else int(tensor.shape[0])


def _factor_shapes(
    kind: str, base: nn.Module, rank: int, *, rslora: bool, dora: bool, factor: int
) -> dict[str, tuple[int, ...]]:
    """The shape of each of :meth:`LoRALayer.factors` for an adapter of ``kind`` on ``base``."""
    if kind != "lora":
        from .loha_lokr import factor_shapes

        return factor_shapes(kind, base, rank, factor)
    fan_in, fan_out = _features(base)
    shapes: dict[str, tuple[int, ...]]
    if isinstance(base, nn.Conv2d):
        shapes = {"lora_down.weight": (rank, fan_in, *base.kernel_size),
                  "lora_up.weight": (fan_out, rank, 1, 1)}  # fmt: skip
    else:  # nn.Linear (_features raised for anything else)
        shapes = {"lora_down.weight": (rank, fan_in), "lora_up.weight": (fan_out, rank)}
    if dora:
        shapes["lora_magnitude"] = (fan_out,)
    return shapes
