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

Memory savers for large images, as diffusers' ``enable_slicing``/``enable_tiling``: sliced
encode/decode runs the networks one image at a time; tiled encode/decode runs them on
overlapping square tiles and blends the tiles' outputs linearly across each overlap (the
weights sum to one), so a decoder call never sees more than one tile.  ``force_upcast``
(diffusers' config key) runs a float16 autoencoder in float32: the SD VAE's activations
overflow float16's range.  The CompVis (LDM) checkpoint layout is converted in
:mod:`difflab.interop.vae`.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
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
    :param force_upcast: encode and decode in float32 when the weights are float16 (the SD
        VAE overflows float16; diffusers' key of the same name, default True there too).
        bfloat16 has float32's range and is run as it is.
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
    force_upcast: bool = True
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
            "force_upcast": self.force_upcast,
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
                 "use_quant_conv", "use_post_quant_conv", "_class_name",
                 "force_upcast"}  # fmt: skip
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
            force_upcast=bool(data.get("force_upcast", True)),
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


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of ``tile``-long windows covering ``[0, n)``, neighbours sharing at least
    ``overlap``; the last window ends flush with ``n`` (one window when ``n <= tile``)."""
    if n <= tile:
        return [0]
    return [*range(0, n - tile, tile - overlap), n - tile]


def _ramp(length: int, before: int, after: int) -> Tensor:
    """Blend weights along one side of a tile: 1 inside, rising linearly over the first
    ``before`` entries and falling over the last ``after`` (each neighbour's ramp is the
    complement, so two overlapping tiles' weights sum to one)."""
    i = torch.arange(length, dtype=torch.float32) + 0.5
    w = torch.ones(length)
    if before:
        w = torch.minimum(w, i / before)
    if after:
        w = torch.minimum(w, (length - i) / after)
    return w


def _axis_weights(starts: list[int], k: int, size: int, scale: Fraction) -> Tensor:
    """:func:`_ramp` of tile ``k`` on one axis, in output units (``out = in * scale``)."""
    before = starts[k - 1] + size - starts[k] if k > 0 else 0
    after = starts[k] + size - starts[k + 1] if k + 1 < len(starts) else 0
    return _ramp(int(size * scale), int(before * scale), int(after * scale))


def blend_tiles(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: Fraction
) -> Tensor:
    """``fn`` on overlapping ``tile x tile`` windows of ``x [B, C, H, W]``, the outputs
    ``[B, C', h*scale, w*scale]`` blended linearly across the overlaps as diffusers' tiled
    VAE does (here the weights are normalised to sum to one at every output pixel, so a
    pixel-local ``fn`` gives exactly ``fn(x)``); one call when ``x`` fits in a tile."""
    h, w = x.shape[-2:]
    rows, cols = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    if len(rows) == len(cols) == 1:
        return fn(x)
    th, tw = min(tile, h), min(tile, w)
    out = total = torch.empty(0)
    for a, r in enumerate(rows):
        wy = _axis_weights(rows, a, th, scale).to(x.device)
        for b, c in enumerate(cols):
            y = fn(x[..., r : r + th, c : c + tw])  # (B, C', th*scale, tw*scale)
            weight = wy[:, None] * _axis_weights(cols, b, tw, scale).to(x.device)
            if a == b == 0:  # float32 sums; the result in fn's dtype
                out = y.new_zeros(
                    (*y.shape[:2], int(h * scale), int(w * scale)), dtype=torch.float32
                )
                total = out.new_zeros(out.shape[-2:])
            ys = slice(int(r * scale), int((r + th) * scale))
            xs = slice(int(c * scale), int((c + tw) * scale))
            out[..., ys, xs] += y.float() * weight
            total[ys, xs] += weight
    return (out / total).to(y.dtype)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (see the module docstring).

    ``encode(x) -> DiagonalGaussian``, ``decode(z_raw) -> x``; for diffusion use
    :meth:`latents` (scaled) and :meth:`images` (inverse). Images in [-1, 1].

    Memory savers (off by default; :meth:`latents`, :meth:`images` and ``forward`` go
    through them): ``vae.enable_slicing()`` runs one image at a time (the same result as
    the batch); ``vae.enable_tiling(tile_size=512, overlap=128)`` runs encoder and decoder
    on overlapping tiles of ``tile_size`` image pixels (``tile_size / f`` latent cells)
    blended linearly across ``overlap`` pixels.  Tiling changes the output slightly: the
    GroupNorm statistics and the middle attention see one tile, not the image.  Both can
    be chosen per call: ``decode(z, slicing=True, tiling=False)``.
    """

    slicing: bool = False  # one image at a time
    tiling: bool = False  # overlapping tiles
    tile_size: int = 512  # tile side in image pixels (diffusers: the config's sample_size)
    tile_overlap: int = 128  # pixels shared by neighbouring tiles (diffusers: 25%)

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

    def enable_slicing(self, enabled: bool = True) -> AutoencoderKL:
        """Encode and decode one image at a time (peak memory of a batch of one)."""
        self.slicing = bool(enabled)
        return self

    def enable_tiling(
        self, enabled: bool = True, *, tile_size: int | None = None, overlap: int | None = None
    ) -> AutoencoderKL:
        """Encode and decode large images in overlapping tiles (see the class docstring).

        :param tile_size: tile side in image pixels, a multiple of the downsampling factor
            ``f`` (decoder tiles are ``tile_size / f`` latent cells); default 512.
        :param overlap: image pixels shared by neighbouring tiles, a multiple of ``f`` below
            ``tile_size``; default 128.
        """
        size = self.tile_size if tile_size is None else int(tile_size)
        lap = self.tile_overlap if overlap is None else int(overlap)
        f = self.config.downsample_factor
        if size < f or size % f or lap % f or not 0 <= lap < size:
            raise ValueError(
                f"tile_size={size} and overlap={lap} must be multiples of the downsampling "
                f"factor {f} with 0 <= overlap < tile_size"
            )
        self.tiling, self.tile_size, self.tile_overlap = bool(enabled), size, lap
        return self

    def _saving_memory(
        self, fn: Callable[[Tensor], Tensor], x: Tensor, slicing: bool | None,
        tiling: bool | None, *, up: bool,
    ) -> Tensor:  # fmt: skip
        """``fn(x)`` through the memory savers chosen (None: the ``enable_*`` settings)."""
        run = fn
        if self.tiling if tiling is None else tiling:
            f = self.config.downsample_factor
            tile, lap = self.tile_size, self.tile_overlap
            if up:  # the decoder's tiles are in latent cells
                tile, lap, scale = tile // f, lap // f, Fraction(f)
            else:
                scale = Fraction(1, f)

            def run(t: Tensor) -> Tensor:
                return blend_tiles(fn, t, tile, lap, scale)

        if (self.slicing if slicing is None else slicing) and x.shape[0] > 1:
            return torch.cat([run(x[i : i + 1]) for i in range(x.shape[0])])
        return run(x)

    def _upcast(self, *modules: nn.Module) -> tuple[nn.Module, ...]:
        """``modules`` as they are, or float32 copies when ``force_upcast`` and float16."""
        if self.config.force_upcast and self.post_quant_conv.weight.dtype == torch.float16:
            return tuple(copy.deepcopy(m).float() for m in modules)
        return modules

    def encode(
        self, x: Tensor, *, slicing: bool | None = None, tiling: bool | None = None
    ) -> DiagonalGaussian:
        """The posterior of images ``x [B, C, H, W]`` (sides multiples of ``f``);
        ``slicing``/``tiling`` override :meth:`enable_slicing`/:meth:`enable_tiling`."""
        size = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
            )
        if x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"image sides must be multiples of {size}, got {tuple(x.shape[-2:])}")
        encoder, quant = self._upcast(self.encoder, self.quant_conv)
        if encoder is not self.encoder:
            x = x.float()
        moments = self._saving_memory(lambda t: quant(encoder(t)), x, slicing, tiling, up=False)
        return DiagonalGaussian(moments)

    def decode(
        self, z: Tensor, *, slicing: bool | None = None, tiling: bool | None = None
    ) -> Tensor:
        """Images ``[B, C, H*f, W*f]`` of raw latents ``z`` (float32 with ``force_upcast``
        and float16 weights); ``slicing``/``tiling`` override the ``enable_*`` settings."""
        post_quant, decoder = self._upcast(self.post_quant_conv, self.decoder)
        if decoder is not self.decoder:
            z = z.float()
        return self._saving_memory(lambda t: decoder(post_quant(t)), z, slicing, tiling, up=True)

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
