"""The difflab DiT: a diffusion transformer with adaLN-Zero blocks (Peebles & Xie 2023).

Owns the DiT architecture, its serialisable config and size presets: patchify, the fixed
2-D sin-cos position embedding, timestep and class embeddings, adaLN-Zero transformer blocks
(with an optional cross-attention layer on text tokens, as the paper's cross-attention
variant and PixArt-α do), the final adaLN layer and unpatchify. Implements the shared model
contract ``model(x_t, t, class_labels=None, context=None, context_mask=None)`` and knows
nothing of noise schedules, parametrizations or samplers.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.checkpoint import checkpoint

from difflab._validate import check_keys
from difflab.models.contract import check_model_inputs
from difflab.models.layers import CrossAttention, timestep_embedding, zero_init

__all__ = ["ARCH", "DiT", "DiTConfig", "sincos_pos_embed_2d"]

ARCH = "dit"  # the ``model.arch`` value of a run config that builds a DiT


@dataclass
class DiTConfig:
    """Architecture of a :class:`DiT`; plain, YAML-able values only.

    :param image_size: training resolution (pixels, or latent cells for latent diffusion).
    :param in_channels: channels of ``x_t``.
    :param out_channels: channels of the prediction (``None`` = ``in_channels``); doubled
        when ``learn_sigma``.
    :param patch_size: side ``p`` of the square patches that become tokens; input sides
        must be multiples of it (it is the model's ``downsample_factor``).
    :param hidden_size: token width ``D`` (a multiple of 4, for the 2-D sin-cos embedding).
    :param depth: number of DiT blocks.
    :param num_heads: attention heads (``hidden_size`` must be divisible by it).
    :param mlp_ratio: width of the block MLP as a multiple of ``hidden_size`` (4 in DiT).
    :param num_classes: ``None`` = unconditional; else a class embedding with
        ``num_classes + 1`` rows, row ``num_classes`` being the null label for
        classifier-free guidance.
    :param context_dim: ``None`` = no cross-attention; else every block attends to
        ``context [B, L, context_dim]`` after its self-attention.
    :param learn_sigma: output ``2 * out_channels`` channels (eps and variance interpolation).
    :param frequency_dim: width of the sinusoidal timestep features fed to the timestep MLP
        (256 in DiT).
    :param use_checkpoint: gradient checkpointing of every block.
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    context_dim: int | None = None
    learn_sigma: bool = False
    frequency_dim: int = 256
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        positive = ["image_size", "in_channels", "patch_size", "hidden_size", "depth"]
        for name in positive + ["num_heads", "frequency_dim"]:
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ["out_channels", "num_classes", "context_dim"]:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1 or None, got {value}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.hidden_size % 4:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} must be a multiple of 4 "
                "(the 2-D sin-cos position embedding gives each axis a sin and a cos half)"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )

    @property
    def downsample_factor(self) -> int:
        """Input sides must be multiples of this: the patch size."""
        return self.patch_size

    @property
    def resolved_out_channels(self) -> int:
        """Channels the network outputs (``2 * out_channels`` when ``learn_sigma``)."""
        out = self.in_channels if self.out_channels is None else self.out_channels
        return 2 * out if self.learn_sigma else out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for YAML/JSON, with ``arch: dit`` so a run config rebuilds a DiT."""
        return {"arch": ARCH, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiTConfig:
        """Inverse of :meth:`to_dict` (``arch`` optional). Unknown keys raise ``ValueError``
        with a suggestion."""
        data = dict(data)
        arch = data.pop("arch", ARCH)
        if arch != ARCH:
            raise ValueError(f"DiTConfig.from_dict got arch={arch!r}; expected {ARCH!r}")
        check_keys("DiTConfig", data, [f.name for f in dataclasses.fields(cls)])
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DiTConfig:
        """A named size preset with field overrides: ``DiTConfig.preset("S/2", num_classes=10)``.

        :raises ValueError: for an unknown preset name or override key.
        """
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown DiT preset '{name}'{hint} (choices: {', '.join(PRESETS)})")
        return cls.from_dict({**PRESETS[name], **overrides})


# Size presets. "tiny" is for tests; "digits" and "cifar10" are sized for 8-32 px work on a
# CPU; "S/2" ... "XL/2" are the paper's Table 1 models on 32x32x4 latents (256 px images).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2,
                 num_heads=2),
    "digits": dict(image_size=16, in_channels=1, patch_size=2, hidden_size=128, depth=6,
                   num_heads=4),
    "cifar10": dict(image_size=32, in_channels=3, patch_size=2, hidden_size=256, depth=8,
                    num_heads=4),
    "S/2": dict(image_size=32, in_channels=4, patch_size=2, hidden_size=384, depth=12,
                num_heads=6),
    "B/2": dict(image_size=32, in_channels=4, patch_size=2, hidden_size=768, depth=12,
                num_heads=12),
    "L/2": dict(image_size=32, in_channels=4, patch_size=2, hidden_size=1024, depth=24,
                num_heads=16),
    "XL/2": dict(image_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28,
                 num_heads=16),
}  # fmt: skip


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding of a ``height x width`` token grid (MAE / DiT).

    The first ``dim/2`` channels encode the column, the rest the row, each as
    ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000 ** (-i / (dim/4))``. Built in
    float64. :return: ``[height * width, dim]`` in row-major token order.
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(pos: Tensor) -> Tensor:
        args = pos.double()[:, None] * omega[None]  # (N, dim/4)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (N, dim/2)

    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([axis(cols.flatten()), axis(rows.flatten())], dim=1)  # (H*W, dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` per sample; ``x [B, N, D]``, ``shift, scale [B, D]``."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Mlp(nn.Module):
    """The block MLP of ViT / DiT: ``fc2(GELU_tanh(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (Peebles & Xie 2023, sec. 3.2, Fig. 3).

    ``x + α1 · attn(modulate(LN(x), β1, γ1))``, then (with a context) ``x + xattn(LN(x),
    context)``, then ``x + α2 · mlp(modulate(LN(x), β2, γ2))``, where ``(β1, γ1, α1, β2, γ2,
    α2) = Linear(SiLU(c))``. The modulation and the cross-attention's output projection are
    zero-initialised by :meth:`DiT.initialize_weights`, so the fresh block is the identity.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, context_dim: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads)
        self.cross_norm: nn.Module | None = None
        self.cross_attn: CrossAttention | None = None
        if context_dim is not None:
            self.cross_norm = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = CrossAttention(dim, num_heads, context_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Linear(dim, 6 * dim)  # applied to SiLU(c)

    def forward(
        self, x: Tensor, c_act: Tensor, context: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        """``x [B, N, D]``, ``c_act = SiLU(c) [B, D]`` -> ``[B, N, D]``."""
        mods = self.adaLN_modulation(c_act).chunk(6, dim=1)  # 6 x (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None and self.cross_norm is not None:  # set together
            x = x + self.cross_attn(self.cross_norm(x), context, mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN then a linear map of each token to its ``p * p * C_out`` patch values (DiT)."""

    def __init__(self, dim: int, patch_values: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(dim, 2 * dim)  # applied to SiLU(c)
        self.linear = nn.Linear(dim, patch_values)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c_act).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C_out)


class DiT(nn.Module):
    """Diffusion transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with
    Transformers"), adaLN-Zero variant, with optional class conditioning and cross-attention
    on text tokens.

    ``model(x_t [B, C, H, W], t [B]) -> [B, C_out, H, W]`` where ``H`` and ``W`` are
    multiples of ``config.patch_size``; other sizes than ``config.image_size`` get the
    position embedding of their own grid.
    """

    def __init__(self, config: DiTConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        d, p = cfg.hidden_size, cfg.patch_size
        self.x_embed = nn.Conv2d(cfg.in_channels, d, p, stride=p)  # patchify
        # Fixed, so neither a parameter nor a buffer (a cast to bf16 would degrade a buffer
        # for good): float32 grids, built in float64 on first use per grid size.
        self._pos_cache: dict[tuple[int, int], Tensor] = {}
        self.t_embed = nn.Sequential(nn.Linear(cfg.frequency_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.class_embed = (
            nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes is not None else None
        )
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.context_dim) for _ in range(cfg.depth)
        )
        self.final = FinalLayer(d, p * p * cfg.resolved_out_channels)
        self.initialize_weights(generator)

    @property
    def null_class_label(self) -> int:
        """Index of the reserved null label for classifier-free guidance (``num_classes``)."""
        if self.config.num_classes is None:
            raise AttributeError("an unconditional DiT (num_classes=None) has no null label")
        return self.config.num_classes

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """The one place the DiT is initialised, as in the paper's code.

        Every linear layer and the patch embedding (as a linear map of a flattened patch)
        get Xavier-uniform weights and zero biases; the class embedding and the timestep
        MLP are N(0, 0.02²); then adaLN-Zero: every modulation layer, the cross-attention
        output projections and the final linear layer are zeroed, so every block starts as
        the identity and the network outputs exactly zero. Draws come from ``generator``
        (a fresh generator seeded 0 when ``None``; never the global RNG).
        """
        gen = torch.Generator().manual_seed(0) if generator is None else generator
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_out, fan_in = m.weight.shape[0], m.weight[0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot & Bengio 2010
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(-bound, bound, generator=gen))
                if m.bias is not None:
                    m.bias.zero_()
        normal = [m.weight for m in self.t_embed if isinstance(m, nn.Linear)]  # its 2 Linears
        normal += [self.class_embed.weight] if self.class_embed is not None else []
        for w in normal:
            w.copy_(torch.empty(w.shape).normal_(0.0, 0.02, generator=gen))
        for block in cast("Iterable[DiTBlock]", self.blocks):  # ModuleList items: nn.Module
            zero_init(block.adaLN_modulation)
            if block.cross_attn is not None:
                zero_init(block.cross_attn.to_out)
        zero_init(self.final.adaLN_modulation)
        zero_init(self.final.linear)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Switch gradient checkpointing of every block on or off (``config`` follows)."""
        self.config = dataclasses.replace(self.config, use_checkpoint=enabled)

    def _pos_embed(self, height: int, width: int, like: Tensor) -> Tensor:
        """The fixed embedding of a ``height x width`` grid: ``[1, H*W, D]``."""
        pos = self._pos_cache.get((height, width))
        if pos is None:
            pos = sincos_pos_embed_2d(self.config.hidden_size, height, width).float()[None]
            if not isinstance(pos, FakeTensor):  # a memory probe's fake grid is not kept
                self._pos_cache[(height, width)] = pos
        return pos.to(like.device, like.dtype)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict from ``x_t [B, C, H, W]`` at timesteps ``t [B]`` (float, training units).

        :param class_labels: long ``[B]``; required only by a class-conditional model, where
            ``None`` means every sample gets the null label (unconditional prediction).
        :param context: ``[B, L, context_dim]`` token embeddings for cross-attention.
        :param context_mask: boolean ``[B, L]``, True = keep the token.
        :return: ``[B, resolved_out_channels, H, W]`` in ``x``'s dtype.
        """
        t, class_labels, context_mask = check_model_inputs(
            "DiT", self.config, x, t, class_labels, context, context_mask
        )
        cfg, p = self.config, self.config.patch_size
        dtype = self.x_embed.weight.dtype  # the model's; autocast may lower it further
        h = self.x_embed(x.to(dtype))  # (B, D, H/p, W/p)
        gh, gw = h.shape[-2:]
        tokens = h.flatten(2).transpose(1, 2)  # (B, N, D), row-major patches
        tokens = tokens + self._pos_embed(gh, gw, tokens)
        c = self.t_embed(timestep_embedding(t, cfg.frequency_dim).to(dtype))  # (B, D)
        if self.class_embed is not None:
            c = c + self.class_embed(class_labels)
        c_act = F.silu(c)  # every adaLN modulation starts with SiLU
        if context is not None:
            context = context.to(dtype)
        for block in self.blocks:
            if cfg.use_checkpoint and torch.is_grad_enabled():
                tokens = checkpoint(
                    block, tokens, c_act, context, context_mask, use_reentrant=False
                )
            else:
                tokens = block(tokens, c_act, context, context_mask)
        out = self.final(tokens, c_act)  # (B, N, p*p*C_out)
        b, c_out = x.shape[0], cfg.resolved_out_channels
        out = out.view(b, gh, gw, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        return out.reshape(b, c_out, gh * p, gw * p).to(x.dtype)


