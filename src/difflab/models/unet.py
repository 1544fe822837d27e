"""The difflab U-Net: ADM (Dhariwal & Nichol 2021) with LDM cross-attention (Rombach et al. 2022).

Owns the U-Net architecture, its serialisable config and size presets. Implements the
shared model contract ``model(x_t, t, class_labels=None, context=None, context_mask=None)``
(plus the keyword ``vector=`` of SDXL-style models) and knows nothing of noise schedules,
parametrizations or samplers. The options that hold Stable Diffusion 1.x / 2.x / SDXL
U-Nets exactly (per-level transformer depth and heads, separate q/k/v, the pooled "vector"
embedding) live here; the checkpoint formats themselves live in :mod:`difflab.interop`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from difflab._validate import check_keys
from difflab.models.contract import check_model_inputs
from difflab.models.layers import (
    AttentionBlock,
    Dropout,
    SpatialTransformer,
    group_norm,
    timestep_embedding,
    upsample_then_conv,
    zero_init,
)

__all__ = ["UNet", "UNetConfig", "sdxl_vector"]


@dataclass
class UNetConfig:
    """Architecture of a :class:`UNet`; plain, YAML-able values only.

    :param image_size: training resolution in pixels; ``attention_resolutions`` refer to it.
    :param in_channels: channels of ``x_t``.
    :param out_channels: channels of the prediction (``None`` = ``in_channels``); doubled
        when ``learn_sigma`` (improved DDPM, Nichol & Dhariwal 2021).
    :param model_channels: width of the first level; level ``i`` has
        ``model_channels * channel_mult[i]`` channels.
    :param channel_mult: width multiplier per level; the U-Net downsamples
        ``len(channel_mult) - 1`` times.
    :param num_res_blocks: residual blocks per level on the way down (one more on the way up).
    :param attention_resolutions: resolutions in pixels (e.g. ``(16, 8)``) where attention
        is applied; each must be ``image_size // 2**level`` for some level. The middle
        block always has attention (ADM).
    :param num_heads: attention heads (used when ``num_head_channels`` is ``None``): one
        count for every level, or one per level (the middle block uses the last level's).
    :param num_head_channels: channels per head; overrides ``num_heads`` (ADM).
    :param dropout: dropout in the residual blocks (DDPM uses 0.1 on CIFAR-10).
    :param num_classes: ``None`` = unconditional; else a class embedding with
        ``num_classes + 1`` rows, row ``num_classes`` being the null label for
        classifier-free guidance.
    :param context_dim: ``None`` = no cross-attention; else attention levels are LDM
        transformer blocks attending to ``context [B, L, context_dim]``.
    :param transformer_depth: transformer blocks per attention site when ``context_dim`` is
        set: one count, or one per level (entries of levels without attention are ignored and
        may be 0; SDXL: ``(0, 2, 10)``).
    :param learn_sigma: output ``2 * out_channels`` channels (eps and variance interpolation).
    :param use_scale_shift_norm: condition residual blocks by ``norm(h) * (1 + s) + b``
        (ADM) rather than by adding the embedding (DDPM).
    :param resblock_updown: down/upsample with residual blocks (BigGAN style, ADM) instead of
        strided / nearest-neighbour convolutions.
    :param use_checkpoint: gradient checkpointing of every block (trades compute for memory).
    :param norm_groups: GroupNorm groups, clamped to the width for tiny widths.
    :param transformer_depth_middle: transformer blocks of the middle block (``None`` = the
        last level's ``transformer_depth``, as in SDXL's sgm code).
    :param transformer_norm_eps: epsilon of the transformers' GroupNorm (Stable Diffusion:
        1e-6; the residual blocks keep 1e-5).
    :param fuse_qkv: fused attention projections (``to_qkv``, ``to_kv``); ``False`` gives the
        separate ``to_q``/``to_k``/``to_v`` of Stable Diffusion checkpoints. Same function.
    :param vector_dim: ``None``, or the width of a per-sample vector ``[B, vector_dim]`` whose
        MLP embedding is added to the timestep embedding (SDXL's pooled text embedding and
        size/crop embeddings, :func:`sdxl_vector`; sgm's ``adm_in_channels``).
    :param transformer_conv_proj: the checkpoint formats store the transformers'
        ``proj_in``/``proj_out`` as 1x1 convolutions (Stable Diffusion 1.x) rather than
        linear layers (2.x, SDXL). difflab always runs them as the same ``Linear`` map; only
        the key mappings of :mod:`difflab.interop` read this flag.
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int | tuple[int, ...] = 4
    num_head_channels: int | None = None
    dropout: float = 0.0
    num_classes: int | None = None
    context_dim: int | None = None
    transformer_depth: int | tuple[int, ...] = 1
    learn_sigma: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_checkpoint: bool = False
    norm_groups: int = 32
    transformer_depth_middle: int | None = None
    transformer_norm_eps: float = 1e-5
    fuse_qkv: bool = True
    vector_dim: int | None = None
    transformer_conv_proj: bool = False

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        for name in ["num_heads", "transformer_depth"]:
            if not isinstance(getattr(self, name), int):
                setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ["image_size", "in_channels", "model_channels", "norm_groups"]:
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        names = ["out_channels", "num_head_channels", "num_classes", "context_dim"]
        names += ["transformer_depth_middle", "vector_dim"]
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1 or None, got {value}")
        if self.num_res_blocks < 0:
            raise ValueError(f"UNetConfig.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(
                f"channel_mult must be non-empty positive ints, got {self.channel_mult}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.transformer_norm_eps > 0:
            raise ValueError(f"transformer_norm_eps must be > 0, got {self.transformer_norm_eps}")
        self._check_per_level("num_heads", minimum=1)
        self._check_per_level("transformer_depth", minimum=0)
        factor = self.downsample_factor
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by {factor} "
                f"(2**{len(self.channel_mult) - 1} for {len(self.channel_mult)} levels)"
            )
        valid = self.level_resolutions
        bad = [r for r in self.attention_resolutions if r not in valid]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad} match no level of this U-Net; "
                f"the levels have resolutions {valid}"
            )
        if self.context_dim is not None:
            depths = self.level_transformer_depth
            empty = [i for i, a in enumerate(self.attention_levels) if a and depths[i] < 1]
            if empty:
                raise ValueError(
                    f"transformer_depth {self.transformer_depth} is 0 at attention level(s) "
                    f"{empty}; give them >= 1 block or drop them from attention_resolutions"
                )
            if self.middle_transformer_depth < 1:
                raise ValueError(
                    "the middle block always has attention: set transformer_depth_middle >= 1 "
                    f"(transformer_depth {self.transformer_depth} ends in 0)"
                )

    def _check_per_level(self, name: str, minimum: int) -> None:
        """``name`` is an int >= 1 or a tuple of one int >= ``minimum`` per level."""
        value, levels = getattr(self, name), len(self.channel_mult)
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {value}")
        elif len(value) != levels or min(value) < minimum:
            raise ValueError(
                f"UNetConfig.{name} must be an int or {levels} ints >= {minimum} (one per "
                f"level of channel_mult={self.channel_mult}), got {value}"
            )

    @property
    def downsample_factor(self) -> int:
        """Total downsampling ``2 ** (levels - 1)``; input sides must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Resolution in pixels of each level at ``image_size``."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """Whether each level has attention (its resolution is in ``attention_resolutions``)."""
        return tuple(r in self.attention_resolutions for r in self.level_resolutions)

    @property
    def level_transformer_depth(self) -> tuple[int, ...]:
        """Transformer blocks per attention site of each level."""
        depth = self.transformer_depth
        return (depth,) * len(self.channel_mult) if isinstance(depth, int) else depth

    @property
    def middle_transformer_depth(self) -> int:
        """Transformer blocks of the middle block (default: the last level's)."""
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return self.level_transformer_depth[-1]

    @property
    def level_heads(self) -> tuple[int, ...]:
        """Attention heads of each level (the middle block has the last level's); with
        ``num_head_channels`` the width over it, rounded down (checked where attention is)."""
        widths = [self.model_channels * m for m in self.channel_mult]
        if self.num_head_channels is not None:
            return tuple(w // self.num_head_channels for w in widths)
        heads = self.num_heads
        return (heads,) * len(widths) if isinstance(heads, int) else heads

    @property
    def resolved_out_channels(self) -> int:
        """Channels the network outputs (``2 * out_channels`` when ``learn_sigma``)."""
        out = self.in_channels if self.out_channels is None else self.out_channels
        return 2 * out if self.learn_sigma else out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (ints, floats, bools, lists, None) suitable for YAML/JSON."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`. Unknown keys raise ``ValueError`` with a suggestion."""
        check_keys("UNetConfig", data, [f.name for f in dataclasses.fields(cls)])
        return cls(**dict(data))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UNetConfig:
        """A named size preset, with field overrides: ``UNetConfig.preset("cifar10", dropout=0)``.

        A preset asked for at another ``image_size`` keeps attention at the same *levels*
        when its own ``attention_resolutions`` match no level there (``tiny`` at 32 px:
        ``(4,)``, the second level at 8 px, becomes ``(16,)``); resolutions that still match
        a level, or ones given in ``overrides``, are kept as they are.

        :raises ValueError: for an unknown preset name or override key.
        """
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown U-Net preset '{name}'{hint} (choices: {', '.join(PRESETS)})")
        spec = {**PRESETS[name], **overrides}
        if "attention_resolutions" not in overrides and isinstance(spec["image_size"], int):
            spec["attention_resolutions"] = _attention_at_size(PRESETS[name], spec["image_size"])
        return cls.from_dict(spec)


# Size presets. "cifar10" is the DDPM CIFAR-10 network (Ho et al. 2020, appendix B) with
# ADM's scale-shift conditioning; "base" follows ADM's ImageNet-64 shape at a smaller width.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=8, in_channels=1, model_channels=32, channel_mult=(1, 2),
                 num_res_blocks=1, attention_resolutions=(4,), num_heads=2, norm_groups=8),
    "digits": dict(image_size=16, in_channels=1, model_channels=64, channel_mult=(1, 2, 2),
                   num_res_blocks=2, attention_resolutions=(8,), num_head_channels=32,
                   dropout=0.1),
    "cifar10": dict(image_size=32, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                    num_res_blocks=2, attention_resolutions=(16,), num_heads=1, dropout=0.1),
    "small": dict(image_size=64, in_channels=3, model_channels=64, channel_mult=(1, 2, 3, 4),
                  num_res_blocks=2, attention_resolutions=(16, 8), num_head_channels=32),
    "base": dict(image_size=64, in_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
                 num_res_blocks=3, attention_resolutions=(32, 16, 8), num_head_channels=64,
                 resblock_updown=True, dropout=0.1),
}  # fmt: skip


def _attention_at_size(preset: dict[str, Any], size: int) -> tuple[int, ...]:
    """``preset``'s attention resolutions moved to ``size``: unchanged when each is a level
    there, else the same level indices (``r * size / preset_size``)."""
    levels = len(preset["channel_mult"])
    old = tuple(preset["attention_resolutions"])
    if all(r in [size // 2**i for i in range(levels)] for r in old):
        return old
    base = preset["image_size"]
    return tuple(size // (base // r) for r in old if base % r == 0 and size % (base // r) == 0)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution (DDPM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 convolution (DDPM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_then_conv(self.conv, x)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding (DDPM; ADM scale-shift norm and up/down).

    ``skip(x) + conv(drop(act(norm(h) * (1 + s) + b)))`` with ``h = conv(act(norm(x)))``
    and ``(s, b) = Linear(act(emb))``; the last conv is zero-initialised by
    :meth:`UNet.initialize_weights` so the block starts as ``skip``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        *,
        dropout: float,
        norm_groups: int,
        scale_shift: bool,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_ch, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = group_norm(out_ch, norm_groups)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.resample = resample  # None | "down" | "up"

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        """``x [B, C_in, H, W]``, ``emb_act = SiLU(emb) [B, D]`` -> ``[B, C_out, H', W']``."""
        h = F.silu(self.norm1(x))
        if self.resample == "up":  # conv1(upsample(h)), folded into one op
            h, x = upsample_then_conv(self.conv1, h), self._resample(x)
        else:
            h, x = self.conv1(self._resample(h)), self._resample(x)
        emb = self.emb_proj(emb_act)[:, :, None, None]  # (B, C_out or 2*C_out, 1, 1)
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Stage(nn.Sequential):
    """A run of U-Net layers, each called with what it needs (embedding, context)."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb_act: Tensor, context: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb_act)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """U-Net noise-prediction network of ADM (Dhariwal & Nichol 2021), after DDPM (Ho et al.
    2020) and improved DDPM (Nichol & Dhariwal 2021), with optional class conditioning and
    LDM cross-attention (Rombach et al. 2022).

    ``model(x_t [B, C, H, W], t [B]) -> [B, C_out, H, W]`` where ``H`` and ``W`` are
    multiples of ``config.downsample_factor``.
    """

    def __init__(self, config: UNetConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = (
            nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        )
        self.vector_embed: nn.Sequential | None = None
        if cfg.vector_dim is not None:  # sgm's label_emb, diffusers' add_embedding
            self.vector_embed = nn.Sequential(
                nn.Linear(cfg.vector_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
        res_kw: dict[str, Any] = dict(
            emb_dim=emb_dim,
            dropout=cfg.dropout,
            norm_groups=cfg.norm_groups,
            scale_shift=cfg.use_scale_shift_norm,
        )

        def res(i: int, o: int, resample: str | None = None) -> ResBlock:
            return ResBlock(i, o, resample=resample, **res_kw)

        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Stage(res(ch, mc * mult), *self._attn(mc * mult, level)))
                ch = mc * mult
                skip_chs.append(ch)
            if level < len(cfg.channel_mult) - 1:
                down = res(ch, ch, "down") if cfg.resblock_updown else Downsample(ch)
                self.down.append(Stage(down))
                skip_chs.append(ch)
        self.middle = Stage(res(ch, ch), *self._attn(ch, None), res(ch, ch))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [res(ch + skip_chs.pop(), mc * mult)]
                ch = mc * mult
                layers += self._attn(ch, level)
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, "up") if cfg.resblock_updown else Upsample(ch))
                self.up.append(Stage(*layers))
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.resolved_out_channels, 3, padding=1)
        self.initialize_weights(generator)

    def _attn(self, channels: int, level: int | None) -> list[nn.Module]:
        """Attention layers for one site of ``level`` (``None``: the middle block, always)."""
        cfg = self.config
        if level is not None and not cfg.attention_levels[level]:
            return []
        if cfg.num_head_channels is not None and channels % cfg.num_head_channels:
            raise ValueError(
                f"{channels} channels are not a multiple of num_head_channels="
                f"{cfg.num_head_channels}"
            )
        heads = cfg.level_heads[-1 if level is None else level]
        if cfg.context_dim is None:
            return [AttentionBlock(channels, heads, cfg.norm_groups)]
        if level is None:
            depth = cfg.middle_transformer_depth
        else:
            depth = cfg.level_transformer_depth[level]
        transformer = SpatialTransformer(
            channels,
            heads,
            cfg.context_dim,
            depth,
            cfg.norm_groups,
            norm_eps=cfg.transformer_norm_eps,
            fuse_qkv=cfg.fuse_qkv,
        )
        return [transformer]

    @property
    def null_class_label(self) -> int:
        """Index of the reserved null label for classifier-free guidance (``num_classes``)."""
        if self.config.num_classes is None:
            raise AttributeError("an unconditional UNet (num_classes=None) has no null label")
        return self.config.num_classes

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """The one place the U-Net is initialised (DiT style).

        With ``generator``, every convolution, linear and embedding layer is redrawn from
        PyTorch's default rule (uniform ±1/sqrt(fan_in); N(0, 1) for embeddings) so the
        result depends only on the generator (without it, the layers keep the default
        initialisation they were built with);
        then the output of every residual branch (each residual block's last conv, each
        attention / transformer output projection) and the final conv are zeroed, so the
        fresh network is the identity on every residual path and outputs exactly zero.
        """
        if generator is not None:
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    _redraw(m, generator)
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero_init(m.conv2)
            elif isinstance(m, (AttentionBlock, SpatialTransformer)):
                zero_init(m.proj_out)
        zero_init(self.conv_out)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Switch gradient checkpointing of every stage on or off (``config`` follows)."""
        self.config = dataclasses.replace(self.config, use_checkpoint=enabled)

    def _run(
        self, stage: nn.Module, h: Tensor, emb: Tensor, ctx: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        if self.config.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, ctx, mask, use_reentrant=False)
        return stage(h, emb, ctx, mask)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        *,
        vector: Tensor | None = None,
    ) -> Tensor:
        """Predict from ``x_t [B, C, H, W]`` at timesteps ``t [B]`` (float, training units).

        :param t: float tensor ``[B]`` (fractional allowed) or a scalar broadcast to the batch.
        :param class_labels: long ``[B]``; required only by a class-conditional model, where
            ``None`` means every sample gets the null label (unconditional prediction).
        :param context: ``[B, L, context_dim]`` token embeddings for cross-attention.
        :param context_mask: boolean ``[B, L]``, True = keep the token.
        :param vector: ``[B, vector_dim]``, required exactly when ``config.vector_dim`` is set
            (SDXL: :func:`sdxl_vector`).
        :return: ``[B, resolved_out_channels, H, W]`` in ``x``'s dtype.
        """
        t, class_labels, context_mask = self._check_inputs(
            x, t, class_labels, context, context_mask
        )
        self._check_vector(x.shape[0], vector)
        dtype = self.conv_in.weight.dtype  # the model's; autocast may lower it further
        emb = timestep_embedding(t, self.config.model_channels).to(dtype)  # (B, mc)
        emb = self.time_embed(emb)  # (B, 4mc)
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels)
        if self.vector_embed is not None and vector is not None:  # checked: both or neither
            emb = emb + self.vector_embed(vector.to(dtype))  # (B, 4mc)
        emb_act = F.silu(emb)  # every ResBlock's embedding projection starts with SiLU
        if context is not None:
            context = context.to(dtype)
        h = self.conv_in(x.to(dtype))
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb_act, context, context_mask)
            skips.append(h)
        h = self._run(self.middle, h, emb_act, context, context_mask)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb_act, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)

    def _check_vector(self, batch: int, vector: Tensor | None) -> None:
        """``vector`` is ``[B, vector_dim]`` exactly when the config has a ``vector_dim``."""
        dim = self.config.vector_dim
        if dim is None:
            if vector is not None:
                raise ValueError("vector given to a UNet without vector_dim (vector_dim=None)")
        elif vector is None or vector.shape != (batch, dim):
            got = None if vector is None else tuple(vector.shape)
            raise ValueError(f"this UNet needs vector of shape [{batch}, {dim}], got {got}")

    def _check_inputs(
        self,
        x: Tensor,
        t: Tensor | float,
        class_labels: Tensor | None,
        context: Tensor | None,
        context_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Validate shapes and conditioning; return ``t [B]``, labels and mask on x's device."""
        return check_model_inputs("UNet", self.config, x, t, class_labels, context, context_mask)


def _redraw(module: nn.Linear | nn.Conv2d | nn.Embedding, generator: torch.Generator) -> None:
    """PyTorch's default init of a layer (uniform ±1/sqrt(fan_in), N(0, 1) for an
    embedding), drawn from ``generator``."""
    weight = module.weight
    if isinstance(module, nn.Embedding):
        weight.normal_(generator=generator)
        return
    bound = weight[0].numel() ** -0.5  # fan_in = in_features * kernel area
    weight.uniform_(-bound, bound, generator=generator)
    if module.bias is not None:
        module.bias.uniform_(-bound, bound, generator=generator)


def sdxl_vector(pooled: Tensor, time_ids: Tensor, embed_dim: int = 256) -> Tensor:
    """SDXL's ``vector`` input (Podell et al. 2023, sec. 2.2): the pooled text embedding
    ``[B, P]`` followed by the sinusoidal embeddings (:func:`timestep_embedding`, cos first)
    of each of the ``time_ids [B, K]`` (original size, crop top-left, target size: K = 6),
    ``embed_dim`` wide each -> ``[B, P + K * embed_dim]`` in ``pooled``'s dtype. This is
    diffusers' ``add_time_proj`` + concatenation.
    """
    if pooled.ndim != 2 or time_ids.ndim != 2 or time_ids.shape[0] != pooled.shape[0]:
        raise ValueError(
            f"sdxl_vector needs pooled [B, P] and time_ids [B, K], got {tuple(pooled.shape)} "
            f"and {tuple(time_ids.shape)}"
        )
    b = pooled.shape[0]
    times = timestep_embedding(time_ids.flatten(), embed_dim).reshape(b, -1)  # (B, K*embed_dim)
    return torch.cat([pooled, times.to(pooled.dtype)], dim=-1)
