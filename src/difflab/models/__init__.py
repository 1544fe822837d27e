"""Networks: the U-Net (ADM / Stable Diffusion family) and the layers models share.

Knows nothing of noise schedules, parametrizations or samplers.
"""

from difflab.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
