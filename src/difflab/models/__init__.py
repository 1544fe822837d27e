"""Networks: the U-Net (ADM / Stable Diffusion family), the text encoders it is conditioned
with, the KL autoencoder of latent diffusion, and the layers models share.

Knows nothing of noise schedules, parametrizations or samplers.
"""

from difflab.models.text import TextConditionedUNet, TextConfig, TextTransformer, WordTokenizer
from difflab.models.unet import UNet, UNetConfig
from difflab.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "TextConditionedUNet",
    "TextConfig",
    "TextTransformer",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "WordTokenizer",
]
