"""Stable Diffusion U-Net formats <-> difflab's :class:`~difflab.models.UNet`.

Owns the config translations and weight-key mappings between difflab's U-Net and the two
layouts other tools use for Stable Diffusion 1.x / 2.x and SDXL U-Nets (Rombach et al.
2022; Podell et al. 2023):

* diffusers' ``UNet2DConditionModel``: a ``config.json`` and keys such as
  ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight``;
* the original CompVis ``ldm`` / Stability ``sgm`` layout: ``input_blocks.N.M...``,
  ``middle_block``, ``output_blocks``, ``time_embed``, ``label_emb``, ``out``, here always
  without the ``model.diffusion_model.`` prefix of full checkpoints (:func:`ldm_unet_state`
  strips it).

Every mapping comes from one walk over the architecture (:func:`_leaves`), the walk
``UNet.__init__`` makes, so the three names of each layer are written once. The formats'
1x1-conv ``proj_in``/``proj_out`` (SD 1.x) are reshaped to difflab's ``Linear`` weights and
back; difflab's fused ``to_qkv``/``to_kv`` (``fuse_qkv=True``) are concatenated from and
split into the formats' ``to_q``/``to_k``/``to_v``. Knows nothing of files, text encoders,
schedulers or pipelines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from difflab.models.unet import UNet, UNetConfig

__all__ = [
    "diffusers_module_map",
    "ldm_module_map",
    "ldm_unet_state",
    "unet_config_from_diffusers",
    "unet_config_from_ldm",
    "unet_config_to_diffusers",
    "unet_state_from_diffusers",
    "unet_state_from_ldm",
    "unet_state_to_diffusers",
    "unet_state_to_ldm",
]

Format = Literal["diffusers", "ldm"]
Family = Literal["sd1", "sd2", "sdxl"]

LDM_PREFIX = "model.diffusion_model."
SD_TRANSFORMER_NORM_EPS = 1e-6  # the GroupNorm of SD's SpatialTransformer / Transformer2DModel
SDXL_TIME_EMBED_DIM = 256  # SDXL's addition_time_embed_dim (see models.unet.sdxl_vector)

# Heads and latent size per family: SD 1.x has 8 heads everywhere, SD 2.x and SDXL 64
# channels per head; the image size only places ``attention_resolutions``.
_FAMILIES: dict[str, dict[str, Any]] = {
    "sd1": dict(num_heads=8, image_size=64),
    "sd2": dict(num_head_channels=64, image_size=96),
    "sdxl": dict(num_head_channels=64, image_size=128),
}


@dataclass(frozen=True)
class _Leaf:
    """One difflab layer and the layer(s) it is in each format (several: concatenated
    along dim 0 into a fused difflab projection)."""

    ours: str
    diffusers: tuple[str, ...]
    ldm: tuple[str, ...]
    params: tuple[str, ...] = ("weight", "bias")
    is_layer: bool = True  # a Linear/Conv2d (False: a GroupNorm/LayerNorm)
    conv1x1: bool = False  # a transformer proj_in/proj_out (1x1 conv in SD 1.x files)

    def names(self, fmt: Format) -> tuple[str, ...]:
        return self.diffusers if fmt == "diffusers" else self.ldm


def _check_supported(cfg: UNetConfig) -> None:
    """The Stable Diffusion formats hold cross-attention U-Nets with strided-conv resampling;
    ADM's scale-shift ResBlocks keep their layer names (diffusers'
    ``resnet_time_scale_shift="scale_shift"``, ldm's ``use_scale_shift_norm``)."""
    problems = []
    if cfg.context_dim is None:
        problems.append("no cross-attention (context_dim=None)")
    if cfg.num_classes is not None:
        problems.append(f"class labels (num_classes={cfg.num_classes})")
    if cfg.resblock_updown:
        problems.append("residual down/upsampling (resblock_updown=True)")
    if problems:
        raise ValueError(
            "this UNetConfig has no Stable Diffusion checkpoint layout: " + "; ".join(problems)
        )


def _transformer(depth: int, fuse_qkv: bool) -> list[tuple[str, tuple[str, ...], dict]]:
    """``(difflab suffix, format suffixes, _Leaf options)`` of one SpatialTransformer; the
    suffixes are the same in diffusers and ldm files."""
    norm: dict[str, Any] = dict(is_layer=False)
    layer: dict[str, Any] = {}
    no_bias: dict[str, Any] = dict(params=("weight",))
    proj: dict[str, Any] = dict(conv1x1=True)
    items: list[tuple[str, tuple[str, ...], dict]] = [
        ("norm", ("norm",), norm),
        ("proj_in", ("proj_in",), proj),
    ]
    for k in range(depth):
        ours, theirs = f"blocks.{k}", f"transformer_blocks.{k}"
        for n, (mine, attn) in enumerate((("self_attn", "attn1"), ("cross_attn", "attn2")), 1):
            items.append((f"{ours}.norm{n}", (f"{theirs}.norm{n}",), norm))
            groups: list[tuple[str, tuple[str, ...]]]
            if not fuse_qkv:
                groups = [("to_q", ("to_q",)), ("to_k", ("to_k",)), ("to_v", ("to_v",))]
            elif mine == "self_attn":
                groups = [("to_qkv", ("to_q", "to_k", "to_v"))]
            else:
                groups = [("to_q", ("to_q",)), ("to_kv", ("to_k", "to_v"))]
            for name, parts in groups:
                full = tuple(f"{theirs}.{attn}.{p}" for p in parts)
                items.append((f"{ours}.{mine}.{name}", full, no_bias))
            items.append((f"{ours}.{mine}.to_out", (f"{theirs}.{attn}.to_out.0",), layer))
        items.append((f"{ours}.norm3", (f"{theirs}.norm3",), norm))
        items.append((f"{ours}.ff.proj_in", (f"{theirs}.ff.net.0.proj",), layer))
        items.append((f"{ours}.ff.proj_out", (f"{theirs}.ff.net.2",), layer))
    items.append(("proj_out", ("proj_out",), proj))
    return items


_RESBLOCK = [  # difflab, diffusers, ldm
    ("norm1", "norm1", "in_layers.0"),
    ("conv1", "conv1", "in_layers.2"),
    ("emb_proj", "time_emb_proj", "emb_layers.1"),
    ("norm2", "norm2", "out_layers.0"),
    ("conv2", "conv2", "out_layers.3"),
]


def _leaves(cfg: UNetConfig) -> list[_Leaf]:
    """Every parametrised layer of ``UNet(cfg)`` with its diffusers and ldm names, in the
    order ``UNet.__init__`` builds them."""
    _check_supported(cfg)
    leaves: list[_Leaf] = []

    def add(ours: str, dif: str, ldm: str, **options: Any) -> None:
        leaves.append(_Leaf(ours, (dif,), (ldm,), **options))

    def res(ours: str, dif: str, ldm: str, in_ch: int, out_ch: int) -> None:
        for mine, theirs, orig in _RESBLOCK:
            add(f"{ours}.{mine}", f"{dif}.{theirs}", f"{ldm}.{orig}", is_layer="norm" not in mine)
        if in_ch != out_ch:
            add(f"{ours}.skip", f"{dif}.conv_shortcut", f"{ldm}.skip_connection")

    def attn(ours: str, dif: str, ldm: str, depth: int) -> None:
        for mine, theirs, options in _transformer(depth, cfg.fuse_qkv):
            names = (tuple(f"{dif}.{t}" for t in theirs), tuple(f"{ldm}.{t}" for t in theirs))
            leaves.append(_Leaf(f"{ours}.{mine}", *names, **options))

    add("time_embed.0", "time_embedding.linear_1", "time_embed.0")
    add("time_embed.2", "time_embedding.linear_2", "time_embed.2")
    if cfg.vector_dim is not None:
        add("vector_embed.0", "add_embedding.linear_1", "label_emb.0.0")
        add("vector_embed.2", "add_embedding.linear_2", "label_emb.0.2")
    add("conv_in", "conv_in", "input_blocks.0.0")
    mc, levels, nrb = cfg.model_channels, len(cfg.channel_mult), cfg.num_res_blocks
    has_attn, depths = cfg.attention_levels, cfg.level_transformer_depth
    i, ch, skips = 0, mc, [mc]
    for level, mult in enumerate(cfg.channel_mult):
        for j in range(nrb):
            dif, ldm = f"down_blocks.{level}", f"input_blocks.{i + 1}"
            res(f"down.{i}.0", f"{dif}.resnets.{j}", f"{ldm}.0", ch, mc * mult)
            if has_attn[level]:
                attn(f"down.{i}.1", f"{dif}.attentions.{j}", f"{ldm}.1", depths[level])
            ch = mc * mult
            skips.append(ch)
            i += 1
        if level < levels - 1:
            add(
                f"down.{i}.0.conv",
                f"down_blocks.{level}.downsamplers.0.conv",
                f"input_blocks.{i + 1}.0.op",
            )
            skips.append(ch)
            i += 1
    res("middle.0", "mid_block.resnets.0", "middle_block.0", ch, ch)
    attn("middle.1", "mid_block.attentions.0", "middle_block.1", cfg.middle_transformer_depth)
    res("middle.2", "mid_block.resnets.1", "middle_block.2", ch, ch)
    idx = 0
    for b, level in enumerate(reversed(range(levels))):
        out_ch = mc * cfg.channel_mult[level]
        for j in range(nrb + 1):
            dif, ldm = f"up_blocks.{b}", f"output_blocks.{idx}"
            res(f"up.{idx}.0", f"{dif}.resnets.{j}", f"{ldm}.0", ch + skips.pop(), out_ch)
            ch = out_ch
            if has_attn[level]:
                attn(f"up.{idx}.1", f"{dif}.attentions.{j}", f"{ldm}.1", depths[level])
            if level > 0 and j == nrb:
                k = 1 + has_attn[level]
                add(f"up.{idx}.{k}.conv", f"{dif}.upsamplers.0.conv", f"{ldm}.{k}.conv")
            idx += 1
    add("norm_out", "conv_norm_out", "out.0", is_layer=False)
    add("conv_out", "conv_out", "out.2")
    return leaves


def _shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of ``UNet(cfg)``, from a weightless (meta) build."""
    with torch.device("meta"):
        model = UNet(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _as_linear(weight: Tensor, key: str) -> Tensor:
    """A 1x1-conv weight ``[O, I, 1, 1]`` as the same linear map ``[O, I]``."""
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        return weight.reshape(weight.shape[:2])
    if weight.ndim != 2:
        raise ValueError(
            f"'{key}' must be a linear [O, I] or 1x1-conv [O, I, 1, 1] weight, "
            f"got shape {tuple(weight.shape)}"
        )
    return weight


def _check_prefix(state: Mapping[str, Tensor], fmt: Format) -> None:
    if fmt == "ldm" and state and all(k.startswith(LDM_PREFIX) for k in state):
        raise ValueError(
            f"ldm U-Net keys must not carry the '{LDM_PREFIX}' prefix of full checkpoints; "
            "strip it with difflab.interop.ldm_unet_state(checkpoint)"
        )


def _state_to_difflab(
    state: Mapping[str, Tensor], cfg: UNetConfig, fmt: Format
) -> dict[str, Tensor]:
    """Rename (and reshape, concatenate) a ``fmt`` U-Net state dict into difflab's keys."""
    _check_prefix(state, fmt)
    shapes, out, used = _shapes(cfg), {}, set()
    for leaf in _leaves(cfg):
        for param in leaf.params:
            keys = [f"{name}.{param}" for name in leaf.names(fmt)]
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(
                    f"the {fmt} U-Net state has no key '{missing[0]}', which this "
                    f"config needs (for difflab's '{leaf.ours}.{param}')"
                )
            parts = [state[k] for k in keys]
            if leaf.conv1x1 and param == "weight":
                parts = [_as_linear(t, k) for t, k in zip(parts, keys)]
            value = parts[0] if len(parts) == 1 else torch.cat(parts)
            ours = f"{leaf.ours}.{param}"
            if tuple(value.shape) != shapes[ours]:
                raise ValueError(
                    f"{fmt} key '{keys[0]}' has shape {tuple(parts[0].shape)}, but this config "
                    f"needs {shapes[ours]} in total for difflab's '{ours}' (wrong config?)"
                )
            out[ours] = value
            used.update(keys)
    extra = [k for k in state if k not in used]
    if extra:
        raise ValueError(
            f"{len(extra)} key(s) of the {fmt} U-Net state have no place in this config, e.g. "
            f"'{extra[0]}' (a different architecture, or more than the U-Net?)"
        )
    return out


def _state_from_difflab(
    state: Mapping[str, Tensor], cfg: UNetConfig, fmt: Format
) -> dict[str, Tensor]:
    """Rename (and reshape, split) a difflab U-Net state dict into ``fmt``'s keys."""
    shapes, out, used = _shapes(cfg), {}, set()
    for leaf in _leaves(cfg):
        for param in leaf.params:
            ours = f"{leaf.ours}.{param}"
            if ours not in state:
                raise ValueError(f"the difflab U-Net state has no key '{ours}' for this config")
            value = state[ours]
            if tuple(value.shape) != shapes[ours]:
                raise ValueError(
                    f"difflab key '{ours}' has shape {tuple(value.shape)}, but this "
                    f"config needs {shapes[ours]}"
                )
            names = leaf.names(fmt)
            parts = value.chunk(len(names)) if len(names) > 1 else (value,)
            for name, part in zip(names, parts):
                if len(names) > 1:
                    part = part.clone()  # no shared storage (safetensors refuses it)
                if leaf.conv1x1 and param == "weight" and cfg.transformer_conv_proj:
                    part = part[:, :, None, None]  # (O, I, 1, 1)
                out[f"{name}.{param}"] = part
            used.add(ours)
    extra = [k for k in state if k not in used]
    if extra:
        raise ValueError(
            f"{len(extra)} difflab key(s) have no place in this config, e.g. '{extra[0]}'"
        )
    return out


def unet_state_from_diffusers(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict as a difflab ``UNet(cfg)`` state dict.

    :raises ValueError: naming the first missing, misshapen or unplaced key.
    """
    return _state_to_difflab(state, cfg, "diffusers")


def unet_state_to_diffusers(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """A difflab ``UNet(cfg)`` state dict as a diffusers ``UNet2DConditionModel`` one (1x1
    convs for ``proj_in``/``proj_out`` when ``cfg.transformer_conv_proj``)."""
    return _state_from_difflab(state, cfg, "diffusers")


def unet_state_from_ldm(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """An original-layout (CompVis ldm / Stability sgm) U-Net state dict, keys without the
    ``model.diffusion_model.`` prefix, as a difflab ``UNet(cfg)`` state dict."""
    return _state_to_difflab(state, cfg, "ldm")


def unet_state_to_ldm(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """A difflab ``UNet(cfg)`` state dict in the original ldm/sgm layout (no prefix)."""
    return _state_from_difflab(state, cfg, "ldm")


def ldm_unet_state(checkpoint: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The U-Net of a full ldm/sgm checkpoint: its ``model.diffusion_model.*`` keys, prefix
    stripped.

    :raises ValueError: when no key has the prefix.
    """
    unet = {k[len(LDM_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(LDM_PREFIX)}
    if not unet:
        raise ValueError(f"no '{LDM_PREFIX}*' key in this checkpoint (not a full ldm/sgm one?)")
    return unet


def diffusers_module_map(cfg: UNetConfig) -> dict[str, str]:
    """diffusers module name -> difflab module name for every Linear/Conv2d of the U-Net.

    Kohya-style LoRA names of SD 1.x/2.x files are these diffusers names with '.' -> '_'.
    With ``cfg.fuse_qkv`` several diffusers projections (``to_q``, ``to_k``, ``to_v``) name
    one fused difflab layer, rows in q, k, v order; SD configs use separate layers.
    """
    return {name: leaf.ours for leaf in _leaves(cfg) if leaf.is_layer for name in leaf.diffusers}


def ldm_module_map(cfg: UNetConfig) -> dict[str, str]:
    """ldm/sgm module name (no prefix) -> difflab module name for every Linear/Conv2d; the
    names kohya-style SDXL LoRA files use (with '.' -> '_')."""
    return {name: leaf.ours for leaf in _leaves(cfg) if leaf.is_layer for name in leaf.ldm}


def _compress_heads(widths: list[int], heads: list[int], used: list[bool]) -> dict[str, Any]:
    """UNetConfig head fields for per-level ``heads`` (only ``used`` levels matter): one
    width per head, else one head count, else one count per level."""
    levels = [i for i, u in enumerate(used) if u]
    per_head = {widths[i] // heads[i] if widths[i] % heads[i] == 0 else 0 for i in levels}
    if len(per_head) == 1 and 0 not in per_head:
        return dict(num_head_channels=per_head.pop())
    if len({heads[i] for i in levels}) == 1:
        return dict(num_heads=heads[levels[0]])
    return dict(num_heads=tuple(heads))


def _compress_depth(depths: list[int], attn: list[bool], middle: int) -> dict[str, Any]:
    """UNetConfig depth fields: one int when every attention site has ``middle`` blocks,
    else one count per level (0 where there is no attention, as sgm writes SDXL's)."""
    if {d for d, a in zip(depths, attn) if a} <= {middle}:
        return dict(transformer_depth=middle, transformer_depth_middle=None)
    per_level = tuple(d if a else 0 for d, a in zip(depths, attn))
    return dict(
        transformer_depth=per_level,
        transformer_depth_middle=None if middle == per_level[-1] else middle,
    )


def _sd_config(
    *,
    image_size: int,
    in_channels: int,
    out_channels: int,
    widths: list[int],
    num_res_blocks: int,
    attn: list[bool],
    context_dim: int,
    depth: dict[str, Any],
    heads: dict[str, Any],
    conv_proj: bool,
    vector_dim: int | None,
    norm_groups: int,
    dropout: float = 0.0,
    scale_shift: bool = False,
) -> UNetConfig:
    """The UNetConfig of a Stable Diffusion U-Net with these level widths and options."""
    mc = widths[0]
    if any(w % mc for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of the first ({mc})")
    factor = 2 ** (len(widths) - 1)
    if image_size % factor:
        raise ValueError(
            f"sample size {image_size} is not a multiple of {factor} "
            f"(2**(levels-1) for {len(widths)} levels)"
        )
    return UNetConfig(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(image_size // 2**i for i, a in enumerate(attn) if a),
        dropout=dropout,
        context_dim=context_dim,
        use_scale_shift_norm=scale_shift,
        norm_groups=norm_groups,
        transformer_norm_eps=SD_TRANSFORMER_NORM_EPS,
        fuse_qkv=False,
        vector_dim=vector_dim,
        transformer_conv_proj=conv_proj,
        **depth,
        **heads,
    )


# diffusers UNet2DConditionModel options difflab's UNet holds only at these values.
_DIFFUSERS_FIXED: dict[str, Any] = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}  # fmt: skip
_DIFFUSERS_READ = {
    "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
    "block_out_channels", "layers_per_block", "dropout", "norm_num_groups",
    "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
    "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "only_cross_attention",
    "mid_block_only_cross_attention",
    "upcast_attention",  # float32 attention scores: difflab's attention already has them
    "addition_embed_type_num_heads",  # used only by the "text_image" addition embedding
    "resnet_time_scale_shift",  # "default" (additive) or "scale_shift" (ADM)
}  # fmt: skip
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _per_level(config: Mapping[str, Any], key: str, default: Any, levels: int) -> list:
    """A diffusers option given as one value or one per level, as a per-level list."""
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(
                f"diffusers config '{key}' has {len(value)} entries for {levels} levels"
            )
        return list(value)
    return [value] * levels


def _one(config: Mapping[str, Any], key: str, default: Any, levels: int) -> Any:
    """A per-level diffusers option that difflab holds as one value."""
    values = _per_level(config, key, default, levels)
    if len(set(map(repr, values))) != 1:
        raise ValueError(
            f"diffusers config '{key}'={values} varies per level; difflab's UNet "
            "has one value for every level"
        )
    return values[0]


def _check_diffusers_options(config: Mapping[str, Any]) -> None:
    """Unknown keys and options difflab's UNet cannot hold raise ``ValueError``."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"expected a UNet2DConditionModel config, got {config['_class_name']}")
    unknown = [k for k in config if not k.startswith("_")]
    unknown = [k for k in unknown if k not in _DIFFUSERS_FIXED and k not in _DIFFUSERS_READ]
    if unknown:
        raise ValueError(f"unsupported diffusers UNet option(s): {', '.join(unknown)}")
    for key, allowed in _DIFFUSERS_FIXED.items():
        if key in config and config[key] != allowed:
            raise ValueError(
                f"unsupported diffusers UNet option {key}={config[key]!r} "
                f"(difflab's UNet holds only {allowed!r})"
            )
    only_cross = config.get("only_cross_attention", False)
    only_cross = [only_cross] if isinstance(only_cross, bool) else list(only_cross)
    if any(only_cross) or config.get("mid_block_only_cross_attention"):
        raise ValueError("unsupported diffusers UNet option only_cross_attention=True")
    if config.get("resnet_time_scale_shift", "default") not in ("default", "scale_shift"):
        raise ValueError(
            f"unsupported diffusers resnet_time_scale_shift "
            f"{config['resnet_time_scale_shift']!r} (supported: 'default', 'scale_shift')"
        )
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError(
            f"unsupported diffusers addition_embed_type "
            f"{config['addition_embed_type']!r} (supported: None, 'text_time')"
        )


def _block_attention(config: Mapping[str, Any]) -> list[bool]:
    """Which levels have attention, from the down and up block types (mirror images)."""
    default_down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    down = list(config.get("down_block_types", default_down))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    for kind, types, known in (("down", down, _DOWN), ("up", up, _UP)):
        bad = [t for t in types if t not in known]
        if bad:
            raise ValueError(
                f"unsupported diffusers {kind} block type(s) {bad} (supported: {', '.join(known)})"
            )
    attn = [_DOWN[t] for t in down]
    if [_UP[t] for t in reversed(up)] != attn or len(up) != len(down):
        raise ValueError(
            f"up_block_types {up} do not mirror down_block_types {down}; "
            "difflab's UNet has attention at the same levels on both paths"
        )
    return attn


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers ``UNet2DConditionModel`` ``config.json``.

    diffusers' ``attention_head_dim`` is the number of heads per level (its naming issue
    #2011). ``upcast_attention`` is accepted: difflab's attention keeps float32 scores.
    :raises ValueError: for block types or options difflab's UNet cannot hold.
    """
    _check_diffusers_options(config)
    attn = _block_attention(config)
    levels = len(attn)
    widths = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    if len(widths) != levels:
        raise ValueError(
            f"block_out_channels {widths} has {len(widths)} entries for {levels} block types"
        )
    heads = _per_level(config, "attention_head_dim", 8, levels)
    depths = _per_level(config, "transformer_layers_per_block", 1, levels)
    if any(not isinstance(d, int) for d in depths):
        raise ValueError(
            "unsupported diffusers transformer_layers_per_block per resnet "
            f"(nested lists): {depths}"
        )
    vector_dim = None
    if config.get("addition_embed_type") == "text_time":
        vector_dim = config.get("projection_class_embeddings_input_dim")
        if vector_dim is None:
            raise ValueError(
                "addition_embed_type 'text_time' needs projection_class_embeddings_input_dim"
            )
    sample = config.get("sample_size") or 64
    if isinstance(sample, (list, tuple)):
        if len(set(sample)) != 1:
            raise ValueError(f"non-square sample_size {sample} is not supported")
        sample = sample[0]
    groups = config.get("norm_num_groups", 32)
    if groups is None:
        raise ValueError("unsupported diffusers norm_num_groups=None")
    return _sd_config(
        image_size=int(sample),
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        widths=widths,
        num_res_blocks=_one(config, "layers_per_block", 2, levels),
        attn=attn,
        context_dim=_one(config, "cross_attention_dim", 1280, levels),
        depth=_compress_depth(depths, attn, depths[-1]),
        heads=_compress_heads(widths, heads, attn[:-1] + [True]),  # the middle: last level's
        conv_proj=not config.get("use_linear_projection", False),
        vector_dim=vector_dim,
        norm_groups=groups,
        dropout=config.get("dropout", 0.0),
        scale_shift=config.get("resnet_time_scale_shift") == "scale_shift",
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config (``config.json`` values) for ``cfg``.

    A ``vector_dim`` is written as SDXL's ``text_time`` addition embedding with 256-wide
    time-id embeddings (:func:`~difflab.models.unet.sdxl_vector`'s default).
    :raises ValueError: when diffusers cannot hold ``cfg`` (e.g. a middle-block depth that
        differs from an attention last level's, or a transformer GroupNorm eps other than 1e-6).
    """
    _check_supported(cfg)
    if cfg.transformer_norm_eps != SD_TRANSFORMER_NORM_EPS:
        raise ValueError(
            f"diffusers fixes the transformer GroupNorm eps at 1e-6; this config "
            f"has transformer_norm_eps={cfg.transformer_norm_eps}"
        )
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    if cfg.norm_groups > min(widths):
        raise ValueError(
            f"norm_groups={cfg.norm_groups} exceeds the narrowest width "
            f"{min(widths)}; diffusers does not clamp the group count"
        )
    attn, middle = cfg.attention_levels, cfg.middle_transformer_depth
    if isinstance(cfg.transformer_depth, int) and cfg.transformer_depth == middle:
        depth: int | list[int] = middle
    else:
        if attn[-1] and cfg.level_transformer_depth[-1] != middle:
            raise ValueError(
                "diffusers gives the middle block the last level's transformer "
                f"depth; this config has {cfg.level_transformer_depth[-1]} and "
                f"{middle}"
            )
        depth = [d if a else 1 for d, a in zip(cfg.level_transformer_depth, attn)]
        depth[-1] = middle
    if cfg.num_head_channels is None and isinstance(cfg.num_heads, int):
        heads: int | list[int] = cfg.num_heads
    else:
        heads = [max(1, h) for h in cfg.level_heads]
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.resolved_out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "transformer_layers_per_block": depth,
        "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": not cfg.transformer_conv_proj,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "dropout": cfg.dropout,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
    }
    if cfg.vector_dim is not None:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=cfg.vector_dim,
        )
    return config


def _children(state: Mapping[str, Tensor], prefix: str) -> dict[int, set[str]]:
    """``{N: {rest}}`` for the keys ``prefix.N.rest``."""
    out: dict[int, set[str]] = {}
    for key in state:
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1 :].partition(".")
            out.setdefault(int(index), set()).add(rest)
    return out


def _depth(keys: set[str], prefix: str) -> int:
    """Transformer blocks under ``prefix.transformer_blocks.K`` (0: no transformer)."""
    head = prefix + ".transformer_blocks."
    return len({k[len(head) :].split(".")[0] for k in keys if k.startswith(head)})


def _ldm_levels(state: Mapping[str, Tensor]) -> list[list[int]]:
    """Input-block indices of each level's residual blocks; strided convs (``N.0.op``)
    separate the levels."""
    inputs = _children(state, "input_blocks")
    levels: list[list[int]] = [[]]
    for n in sorted(inputs)[1:]:
        if "0.op.weight" in inputs[n]:
            levels.append([])
        elif "0.in_layers.0.weight" in inputs[n]:
            levels[-1].append(n)
        else:
            raise ValueError(
                f"input_blocks.{n} is neither a residual block nor a strided-conv "
                "downsample (residual up/down sampling is not supported)"
            )
    return levels


def _uniform(values: list, what: str) -> Any:
    if len(set(values)) != 1:
        raise ValueError(f"the ldm U-Net's {what} are not uniform: {values}")
    return values[0]


def unet_config_from_ldm(
    state: Mapping[str, Tensor],
    *,
    family: Family | None = None,
    num_heads: int | None = None,
    num_head_channels: int | None = None,
    image_size: int | None = None,
    norm_groups: int = 32,
) -> UNetConfig:
    """The :class:`UNetConfig` of an original-layout (ldm/sgm) U-Net state dict (no prefix),
    read from its keys and shapes: widths, levels, residual blocks, attention levels,
    transformer depth per level and in the middle, context width, 1x1-conv vs linear
    projections and the vector width.

    Heads and GroupNorm groups do not show in shapes: ``family`` gives SD 1.x's 8 heads or
    SD 2.x / SDXL's 64 channels per head (and the latent size used as ``image_size``);
    ``num_heads`` / ``num_head_channels`` / ``image_size`` override it. Without a family it
    is guessed: a vector input means SDXL, linear projections SD 2.x, 1x1 convs SD 1.x.
    :raises ValueError: for a state that is not a Stable Diffusion U-Net.
    """
    _check_prefix(state, "ldm")
    for key in ("input_blocks.0.0.weight", "out.2.weight", "middle_block.1.norm.weight"):
        if key not in state:
            raise ValueError(f"the ldm U-Net state has no '{key}' (not an SD U-Net?)")
    if "label_emb.weight" in state:
        raise ValueError("class-conditional ldm U-Nets (label_emb.weight) are not supported")
    levels = _ldm_levels(state)
    if any(not blocks for blocks in levels):
        raise ValueError("an ldm U-Net level without residual blocks is not supported")
    inputs = _children(state, "input_blocks")
    widths, attn, depths = [], [], []
    for blocks in levels:
        out = [state[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0] for n in blocks]
        widths.append(_uniform(out, "residual block widths"))
        if state[f"input_blocks.{blocks[0]}.0.emb_layers.1.weight"].shape[0] != widths[-1]:
            raise ValueError("scale-shift ldm ResBlocks (use_scale_shift_norm) are not supported")
        level_depths = [_depth(inputs[n], "1") for n in blocks]
        depths.append(_uniform(level_depths, "transformer depths"))
        attn.append(depths[-1] > 0)
    middle = _depth(set(state), "middle_block.1")
    to_k = next(k for k in state if k.endswith("attn2.to_k.weight"))
    proj = next(k for k in state if k.endswith("proj_in.weight"))
    conv_proj = state[proj].ndim == 4
    vector_dim = state["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in state else None
    if family is None:
        family = "sdxl" if vector_dim is not None else "sd1" if conv_proj else "sd2"
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r} (choices: {', '.join(_FAMILIES)})")
    preset = _FAMILIES[family]
    if num_heads is not None or num_head_channels is not None:
        heads = dict(num_heads=num_heads or 4, num_head_channels=num_head_channels)
    else:
        heads = {k: v for k, v in preset.items() if k.startswith("num_head")}
    return _sd_config(
        image_size=image_size or preset["image_size"],
        in_channels=state["input_blocks.0.0.weight"].shape[1],
        out_channels=state["out.2.weight"].shape[0],
        widths=widths,
        num_res_blocks=_uniform([len(b) for b in levels], "residual block counts"),
        attn=attn,
        context_dim=state[to_k].shape[1],
        depth=_compress_depth(depths, attn, middle),
        heads=heads,
        conv_proj=conv_proj,
        vector_dim=vector_dim,
        norm_groups=norm_groups,
    )
