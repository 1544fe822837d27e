"""Networks: the U-Net (ADM / Stable Diffusion family), the DiT (Peebles & Xie 2023), the
text encoders they are conditioned with, the KL autoencoder of latent diffusion, and the
layers models share.

Owns the choice between denoising networks (``model.arch`` of a run config:
:func:`model_config_from_dict` and :func:`build_model`). Knows nothing of noise schedules,
parametrizations or samplers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from difflab.models.dit import DiT, DiTConfig
from difflab.models.text import TextConditionedUNet, TextConfig, TextTransformer, WordTokenizer
from difflab.models.unet import UNet, UNetConfig
from difflab.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = [
    "ARCHS",
    "AutoencoderKL",
    "DiT",
    "DiTConfig",
    "DiagonalGaussian",
    "TextConditionedUNet",
    "TextConfig",
    "TextTransformer",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "WordTokenizer",
    "build_model",
    "model_config_from_dict",
]

# model.arch -> (config class, network class); "unet" when a model section names none.
ARCHS: dict[str, tuple[type[UNetConfig] | type[DiTConfig], type[nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    "dit": (DiTConfig, DiT),
}


def model_config_from_dict(spec: Mapping[str, Any]) -> UNetConfig | DiTConfig:
    """A run config's ``model`` section as a network config: ``arch`` (``unet`` when absent)
    picks the class, ``preset`` names one of its size presets, the other keys override it.

    :raises ValueError: an unknown ``arch``, preset or key.
    """
    from .._validate import check_choice

    spec = dict(spec)
    arch = spec.pop("arch", None) or "unet"
    check_choice("model.arch", arch, ARCHS)
    config_cls = ARCHS[arch][0]
    preset = spec.pop("preset", None)
    return config_cls.preset(preset, **spec) if preset else config_cls.from_dict(spec)


def build_model(
    config: UNetConfig | DiTConfig, *, generator: torch.Generator | None = None
) -> UNet | DiT:
    """The denoising network ``config`` describes (a ``UNet`` or a ``DiT``)."""
    for config_cls, net_cls in ARCHS.values():
        if isinstance(config, config_cls):
            return cast("UNet | DiT", net_cls(config, generator=generator))
    raise ValueError(f"build_model needs a UNetConfig or DiTConfig, got {type(config).__name__}")
