"""The KL autoencoder of Latent Diffusion (Rombach et al. 2022, sec. 3.1 and appendix G).

Owns :class:`AutoencoderKL`: a convolutional encoder to the mean and log-variance of a
diagonal Gaussian posterior over a latent ``[B, L, H/f, W/f]`` (``f = 2^(levels-1)``), a
decoder back to pixels, the KL term against N(0, I), and the latent scale and shift that
map the posterior's samples to roughly unit variance for the diffusion model
(``z = (sample - shift) * scale``; USER_NEEDS 23: they belong to the autoencoder and are
saved with it).

Weights and config are stored in the layout of the Stable Diffusion VAE folders
(``config.json`` + ``diffusion_pytorch_model.safetensors``, the same parameter names), so a
difflab autoencoder folder opens in diffusers' ``AutoencoderKL`` and an SD VAE folder opens
here; the tests check both networks give the same outputs with the same weights.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AutoencoderKL", "DiagonalGaussian", "VAEConfig"]

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
_EPS = 1e-6  # GroupNorm epsilon of the LDM autoencoder


@dataclass
class VAEConfig:
    """Architecture and latent statistics of an :class:`AutoencoderKL`.

    :param block_out_channels: widths per level; ``len - 1`` halvings of the resolution.
    :param layers_per_block: residual blocks per encoder level (the decoder has one more).
    :param latent_channels: ``L``, channels of the latent.
    :param scaling_factor: ``scale`` in ``z = (sample - shift) * scale`` (SD v1: 0.18215).
    :param shift_factor: ``shift`` (``None`` = 0).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    mid_attention: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of a foreign config

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"block_out_channels must be positive, got {self.block_out_channels}")
        for c in self.block_out_channels:
            if c % self.norm_groups:
                raise ValueError(f"width {c} is not divisible by norm_groups={self.norm_groups}")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` of diffusers' ``AutoencoderKL`` with this architecture."""
        levels = len(self.block_out_channels)
        return {
            **self.extra,
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_groups,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "mid_block_add_attention": self.mid_attention,
        }

    @classmethod
    def from_diffusers(cls, data: dict[str, Any]) -> VAEConfig:
        """Read a diffusers ``AutoencoderKL`` ``config.json`` (other keys are kept aside)."""
        kinds = set(data.get("down_block_types", ["DownEncoderBlock2D"])) | set(
            data.get("up_block_types", ["UpDecoderBlock2D"])
        )
        if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise ValueError(f"unsupported autoencoder blocks {sorted(kinds)}")
        if data.get("act_fn", "silu") != "silu":
            raise ValueError(f"unsupported activation {data['act_fn']!r} (silu only)")
        if not data.get("use_quant_conv", True) or not data.get("use_post_quant_conv", True):
            raise ValueError("autoencoders without quant_conv/post_quant_conv are not supported")
        known = {"in_channels", "out_channels", "block_out_channels", "layers_per_block",
                 "latent_channels", "norm_num_groups", "scaling_factor", "shift_factor",
                 "mid_block_add_attention", "down_block_types", "up_block_types", "act_fn",
                 "use_quant_conv", "use_post_quant_conv", "_class_name"}  # fmt: skip
        return cls(
            in_channels=data.get("in_channels", 3),
            out_channels=data.get("out_channels", 3),
            block_out_channels=tuple(data.get("block_out_channels", (64,))),
            layers_per_block=data.get("layers_per_block", 1),
            latent_channels=data.get("latent_channels", 4),
            norm_groups=data.get("norm_num_groups", 32),
            scaling_factor=float(data.get("scaling_factor", 0.18215)),
            shift_factor=data.get("shift_factor"),
            mid_attention=data.get("mid_block_add_attention", True),
            extra={k: v for k, v in data.items() if k not in known},
        )


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) of the encoder (log-variance clamped to
    [-30, 20] as in LDM)."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * n`` with ``n`` from ``generator`` (None: the posterior mean)."""
        if generator is None:
            return self.mean
        noise = torch.randn(
            self.mean.shape, generator=generator, device=generator.device, dtype=self.mean.dtype
        ).to(self.mean.device)
        return self.mean + self.std * noise

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent:
        ``0.5 Σ (μ² + σ² - 1 - log σ²)`` (Kingma & Welling 2014, appendix B)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _Attention(nn.Module):
    """Single-head spatial self-attention with a residual (the autoencoder's middle)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_ResBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([_Attention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class _Resample(nn.Module):
    """Halve (pad right/bottom by one, 3x3 stride 2, as LDM) or double (nearest, 3x3)."""

    def __init__(self, channels: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(
            channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [_ResBlock(cin if i == 0 else cout, cout, groups) for i in range(n)]
        )
        key = "downsamplers" if resample == "down" else "upsamplers"
        setattr(self, key, nn.ModuleList([_Resample(cout, resample == "down")] if resample else []))
        self._resamplers = key

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        for r in getattr(self, self._resamplers):
            x = r(x)
        return x


class _Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths, g = cfg.block_out_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _Level(widths[max(i - 1, 0)], w, cfg.layers_per_block, g,
                   "down" if i < len(widths) - 1 else None)
            for i, w in enumerate(widths)
        )  # fmt: skip
        self.mid_block = _Mid(widths[-1], g, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(g, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = _Mid(widths[0], g, cfg.mid_attention)
        self.up_blocks = nn.ModuleList(
            _Level(widths[max(i - 1, 0)], w, cfg.layers_per_block + 1, g,
                   "up" if i < len(widths) - 1 else None)
            for i, w in enumerate(widths)
        )  # fmt: skip
        self.conv_norm_out = nn.GroupNorm(g, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (see the module docstring).

    ``encode(x) -> DiagonalGaussian``, ``decode(z_raw) -> x``; for diffusion use
    :meth:`latents` (scaled) and :meth:`images` (inverse). Images in [-1, 1].
    """

    def __init__(self, config: VAEConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        # With a generator, the layers' default initialisation (which draws from the global
        # RNG) is overwritten, so it runs on a forked RNG and leaves the caller's alone.
        with torch.random.fork_rng(devices=[], enabled=generator is not None):
            self.encoder = _Encoder(config)
            self.decoder = _Decoder(config)
            latent = config.latent_channels
            self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
            self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        if generator is not None:  # reproducible initialisation, PyTorch's default ranges
            with torch.no_grad():
                for p in self.parameters():
                    if p.dim() > 1:
                        bound = 1.0 / math.sqrt(p[0].numel())
                        p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
                for m in self.modules():  # biases: U(±1/√fan_in), as nn.Conv2d/nn.Linear do
                    if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                        bound = 1.0 / math.sqrt(m.weight[0].numel())
                        m.bias.copy_(
                            torch.empty(m.bias.shape).uniform_(-bound, bound, generator=generator)
                        )

    def encode(self, x: Tensor) -> DiagonalGaussian:
        size = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
            )
        if x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"image sides must be multiples of {size}, got {tuple(x.shape[-2:])}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction of ``x`` (from a posterior sample, or the mean without generator
        and noise) and the posterior.

        :param noise: ``[B, L, H/f, W/f]`` standard normal draws for the sample
            ``mean + std * noise`` instead of drawing them from ``generator``: the form
            ``torch.compile`` traces without a graph break (a generator argument cuts it).
        """
        posterior = self.encode(x)
        if noise is not None:
            if generator is not None:
                raise ValueError("pass generator or noise to AutoencoderKL.forward, not both")
            return self.decode(posterior.mean + posterior.std * noise.to(posterior.mean)), posterior
        return self.decode(posterior.sample(generator)), posterior

    def scale(self, z: Tensor) -> Tensor:
        """``(z - shift) * scale``: raw latents to the diffusion model's data."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled posterior samples of images ``x`` (posterior means without generator)."""
        return self.scale(self.encode(x).sample(generator))

    def images(self, latents: Tensor) -> Tensor:
        """Decode latents made by :meth:`latents` (the inverse scaling first)."""
        z = latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)
        return self.decode(z)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (atomically)."""
        from safetensors.torch import save

        from ..train.checkpoint import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
        text = json.dumps(self.config.to_diffusers(), indent=1)
        atomic_write_bytes(folder / CONFIG_FILE, text.encode("utf-8"))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> AutoencoderKL:
        """Load a folder written by :meth:`save_pretrained` or a diffusers/SD VAE folder."""
        from ..pipeline import load_weights

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{str(folder)!r} holds no autoencoder ({CONFIG_FILE})")
        config = VAEConfig.from_diffusers(json.loads((folder / CONFIG_FILE).read_text("utf-8")))
        with torch.random.fork_rng(devices=[]):  # the init is overwritten: keep the caller's RNG
            model = cls(config)
        load_weights(model, folder / WEIGHTS_FILE)
        return model.eval()

    def check_latent_scale(self, latents: Tensor, tolerance: float = 0.5) -> float:
        """The std of scaled latents; warns when it is far from 1 (a wrong ``scaling_factor``
        makes the diffusion model's noise levels wrong)."""
        std = float(latents.float().std())
        if abs(math.log(max(std, 1e-12))) > math.log1p(tolerance):
            warnings.warn(
                f"scaled latents have std {std:.3g}, far from 1: the autoencoder's "
                f"scaling_factor {self.config.scaling_factor:g} does not fit this data "
                f"(1/std of the unscaled latents would be {self.config.scaling_factor / std:.4g})",
                stacklevel=2,
            )
        return std

    def extra_repr(self) -> str:
        return json.dumps(asdict(self.config), default=str)
