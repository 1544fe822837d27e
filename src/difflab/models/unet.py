"""The difflab U-Net: ADM (Dhariwal & Nichol 2021) with LDM cross-attention (Rombach et al. 2022).

Owns the U-Net architecture, its serialisable config and size presets. Implements the
shared model contract ``model(x_t, t, class_labels=None, context=None, context_mask=None)``
and knows nothing of noise schedules, parametrizations or samplers.
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

from difflab.models.layers import (
    AttentionBlock,
    Dropout,
    SpatialTransformer,
    group_norm,
    timestep_embedding,
    upsample_then_conv,
    zero_init,
)

__all__ = ["UNet", "UNetConfig"]


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
    :param num_heads: attention heads (used when ``num_head_channels`` is ``None``).
    :param num_head_channels: channels per head; overrides ``num_heads`` (ADM).
    :param dropout: dropout in the residual blocks (DDPM uses 0.1 on CIFAR-10).
    :param num_classes: ``None`` = unconditional; else a class embedding with
        ``num_classes + 1`` rows, row ``num_classes`` being the null label for
        classifier-free guidance.
    :param context_dim: ``None`` = no cross-attention; else attention levels are LDM
        transformer blocks attending to ``context [B, L, context_dim]``.
    :param transformer_depth: transformer blocks per attention site when ``context_dim`` is set.
    :param learn_sigma: output ``2 * out_channels`` channels (eps and variance interpolation).
    :param use_scale_shift_norm: condition residual blocks by ``norm(h) * (1 + s) + b``
        (ADM) rather than by adding the embedding (DDPM).
    :param resblock_updown: down/upsample with residual blocks (BigGAN style, ADM) instead of
        strided / nearest-neighbour convolutions.
    :param use_checkpoint: gradient checkpointing of every block (trades compute for memory).
    :param norm_groups: GroupNorm groups, clamped to the width for tiny widths.
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 4
    num_head_channels: int | None = None
    dropout: float = 0.0
    num_classes: int | None = None
    context_dim: int | None = None
    transformer_depth: int = 1
    learn_sigma: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_checkpoint: bool = False
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        positive = ["image_size", "in_channels", "model_channels", "num_heads", "norm_groups"]
        positive += ["transformer_depth"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ["out_channels", "num_head_channels", "num_classes", "context_dim"]:
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

    @property
    def downsample_factor(self) -> int:
        """Total downsampling ``2 ** (levels - 1)``; input sides must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Resolution in pixels of each level at ``image_size``."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

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
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ValueError(
                f"unknown UNetConfig key(s): {', '.join(hints)}; valid keys: {', '.join(known)}"
            )
        return cls(**dict(data))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UNetConfig:
        """A named size preset, with field overrides: ``UNetConfig.preset("cifar10", dropout=0)``.

        :raises ValueError: for an unknown preset name or override key.
        """
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown U-Net preset '{name}'{hint} (choices: {', '.join(PRESETS)})")
        return cls.from_dict({**PRESETS[name], **overrides})


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
        res_kw = dict(
            emb_dim=emb_dim,
            dropout=cfg.dropout,
            norm_groups=cfg.norm_groups,
            scale_shift=cfg.use_scale_shift_norm,
        )

        def res(i: int, o: int, resample: str | None = None) -> ResBlock:
            return ResBlock(i, o, resample=resample, **res_kw)

        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, ch, resolution = [mc], mc, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Stage(res(ch, mc * mult), *self._attn(mc * mult, resolution)))
                ch = mc * mult
                skip_chs.append(ch)
            if level < len(cfg.channel_mult) - 1:
                down = res(ch, ch, "down") if cfg.resblock_updown else Downsample(ch)
                self.down.append(Stage(down))
                skip_chs.append(ch)
                resolution //= 2
        self.middle = Stage(res(ch, ch), *self._attn(ch, None), res(ch, ch))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [res(ch + skip_chs.pop(), mc * mult)]
                ch = mc * mult
                layers += self._attn(ch, resolution)
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, "up") if cfg.resblock_updown else Upsample(ch))
                    resolution *= 2
                self.up.append(Stage(*layers))
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.resolved_out_channels, 3, padding=1)
        self.initialize_weights(generator)

    def _attn(self, channels: int, resolution: int | None) -> list[nn.Module]:
        """Attention layers for one site (``resolution=None``: the middle block, always)."""
        cfg = self.config
        if resolution is not None and resolution not in cfg.attention_resolutions:
            return []
        if cfg.num_head_channels is not None:
            if channels % cfg.num_head_channels:
                raise ValueError(
                    f"{channels} channels are not a multiple of num_head_channels="
                    f"{cfg.num_head_channels}"
                )
            heads = channels // cfg.num_head_channels
        else:
            heads = cfg.num_heads
        if cfg.context_dim is not None:
            return [
                SpatialTransformer(
                    channels, heads, cfg.context_dim, cfg.transformer_depth, cfg.norm_groups
                )
            ]
        return [AttentionBlock(channels, heads, cfg.norm_groups)]

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
        self, stage: Stage, h: Tensor, emb: Tensor, ctx: Tensor | None, mask: Tensor | None
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
    ) -> Tensor:
        """Predict from ``x_t [B, C, H, W]`` at timesteps ``t [B]`` (float, training units).

        :param t: float tensor ``[B]`` (fractional allowed) or a scalar broadcast to the batch.
        :param class_labels: long ``[B]``; required only by a class-conditional model, where
            ``None`` means every sample gets the null label (unconditional prediction).
        :param context: ``[B, L, context_dim]`` token embeddings for cross-attention.
        :param context_mask: boolean ``[B, L]``, True = keep the token.
        :return: ``[B, resolved_out_channels, H, W]`` in ``x``'s dtype.
        """
        t, class_labels, context_mask = self._check_inputs(
            x, t, class_labels, context, context_mask
        )
        dtype = self.conv_in.weight.dtype  # the model's; autocast may lower it further
        emb = timestep_embedding(t, self.config.model_channels).to(dtype)  # (B, mc)
        emb = self.time_embed(emb)  # (B, 4mc)
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels)
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

    def _check_inputs(
        self,
        x: Tensor,
        t: Tensor | float,
        class_labels: Tensor | None,
        context: Tensor | None,
        context_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Validate shapes and conditioning; return ``t [B]``, labels and mask on x's device."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"UNet expects x of shape [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}"
            )
        b, f = x.shape[0], cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {f} "
                f"(2**(levels-1) for channel_mult={cfg.channel_mult})"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or of shape [{b}], got {tuple(t.shape)}")
        if cfg.num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional UNet (num_classes=None)")
        elif class_labels is None:
            class_labels = torch.full((b,), cfg.num_classes, dtype=torch.long, device=x.device)
        elif class_labels.shape != (b,) or class_labels.is_floating_point():
            raise ValueError(
                f"class_labels must be an integer tensor of shape [{b}], "
                f"got {class_labels.dtype} {tuple(class_labels.shape)}"
            )
        if cfg.context_dim is None:
            if context is not None or context_mask is not None:
                raise ValueError(
                    "context given to a UNet without cross-attention (context_dim=None)"
                )
        else:
            if context is None:
                raise ValueError(f"this UNet needs context [B, L, {cfg.context_dim}]")
            if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
                raise ValueError(
                    f"context must have shape [{b}, L, {cfg.context_dim}], "
                    f"got {tuple(context.shape)}"
                )
            if context_mask is not None:
                if context_mask.shape != context.shape[:2]:
                    raise ValueError(
                        f"context_mask must have shape {tuple(context.shape[:2])}, "
                        f"got {tuple(context_mask.shape)}"
                    )
                context_mask = context_mask.to(torch.bool)
        return t, class_labels, context_mask


def _redraw(module: nn.Module, generator: torch.Generator) -> None:
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
