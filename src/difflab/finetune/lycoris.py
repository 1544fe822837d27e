"""Adapter files made by other tools: kohya / LyCORIS and diffusers / PEFT layouts.

Owns reading those files, applying them to a network through a module-name map, several
adapters at once with a multiplier each, fusing / unfusing / removing them, and writing
difflab's own :class:`~difflab.finetune.lora.LoRALayer` adapters back out in kohya layout
(:func:`save_kohya`; trained LoHa / LoKr under LyCORIS' names). It knows nothing of any
architecture: the caller passes, per component (``unet``, ``text_encoder``,
``text_encoder_2``), the network and a map
``external module name -> module name in the network`` (identity when omitted).

Every adapter adds a dense weight update ``ΔW`` to a ``Linear`` or ``Conv2d`` weight ``W0``;
a wrapped layer computes ``base(x) + op(x, Σ_k m_k ΔW_k)`` with ``op`` the base's own linear
map or convolution (stride, padding) and ``m_k`` each adapter's multiplier. The updates, with
``r`` the rank of the file's factors and ``α`` its ``.alpha`` (``α = r`` when absent):

- LoRA / LoCon (Hu et al. 2021 eq. 3; kohya ``lora_down`` / ``lora_up``, a 3x3 ``down`` and
  1x1 ``up`` on convolutions, optional Tucker ``lora_mid``): ``ΔW = (α/r) up @ down``.
- LoHa (Hyeon-Woo et al. 2022, "FedPara", eq. 2; LyCORIS ``hada_*``):
  ``ΔW = (α/r) (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; with ``hada_t1`` / ``hada_t2`` each factor
  is the Tucker product ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``.
- LoKr (Yeh et al. 2024, "Navigating Text-To-Image Customization", LyCORIS ``lokr_*``):
  ``ΔW = s · kron(w1, w2)`` where each of ``w1``, ``w2`` is stored whole or as ``a @ b``
  (``w2`` also Tucker, ``lokr_t2``). LyCORIS scales by ``s = α/r`` only when a factor is
  decomposed (``r`` = the decomposed factor's inner size); with both whole, ``s = 1`` and
  ``.alpha`` is ignored, as LyCORIS' own module and the common loaders do.

Key layouts read (``<m>`` is the external module name):

- kohya / LyCORIS: ``lora_unet_<m>.<tensor>``, ``lora_te_`` (``lora_te1_``) and ``lora_te2_``,
  with ``<m>``'s dots written as ``_``. That is ambiguous, so each known module name is put
  in the same form and looked up (two names of one form are reported, never guessed).
- diffusers / PEFT: ``unet.<m>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.``,
  ``text_encoder_2.``), the older ``<m>.lora.down.weight`` / ``lora.up.weight``,
  ``lora_linear_layer.*`` and attention-processor names (``attn1.processor.to_q_lora.down``),
  optional ``<m>.alpha``, and the ``lora_adapter_metadata`` diffusers writes (``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``). Keys with none of the prefixes are the U-Net's.

Loading is loud: a key the map cannot place, a tensor of an unknown kind or an update that
does not fit its layer is listed in the report, and ``strict=True`` (the default) raises
before anything changes.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import LoRALayer, lora_layers

__all__ = [
    "COMPONENTS",
    "AdapterLayer",
    "AdapterReport",
    "AdapterSet",
    "AdapterTarget",
    "adapter_delta",
    "base_op",
    "clip_text_name_map",
    "read_adapter_file",
    "save_kohya",
]

Component = Literal["unet", "text_encoder", "text_encoder_2"]
COMPONENTS: tuple[Component, ...] = ("unet", "text_encoder", "text_encoder_2")
# kohya file prefix -> component ("lora_te_" is SD1/2's one encoder, te1/te2 SDXL's two).
KOHYA_PREFIXES: dict[str, Component] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
DIFFUSERS_PREFIXES: dict[str, Component] = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}
# Tensors an adapter module may hold, by kind (the file's suffix after the module name).
KIND_TENSORS: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}),
    "loha": frozenset(
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}
    ),  # fmt: skip
    "lokr": frozenset(
        {
            "lokr_w1",
            "lokr_w1_a",
            "lokr_w1_b",
            "lokr_w2",
            "lokr_w2_a",
            "lokr_w2_b",
            "lokr_t2",
            "alpha",
        }
    ),  # fmt: skip
}
# diffusers / PEFT suffixes -> the kohya names above.
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "lora_down.weight",
    ".lora_B.weight": "lora_up.weight",
    ".lora.down.weight": "lora_down.weight",
    ".lora.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight",
    ".lora_linear_layer.up.weight": "lora_up.weight",
    ".alpha": "alpha",
}
# Old attention-processor names (``attn1.processor.to_q_lora.down.weight``) -> module names.
_PROCESSOR_NAMES = {
    "processor.to_q_lora": "to_q",
    "processor.to_k_lora": "to_k",
    "processor.to_v_lora": "to_v",
    "processor.to_out_lora": "to_out.0",
    "to_q_lora": "q_proj",  # the text encoder's, same era
    "to_k_lora": "k_proj",
    "to_v_lora": "v_proj",
    "to_out_lora": "out_proj",
}


# ----------------------------------------------------------------------------- the updates


def _tucker(t: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    """LyCORIS' Tucker rebuild: core ``t`` (r, r, kh, kw), ``w_a`` (r, out), ``w_b`` (r, in)."""
    return torch.einsum("ijkl,jr,ip->prkl", t, w_b, w_a)  # (out, in, kh, kw)


def _alpha_over(t: Mapping[str, Tensor], rank: int) -> float:
    return float(t["alpha"]) / rank if "alpha" in t else 1.0


def adapter_delta(kind: str, tensors: Mapping[str, Tensor]) -> Tensor:
    """The dense update ``ΔW`` of one module's adapter tensors (kohya / LyCORIS names), in
    float32: (out, in) or (out, in, kh, kw), or (out, in·kh·kw) for LoHa without Tucker.

    :param kind: ``"lora"``, ``"loha"`` or ``"lokr"`` (see the module docstring).
    """
    t = {k: v.float() for k, v in tensors.items()}
    if kind == "lora":
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in t:  # Tucker LoCon: 1x1 down, (r, r, kh, kw) mid, 1x1 up
            delta = torch.einsum("ijkl,jr,pi->prkl", t["lora_mid.weight"], down.flatten(1),
                                 up.flatten(1))  # fmt: skip
        else:
            delta = (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
        return delta * _alpha_over(t, rank)
    if kind == "loha":
        rank = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return w1 * w2 * _alpha_over(t, rank)
    if kind == "lokr":
        scale = 1.0
        lokr_rank: int | None = None
        if "lokr_w1" in t:
            w1 = t["lokr_w1"]
        else:
            w1, lokr_rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            lokr_rank = t["lokr_w2_b"].shape[0]
        else:
            w2, lokr_rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
        if lokr_rank is not None:  # LyCORIS: α/r only when a factor is decomposed
            scale = _alpha_over(t, lokr_rank)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()) * scale
    raise ValueError(f"unknown adapter kind {kind!r} (choices: {', '.join(KIND_TENSORS)})")


def base_op(base: nn.Linear | nn.Conv2d, x: Tensor, weight: Tensor) -> Tensor:
    """``base``'s own linear map or convolution (stride, padding, ...) with ``weight`` and
    no bias: how a dense update ``ΔW`` acts on the input."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    return base._conv_forward(x, weight, None)


def _kind_of(names: set[str]) -> str | None:
    """The adapter kind a module's tensor names belong to, or None if they are no one kind."""
    for kind, allowed in KIND_TENSORS.items():
        if names <= allowed and names - {"alpha"}:
            return kind
    return None


def _required(kind: str, names: set[str]) -> str | None:
    """What a module of ``kind`` lacks, or None."""
    need = {
        "lora": [{"lora_down.weight"}, {"lora_up.weight"}],
        "loha": [{"hada_w1_a"}, {"hada_w1_b"}, {"hada_w2_a"}, {"hada_w2_b"}],
        "lokr": [{"lokr_w1", "lokr_w1_a"}, {"lokr_w2", "lokr_w2_a"}],
    }[kind]
    missing = [" or ".join(sorted(alts)) for alts in need if not alts & names]
    pairs = [("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b"), ("hada_t1", "hada_t2")]
    missing += [b for a, b in pairs if a in names and b not in names]
    return ", ".join(missing) or None


# ----------------------------------------------------------------------------- the layer


class AdapterLayer(nn.Module):
    """A ``Linear`` / ``Conv2d`` plus named weight updates, each with its own multiplier.

    ``forward(x) = base(x) + op(x, Σ_k m_k ΔW_k)`` (``op`` the base's own product or
    convolution, no bias). The adapter tensors are buffers of one small module per adapter
    (``adapters[name]``); ``ΔW`` is rebuilt from them in float32 when used.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"adapters apply to nn.Linear and nn.Conv2d, not {type(base).__name__}")
        self.base = base
        self.adapters = nn.ModuleDict()
        self.kinds: dict[str, str] = {}
        self.multipliers: dict[str, float] = {}
        self.fused = False
        self._unfused_weight: Tensor | None = None
        self._cached: Tensor | None = None  # Σ m ΔW; dropped whenever an adapter or m changes

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (code that reads ``layer.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def add(self, name: str, kind: str, tensors: Mapping[str, Tensor], multiplier: float) -> None:
        """Hold adapter ``name`` (its file tensors, kohya names) at ``multiplier``."""
        holder = nn.Module()
        for key, value in tensors.items():
            value = value.detach().to(self.base.weight.device).clone()
            holder.register_buffer(key.replace(".", "__"), value, persistent=False)
        self.adapters[name] = holder
        self.kinds[name] = kind
        self.multipliers[name] = float(multiplier)
        self._refuse()

    def drop(self, name: str) -> None:
        """Forget adapter ``name`` (the fused weight, if fused, follows)."""
        del self.adapters[name]
        del self.kinds[name], self.multipliers[name]
        self._refuse()

    def set_multiplier(self, name: str, multiplier: float) -> None:
        self.multipliers[name] = float(multiplier)
        self._refuse()

    def adapter_weight(self, name: str) -> Tensor:
        """``ΔW`` of adapter ``name`` alone (multiplier 1), float32, shaped like the weight."""
        tensors = {k.replace("__", "."): v for k, v in self.adapters[name].named_buffers()}
        return adapter_delta(self.kinds[name], tensors).reshape(self.base.weight.shape)

    def delta_weight(self) -> Tensor | None:
        """``Σ_k m_k ΔW_k`` in float32, or None when every multiplier is 0."""
        live = [(n, m) for n, m in self.multipliers.items() if m != 0.0]
        if not live:
            return None
        device = self.base.weight.device
        if self._cached is None or self._cached.device != device:
            self._cached = sum(m * self.adapter_weight(n) for n, m in live)  # type: ignore[assignment]
        return self._cached

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.fused:
            return out
        delta = self.delta_weight()
        if delta is None:
            return out
        return out + base_op(self.base, x, delta.to(x.dtype))

    @torch.no_grad()
    def fuse(self) -> None:
        """Add the updates into ``base.weight`` (the unfused weight is kept for unfuse)."""
        if not self.fused:
            self._unfused_weight = self.base.weight.detach().clone()
            self.fused = True
            self._refuse()

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore ``base.weight`` exactly as it was before :meth:`fuse`."""
        if self.fused:
            assert self._unfused_weight is not None
            self.base.weight.copy_(self._unfused_weight)
            self._unfused_weight, self.fused = None, False

    @torch.no_grad()
    def _refuse(self) -> None:
        """After any change: drop the cached sum; when fused, rebuild the fused weight from
        the kept original."""
        self._cached = None
        if not self.fused:
            return
        assert self._unfused_weight is not None
        delta = self.delta_weight()
        weight = self._unfused_weight if delta is None else self._unfused_weight.float() + delta
        self.base.weight.copy_(weight.to(self.base.weight.dtype))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {self.kinds[n]} x{m:g}" for n, m in self.multipliers.items())


# ----------------------------------------------------------------------------- reading


def read_adapter_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file (or a plain tensor dict saved by
    ``torch.save``, read with ``weights_only=True``).

    :raises FileNotFoundError: no such file. :raises ValueError: not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118
        except Exception as err:  # safetensors' own error type
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path} is not a readable .safetensors file ({reason})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or one holding more than tensors
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ValueError(
            f"{path} is neither .safetensors nor a torch file of plain tensors ({reason})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not an adapter file (expected a dict of tensors)")
    return state, {}


@dataclass
class _Module:
    """One adapted module as the file names it."""

    component: Component
    name: str  # diffusers-layout: dotted; kohya: the '_' form
    kohya: bool
    tensors: dict[str, Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # the file's keys, for the report


def _split_key(key: str) -> tuple[Component, str, bool, str] | None:
    """``(component, module, is_kohya, tensor)`` of one file key, or None if foreign."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            module, _, tensor = key[len(prefix) :].partition(".")
            return component, module, True, tensor
    component = "unet"
    for prefix, comp in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            component, key = comp, key[len(prefix) :]
            break
    for suffix, tensor in _DIFFUSERS_SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for old, new in _PROCESSOR_NAMES.items():
                if module.endswith("." + old):
                    module = module[: -len(old)] + new
                    break
            return component, module, False, tensor
    return None


def _group(state: Mapping[str, Tensor]) -> tuple[list[_Module], list[str]]:
    """The file's modules, and the keys that fit no known layout."""
    modules: dict[tuple[str, str, bool], _Module] = {}
    foreign = []
    for key, value in state.items():
        split = _split_key(key)
        if split is None:
            foreign.append(key)
            continue
        component, name, kohya, tensor = split
        mod = modules.setdefault((component, name, kohya), _Module(component, name, kohya))
        mod.tensors[tensor] = value
        mod.keys.append(key)
    return list(modules.values()), foreign


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict]:
    """Per component, the PEFT config diffusers stores under ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    out: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        component, _, option = key.partition(".")
        out.setdefault(component, {})[option] = value
    return out


def _peft_alpha(config: Mapping, module: str, rank: int) -> float | None:
    """PEFT's alpha for ``module`` (``alpha_pattern`` entries match a name's ending), as the
    ``α`` of ``α / r`` (rsLoRA's ``α / √r`` folded in)."""
    if "lora_alpha" not in config:
        return None
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


# ----------------------------------------------------------------------------- applying


@dataclass(frozen=True)
class AdapterTarget:
    """A network adapters apply to, and how the file's module names map onto its own.

    :param model: the network (its ``Linear`` / ``Conv2d`` layers are wrapped).
    :param name_map: ``external module name -> module name in model``; None = the model's own
        names for the U-Net, :func:`clip_text_name_map` for a text encoder.
    """

    model: nn.Module
    name_map: Mapping[str, str] | None = None


def _layers(model: nn.Module) -> dict[str, nn.Linear | nn.Conv2d | AdapterLayer | LoRALayer]:
    """Adaptable layers by module name: ``Linear`` / ``Conv2d`` and :class:`AdapterLayer`
    (never the layers inside one), plus difflab ``LoRALayer`` (reported, never wrapped)."""
    out: dict[str, nn.Linear | nn.Conv2d | AdapterLayer | LoRALayer] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, (AdapterLayer, LoRALayer)):
            inside.append(name)
            out[name] = mod
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            out[name] = mod
    return out


def clip_text_name_map(model: nn.Module) -> dict[str, str]:
    """``external -> module name`` for a transformers CLIP text model: adapter files name its
    layers ``text_model.encoder.layers.<i>...`` (``text_projection`` for the projection), the
    layout transformers 5's ``CLIPTextModel`` dropped the ``text_model.`` level of."""
    names = list(_layers(model))
    if any(n.startswith("text_model.") for n in names):
        return {n: n for n in names}
    return {(n if n == "text_projection" else f"text_model.{n}"): n for n in names}


def _name_map(component: str, target: AdapterTarget) -> dict[str, str]:
    """The target's map, or by default the U-Net's own names / :func:`clip_text_name_map`."""
    if target.name_map is not None:
        return dict(target.name_map)
    if component == "unet":
        return {n: n for n in _layers(target.model)}
    return clip_text_name_map(target.model)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _weight_of(layer: nn.Linear | nn.Conv2d | AdapterLayer) -> Tensor:
    return (layer.base if isinstance(layer, AdapterLayer) else layer).weight


@dataclass
class AdapterReport:
    """What :meth:`AdapterSet.load` did (or would do): applied modules ("component:name" in
    the network), the file's keys it could not place or fit, and the count per kind."""

    name: str
    source: str
    applied: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # keys with no module in the network
    mismatched: list[str] = field(default_factory=list)  # keys whose update does not fit
    kinds: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.mismatched)

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items())) or "none"
        lines = [f"adapter {self.name!r} ({self.source}): {len(self.applied)} layers ({counts})"]
        if self.unmatched:
            lines.append(f"  not in this network: {', '.join(self.unmatched)}")
        if self.mismatched:
            lines.append(f"  does not fit: {', '.join(self.mismatched)}")
        return "\n".join(lines)


class AdapterSet:
    """Adapters from files applied to one pipeline's networks, several at once.

    :param targets: per component (``unet``, ``text_encoder``, ``text_encoder_2``), the
        network or an :class:`AdapterTarget` with its name map.
    """

    def __init__(self, targets: Mapping[str, nn.Module | AdapterTarget]) -> None:
        bad = sorted(set(targets) - set(COMPONENTS))
        if bad:
            raise ValueError(f"unknown component(s) {bad} (choices: {', '.join(COMPONENTS)})")
        self.targets = {
            c: t if isinstance(t, AdapterTarget) else AdapterTarget(t) for c, t in targets.items()
        }
        self.scales: dict[str, float] = {}

    # -- name resolution
    def _resolver(self, component: str) -> tuple[dict[str, str], dict[str, str], set[str]]:
        """``(external -> internal, kohya form -> external, ambiguous kohya forms)``."""
        name_map = _name_map(component, self.targets[component])
        kohya: dict[str, str] = {}
        ambiguous = set()
        for ext in name_map:
            form = ext.replace(".", "_")
            if form in kohya:
                ambiguous.add(form)
            kohya[form] = ext
        return name_map, kohya, ambiguous

    def layers(self) -> Iterator[tuple[str, str, AdapterLayer]]:
        """``(component, module name, layer)`` for every :class:`AdapterLayer`."""
        for component, target in self.targets.items():
            for name, mod in target.model.named_modules():
                if isinstance(mod, AdapterLayer):
                    yield component, name, mod

    @property
    def names(self) -> list[str]:
        """The loaded adapters, in load order."""
        return list(self.scales)

    # -- loading
    def load(
        self,
        source: str | Path | Mapping[str, Tensor],
        *,
        name: str | None = None,
        scale: float = 1.0,
        strict: bool = True,
        metadata: Mapping[str, str] | None = None,
    ) -> AdapterReport:
        """Apply an adapter file (or its tensors) under ``name`` at multiplier ``scale``.

        Everything is checked before anything changes. With ``strict`` any key that cannot
        be placed (a module the map or network lacks, a component with no target, an unknown
        tensor) or whose update does not fit its layer raises a ValueError listing them all;
        with ``strict=False`` the fitting modules are applied and the report lists the rest.
        """
        if isinstance(source, (str, Path)):
            state, meta = read_adapter_file(source)
            label = f"file {source}"
            name = name or Path(source).name.split(".")[0]
        else:
            state, meta, label = dict(source), {}, "tensors"
            name = name or f"adapter_{len(self.scales)}"
        meta = {**meta, **(metadata or {})}
        if not state:
            raise ValueError(f"adapter {label} holds no tensors")
        if name in self.scales:
            raise ValueError(f"an adapter named {name!r} is loaded already; remove() it first")
        report = AdapterReport(name=name, source=label, metadata=meta)
        plan = self._plan(state, meta, report)
        if strict and not report.ok:
            raise ValueError(f"adapter {label} does not fit these networks:\n{report}")
        for component, internal, kind, tensors in plan:
            model = self.targets[component].model
            layer = model.get_submodule(internal)
            if not isinstance(layer, AdapterLayer):
                layer = AdapterLayer(layer)
                _set_module(model, internal, layer)
            layer.add(name, kind, tensors, scale)
        if plan:
            self.scales[name] = float(scale)
        return report

    def _plan(
        self, state: Mapping[str, Tensor], meta: Mapping[str, str], report: AdapterReport
    ) -> list[tuple[str, str, str, dict[str, Tensor]]]:
        modules, foreign = _group(state)
        report.unmatched += [f"{k} (no known adapter layout)" for k in foreign]
        peft = _peft_alphas(meta)
        resolvers = {c: self._resolver(c) for c in self.targets}
        layers = {c: _layers(t.model) for c, t in self.targets.items()}
        plan: list[tuple[str, str, str, dict[str, Tensor]]] = []
        kinds: Counter[str] = Counter()
        for mod in modules:
            keys = ", ".join(sorted(mod.keys))
            if mod.component not in self.targets:
                report.unmatched.append(f"{keys} (no {mod.component} given)")
                continue
            name_map, kohya, ambiguous = resolvers[mod.component]
            external = kohya.get(mod.name) if mod.kohya else mod.name
            if mod.kohya and mod.name in ambiguous:
                report.unmatched.append(f"{keys} (ambiguous: several modules read {mod.name})")
                continue
            internal = name_map.get(external) if external is not None else None
            if external is None or internal is None or internal not in layers[mod.component]:
                report.unmatched.append(f"{keys} (no {mod.component} layer of that name)")
                continue
            layer = layers[mod.component][internal]
            kind = _kind_of(set(mod.tensors))
            if kind is None:
                report.unmatched.append(f"{keys} (unsupported tensors)")
                continue
            missing = _required(kind, set(mod.tensors))
            if missing:
                report.mismatched.append(f"{keys} ({kind} without {missing})")
                continue
            if isinstance(layer, LoRALayer):
                report.mismatched.append(f"{keys} (a difflab LoRA layer; remove_lora() first)")
                continue
            tensors = dict(mod.tensors)
            if "alpha" not in tensors and kind == "lora" and mod.component in peft:
                alpha = _peft_alpha(peft[mod.component], external, tensors["lora_down.weight"]
                                    .shape[0])  # fmt: skip
                if alpha is not None:
                    tensors["alpha"] = torch.tensor(alpha)
            problem = _misfit(kind, tensors, _weight_of(layer))
            if problem:
                report.mismatched.append(f"{keys} ({problem})")
                continue
            plan.append((mod.component, internal, kind, tensors))
            kinds[kind] += 1
            report.applied.append(f"{mod.component}:{internal}")
        report.kinds = dict(kinds)
        return plan

    # -- using
    def _require(self, name: str) -> None:
        if name not in self.scales:
            loaded = ", ".join(self.scales) or "none"
            raise ValueError(f"no adapter named {name!r} is loaded (loaded: {loaded})")

    def set_scale(self, name: str, scale: float) -> None:
        """Set adapter ``name``'s multiplier (0 = as if absent; fused weights follow)."""
        self._require(name)
        for _, _, layer in self.layers():
            if name in layer.multipliers:
                layer.set_multiplier(name, scale)
        self.scales[name] = float(scale)

    def fuse(self) -> None:
        """Fold every adapter into its base weight (no extra cost per call afterwards)."""
        for _, _, layer in self.layers():
            layer.fuse()

    def unfuse(self) -> None:
        """Undo :meth:`fuse`: the base weights are restored bit for bit."""
        for _, _, layer in self.layers():
            layer.unfuse()

    def remove(self, name: str) -> None:
        """Take adapter ``name`` out; a layer left with none becomes its base layer again."""
        self._require(name)
        for component, module, layer in list(self.layers()):
            if name not in layer.multipliers:
                continue
            layer.drop(name)
            if not layer.multipliers:
                layer.unfuse()
                _set_module(self.targets[component].model, module, layer.base)
        del self.scales[name]


def _misfit(kind: str, tensors: Mapping[str, Tensor], weight: Tensor) -> str | None:
    """Why the update of ``tensors`` does not fit ``weight``, or None if it does."""
    try:
        delta = adapter_delta(kind, tensors)
    except (RuntimeError, IndexError, KeyError) as err:
        return f"{kind} tensors do not combine: {str(err).splitlines()[0]}"
    same_rows = delta.shape[0] == weight.shape[0] and delta.numel() == weight.numel()
    if not same_rows or (delta.dim() == weight.dim() and delta.shape != weight.shape):
        return f"update {tuple(delta.shape)}, layer weight {tuple(weight.shape)}"
    return None


# ----------------------------------------------------------------------------- saving


def save_kohya(
    path: str | Path,
    targets: Mapping[str, nn.Module | AdapterTarget],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the difflab adapters (:class:`LoRALayer`, LoHa / LoKr included) of ``targets``'
    networks in kohya / LyCORIS layout: ``lora_unet_<m>.<factor>`` and ``.alpha`` (``<m>``
    the external name with ``_`` for ``.``, through the inverse of each target's name map;
    ``<factor>`` ``lora_down.weight`` / ``lora_up.weight``, LyCORIS' ``hada_w1_a`` ...
    or ``lokr_w1`` ...), and kohya's ``ss_network_*`` metadata (LyCORIS' ``lycoris.kohya``
    module and ``algo`` for LoHa / LoKr). rsLoRA's ``α/√r`` is written as the kohya alpha
    ``α√r``; DoRA adapters are refused (kohya's layout has no magnitude of this kind).
    """
    from safetensors.torch import save

    from ..runs import atomic_write_bytes

    two_encoders = "text_encoder_2" in targets
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if two_encoders else "lora_te_",
                "text_encoder_2": "lora_te2_"}  # fmt: skip
    tensors: dict[str, Tensor] = {}
    ranks, alphas, kinds, factors, conv = set(), set(), set(), set(), False
    for component, target in targets.items():
        if component not in prefixes:
            raise ValueError(f"unknown component {component!r} (choices: {', '.join(COMPONENTS)})")
        target = target if isinstance(target, AdapterTarget) else AdapterTarget(target)
        inverse = _inverse(component, target)
        for module, layer in lora_layers(target.model):
            if layer.dora:
                raise ValueError(f"{component}:{module} is a DoRA adapter; kohya files hold LoRA")
            if module not in inverse:
                raise ValueError(f"{component}:{module} has no external name in the name map")
            key = prefixes[component] + inverse[module].replace(".", "_")
            alpha = layer.alpha * math.sqrt(layer.rank) if layer.rslora else layer.alpha
            for name, value in layer.factors().items():
                tensors[f"{key}.{name}"] = value.detach().float().cpu()
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            ranks.add(layer.rank)
            alphas.add(alpha)
            kinds.add(layer.kind)
            factors.add(getattr(layer, "factor", -1))
            conv |= isinstance(layer.base, nn.Conv2d) and layer.base.kernel_size != (1, 1)
    if not tensors:
        raise ValueError("these networks have no difflab adapter layers to save")
    meta = {
        **(metadata or {}),
        "ss_network_module": "networks.lora" if kinds == {"lora"} else "lycoris.kohya",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": f"{max(alphas):g}",
    }
    args: dict[str, str] = {}
    if conv:
        args |= {"conv_dim": str(max(ranks)), "conv_alpha": f"{max(alphas):g}"}
    if kinds != {"lora"} and len(kinds) == 1:
        args["algo"] = next(iter(kinds))
        if kinds == {"lokr"}:
            args["factor"] = str(max(factors))
    if args:
        meta["ss_network_args"] = json.dumps(args)
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def _inverse(component: str, target: AdapterTarget) -> dict[str, str]:
    """``module name in the network -> external name``."""
    inverse: dict[str, str] = {}
    for ext, internal in _name_map(component, target).items():
        if internal in inverse:
            raise ValueError(
                f"the name map sends both {inverse[internal]!r} and {ext!r} to {internal!r}"
            )
        inverse[internal] = ext
    return inverse
