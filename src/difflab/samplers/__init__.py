"""Samplers: one plain function per algorithm, a registry of names and aliases, guidance.

``dl.sample`` / ``dl.img2img`` (api) resolve a sampler name through ``SAMPLERS`` (registry)
and call its function over one explicit ``NoiseLevels`` sequence; guidance (CFG, rescale,
interval, APG, thresholding, inpainting) wraps the denoiser (guidance).  The algorithms live in
``ddpm``, ``pndm``, ``karras``, ``dpm_solver``, ``unipc``; shared helpers in ``common``.
"""

from .api import (
    DEFAULT_OPTIONS,
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_SPACING_OPTIONS,
    Img2ImgResult,
    img2img,
    sample,
)
from .common import SamplerSpec
from .guidance import (
    APG_DEFAULTS,
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClipX0,
    DenoiserWrapper,
    DynamicThresholding,
    InpaintX0,
    dynamic_threshold,
    rescale_cfg,
)
from .registry import OWN_GRID, SAMPLERS, SamplerRegistry, check_options, resolve

__all__ = [
    "APG_DEFAULTS",
    "DEFAULT_OPTIONS",
    "DEFAULT_SAMPLER",
    "DEFAULT_SPACING",
    "DEFAULT_SPACING_OPTIONS",
    "OWN_GRID",
    "SAMPLERS",
    "AdaptiveProjectedGuidance",
    "ClassifierFreeGuidance",
    "ClipX0",
    "DenoiserWrapper",
    "DynamicThresholding",
    "Img2ImgResult",
    "InpaintX0",
    "SamplerRegistry",
    "SamplerSpec",
    "check_options",
    "dynamic_threshold",
    "img2img",
    "resolve",
    "rescale_cfg",
    "sample",
]
