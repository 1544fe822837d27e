"""The adversarial term of Latent Diffusion's autoencoder loss (Rombach et al. 2022, appendix
G), as taming-transformers' VQGAN loss writes it (Esser et al. 2021, eq. 4-7).

Owns :class:`GANConfig` (what ``train_autoencoder`` is told about the discriminator), the
hinge losses (Lim & Ye 2017; Miyato et al. 2018) and the adaptive weight

    λ = ||∇_{G_L} L_rec|| / (||∇_{G_L} L_GAN|| + 1e-4),  clamped to [0, 1e4],  times disc_weight,

with ``G_L`` the decoder's last layer, which balances the two terms' gradients there.
Knows nothing of data, checkpoints or the training loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_choice
from ..models.discriminator import DISC_NORMS, DiscNorm

__all__ = ["GANConfig", "adaptive_weight", "hinge_d_loss", "hinge_g_loss"]


@dataclass
class GANConfig:
    """The discriminator of an autoencoder run (LDM's ``LPIPSWithDiscriminator`` settings).

    :param start: warm-up steps without the adversarial term (LDM's ``disc_start``): steps
        ``1..start`` train exactly as without a discriminator, which is neither run nor
        stepped; from step ``start + 1`` on both are.
    :param weight: ``disc_weight``, the factor on the adaptive weight (LDM: 0.5).
    :param lr: the discriminator's Adam learning rate (None: the autoencoder's), betas
        (0.5, 0.9) as LDM; constant (no schedule).
    :param channels: width of the PatchGAN's first layer (LDM: 64).
    :param layers: its stride-2 convolutions (LDM: 3; 8-px images fit 1).
    :param norm: ``batch`` or ``none``.
    """

    start: int = 0
    weight: float = 0.5
    lr: float | None = None
    channels: int = 64
    layers: int = 3
    norm: DiscNorm = "batch"

    def __post_init__(self) -> None:
        check_choice("discriminator norm", self.norm, DISC_NORMS)
        if self.start < 0 or self.weight < 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError(
                f"need disc start >= 0, disc weight >= 0 and disc lr > 0; got {self.start}, "
                f"{self.weight}, {self.lr}"
            )
        if self.channels < 1 or self.layers < 1:
            raise ValueError(
                f"disc channels and layers must be >= 1, got {self.channels}, {self.layers}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss ``mean(relu(1 - D(x))) + mean(relu(1 + D(x̂)))`` (float32).

    taming-transformers halves this sum; Adam's updates do not depend on the loss scale.
    """
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator (autoencoder) hinge loss ``-mean(D(x̂))`` (float32)."""
    return -logits_fake.float().mean()


def adaptive_weight(
    rec_loss: Tensor,
    g_loss: Tensor,
    last_layer: Tensor,
    *,
    disc_weight: float = 1.0,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> Tensor:
    """LDM's / VQGAN's λ (eq. 7 of Esser et al. 2021), a detached scalar.

    ``disc_weight · clamp(||∂rec_loss/∂last_layer|| / (||∂g_loss/∂last_layer|| + eps), 0,
    max_weight)``; both graphs are kept for the backward pass that follows.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (g_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach() * disc_weight
