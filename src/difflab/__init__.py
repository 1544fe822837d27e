"""difflab: denoising diffusion models — exact maths, every well-known sampler, training,
fine-tuning and evaluation.  docs/design.md is the map of modules.

The core (schedules, parametrizations, forward process, losses, samplers) is imported
eagerly; the heavier layers (``Pipeline``, ``train``, ``metrics``, ``models``) load on first
use, so ``import difflab`` stays fast.  The trainer is ``difflab.train.train(config)``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .diffusion import (
    BitsPerDim,
    bits_per_dim,
    bits_per_dim_estimate,
    posterior,
    q_sample,
    q_step_sample,
    vlb_terms,
)
from .losses import LossOutput, LossSecondMomentSampler, UniformSampler, training_loss
from .parametrization import Denoiser
from .samplers import SAMPLERS, img2img, sample
from .samplers.ddpm import ddim_invert
from .schedules import NoiseLevels, NoiseSchedule

_LAZY = {
    "Pipeline": ("difflab.pipeline", "Pipeline"),
    "TrainConfig": ("difflab.train", "TrainConfig"),
    "load_config": ("difflab.train", "load_config"),
    "UNet": ("difflab.models", "UNet"),
    "UNetConfig": ("difflab.models", "UNetConfig"),
    "metrics": ("difflab.metrics", None),
    "models": ("difflab.models", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'difflab' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = [
    "SAMPLERS",
    "BitsPerDim",
    "Denoiser",
    "LossOutput",
    "LossSecondMomentSampler",
    "NoiseLevels",
    "NoiseSchedule",
    "Pipeline",
    "TrainConfig",
    "UNet",
    "UNetConfig",
    "UniformSampler",
    "__version__",
    "bits_per_dim",
    "bits_per_dim_estimate",
    "ddim_invert",
    "img2img",
    "load_config",
    "metrics",
    "models",
    "posterior",
    "q_sample",
    "q_step_sample",
    "sample",
    "training_loss",
    "vlb_terms",
]
