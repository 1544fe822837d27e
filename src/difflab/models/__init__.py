"""Networks: the U-Net (ADM / Stable Diffusion family), the text encoder it can be trained
with, and the layers models share.

Knows nothing of noise schedules, parametrizations or samplers.
"""

from difflab.models.text import TextConditionedUNet, TextConfig, TextTransformer, WordTokenizer
from difflab.models.unet import UNet, UNetConfig

__all__ = [
    "TextConditionedUNet",
    "TextConfig",
    "TextTransformer",
    "UNet",
    "UNetConfig",
    "WordTokenizer",
]
