"""Interop: the checkpoint formats other tools use, mapped onto difflab's models.

Owns config translations and weight-key mappings (diffusers, the original CompVis ldm /
Stability sgm layout); the models themselves live in :mod:`difflab.models` and know nothing
of these formats. Nothing here reads files or downloads.
"""

from difflab.interop.unet import (
    diffusers_module_map,
    ldm_module_map,
    ldm_unet_state,
    unet_config_from_diffusers,
    unet_config_from_ldm,
    unet_config_to_diffusers,
    unet_state_from_diffusers,
    unet_state_from_ldm,
    unet_state_to_diffusers,
    unet_state_to_ldm,
)
from difflab.models.unet import sdxl_vector

__all__ = [
    "diffusers_module_map",
    "ldm_module_map",
    "ldm_unet_state",
    "sdxl_vector",
    "unet_config_from_diffusers",
    "unet_config_from_ldm",
    "unet_config_to_diffusers",
    "unet_state_from_diffusers",
    "unet_state_from_ldm",
    "unet_state_to_diffusers",
    "unet_state_to_ldm",
]
