"""The PatchGAN discriminator of pix2pix (Isola et al. 2017), as the VQGAN / Latent Diffusion
autoencoders use it (Esser et al. 2021; Rombach et al. 2022, appendix G).

Owns :class:`PatchDiscriminator` (the ``NLayerDiscriminator`` of those papers): a stride-2
4x4 convolution with LeakyReLU(0.2), ``layers - 1`` more stride-2 convolutions with a norm
(the width doubling up to 8x), one stride-1 convolution with a norm, and a stride-1
convolution to a 1-channel map of logits, each judging one patch of the input.  Weights are
drawn from a generator as DCGAN's initialisation (conv N(0, 0.02), norm scale N(1, 0.02),
biases 0).  Knows nothing of losses or training.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .._validate import check_choice

__all__ = ["DISC_NORMS", "DiscNorm", "PatchDiscriminator", "patch_logit_side"]

DiscNorm = Literal["batch", "none"]
DISC_NORMS: tuple[str, ...] = (
    "batch",  # BatchNorm2d, as pix2pix and taming-transformers
    "none",  # no norm (the convolutions keep their biases)
)


def patch_logit_side(side: int, layers: int) -> int:
    """Side of the logit map for ``side``-pixel images: ``layers`` halvings (k4 s2 p1), then
    two k4 s1 p1 convolutions that each take one pixel off."""
    for _ in range(layers):
        side //= 2
    return side - 2


class PatchDiscriminator(nn.Module):
    """PatchGAN: images ``[B, C, H, W]`` -> patch logits ``[B, 1, h, w]`` (see module doc).

    :param in_channels: image channels.
    :param channels: width of the first layer (pix2pix's ``ndf``; LDM: 64).
    :param layers: stride-2 convolutions (LDM: 3); images need ``H / 2^layers >= 3``.
    :param norm: ``batch`` (BatchNorm2d) or ``none``.
    :param generator: draws the initial weights (None: the global RNG of ``nn.Conv2d``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        layers: int = 3,
        norm: DiscNorm = "batch",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_choice("discriminator norm", norm, DISC_NORMS)
        if min(in_channels, channels, layers) < 1:
            raise ValueError(
                f"discriminator in_channels, channels and layers must be >= 1, got "
                f"{in_channels}, {channels}, {layers}"
            )
        self.layers = layers
        use_bias = norm == "none"  # a norm's shift replaces the bias

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=use_bias)
            return [conv, *([nn.BatchNorm2d(cout)] if norm == "batch" else []),
                    nn.LeakyReLU(0.2)]  # fmt: skip

        with torch.random.fork_rng(devices=[], enabled=generator is not None):
            seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
                                    nn.LeakyReLU(0.2)]  # fmt: skip
            mult = 1
            for n in range(1, layers):
                prev, mult = mult, min(2**n, 8)
                seq += block(channels * prev, channels * mult, 2)
            prev, mult = mult, min(2**layers, 8)
            seq += block(channels * prev, channels * mult, 1)
            seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))  # logits
            self.main = nn.Sequential(*seq)
        if generator is not None:
            self.initialize_weights(generator)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator) -> None:
        """DCGAN's initialisation (Radford et al. 2016), drawn from ``generator``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.empty(m.weight.shape).normal_(0.0, 0.02, generator=generator))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.empty(m.weight.shape).normal_(1.0, 0.02, generator=generator))
                m.bias.zero_()

    def check_image_side(self, side: int) -> None:
        """ValueError unless ``side``-pixel images give a logit map of at least 1x1."""
        if patch_logit_side(side, self.layers) < 1:
            fits = max((n for n in range(1, 9) if patch_logit_side(side, n) >= 1), default=0)
            hint = f"{fits} layer(s) fit {side} px" if fits else f"no depth fits {side} px"
            raise ValueError(
                f"a {self.layers}-layer PatchGAN needs images of at least {3 * 2**self.layers} "
                f"px, got {side} px ({hint})"
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # (B, 1, h, w)
