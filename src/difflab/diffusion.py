"""The forward process, its posterior, and the reverse-step variance choices.

Owns: ``q_sample`` (q(x_t|x_0) by reparameterisation, Ho et al. 2020 eq. 4), the one-step
``q(x_t|x_{t-1})`` (eq. 2), the posterior q(x_{t-1}|x_t, x_0) (eqs. 6-7), the reverse-step
variances fixedsmall (β̃_t), fixedlarge (β_t), learned and learned_range (Nichol & Dhariwal
2021, eq. 15), and the variational-bound terms built on them.

Knows nothing of training loops or samplers; samplers call the posterior helpers here.

The posterior helpers take ᾱ at the two levels of a step, ``abar_t`` and ``abar_prev``
(ᾱ_{t-1}, or ᾱ of whatever level comes next on a respaced grid), so a respaced DDPM uses
β_t = 1 - ᾱ_t/ᾱ_prev recomputed from the kept ᾱ (improved-diffusion's respacing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._validate import check_choice
from .parametrization import VARIANCES, append_dims
from .schedules import NoiseSchedule


def _at(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """Gather a float64 schedule table at integer timesteps ``t [B]`` as float32 ``[B,1,..]``."""
    return append_dims(table.to(t.device)[t.long()].float(), ndim)


def q_sample(
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    noise: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε, ε ~ N(0, I) (Ho et al. 2020, eq. 4).

    ``t`` may be fractional (interpolated in log-SNR).  Returns ``(x_t, noise)``.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.as_tensor(t, device=x0.device)
    if t.ndim == 0:
        t = t.expand(x0.shape[0])
    alpha = append_dims(schedule.alpha(t.float()), x0.ndim)
    sigma = append_dims(schedule.sigma(t.float()), x0.ndim)
    return alpha * x0 + sigma * noise, noise


def q_step_sample(
    schedule: NoiseSchedule,
    x_prev: Tensor,
    t: Tensor,
    noise: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One forward step x_t ~ q(x_t|x_{t-1}) = N(√(1-β_t)·x_{t-1}, β_t·I) (Ho et al. eq. 2)."""
    if noise is None:
        noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device)
    t = torch.as_tensor(t, device=x_prev.device).long()
    if t.ndim == 0:
        t = t.expand(x_prev.shape[0])
    beta = _at(schedule.betas, t, x_prev.ndim)
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise


@dataclass
class Posterior:
    """q(x_prev | x_t, x0) = N(coef_x0·x0 + coef_xt·x_t, variance); tensors broadcastable."""

    coef_x0: Tensor
    coef_xt: Tensor
    variance: Tensor
    log_variance_clipped: Tensor

    def mean(self, x0: Tensor, x_t: Tensor) -> Tensor:
        """μ̃(x_t, x0) (Ho et al. eq. 7)."""
        return self.coef_x0 * x0 + self.coef_xt * x_t


def posterior(abar_t: Tensor, abar_prev: Tensor, abar_next_var: Tensor | None = None) -> Posterior:
    """Posterior coefficients between two levels (Ho et al. 2020, eqs. 6-7).

    With β = 1 - ᾱ_t/ᾱ_prev: coef_x0 = √ᾱ_prev·β/(1-ᾱ_t), coef_xt = √(1-β)·(1-ᾱ_prev)/(1-ᾱ_t),
    β̃ = (1-ᾱ_prev)/(1-ᾱ_t)·β.  β̃ is 0 at the last step (ᾱ_prev = 1); its log is clipped
    there to the next step's β̃ as improved-diffusion does (``abar_next_var``: the β̃ to use
    when this one is 0; default: β̃ itself floored at 1e-20).
    """
    abar_t = torch.as_tensor(abar_t, dtype=torch.float64)
    abar_prev = torch.as_tensor(abar_prev, dtype=torch.float64)
    beta = 1 - abar_t / abar_prev
    one_minus = 1 - abar_t
    coef_x0 = abar_prev.sqrt() * beta / one_minus
    coef_xt = (1 - beta).sqrt() * (1 - abar_prev) / one_minus
    var = (1 - abar_prev) / one_minus * beta
    fallback = var.clamp(min=1e-20) if abar_next_var is None else torch.as_tensor(abar_next_var)
    log_var = torch.where(var > 0, var.clamp(min=1e-300).log(), fallback.log())
    return Posterior(coef_x0, coef_xt, var, log_var)


def schedule_posterior(schedule: NoiseSchedule) -> Posterior:
    """Posterior tables for every training timestep, float64 ``[T]``; t = 0 clipped to β̃_1."""
    ab = schedule.alphas_cumprod
    post = posterior(ab, schedule.alphas_cumprod_prev)
    var = post.variance
    post.log_variance_clipped = torch.cat([var[1:2], var[1:]]).log()
    return post


def reverse_log_variance(
    variance: str,
    abar_t: Tensor,
    abar_prev: Tensor,
    var_values: Tensor | None = None,
    *,
    clipped_log_small: Tensor | None = None,
) -> Tensor:
    """log Σ_θ of the reverse step p(x_prev|x_t) for each variance choice.

    - fixedsmall: β̃ (clipped log at the last step), Ho et al. 2020 §3.2.
    - fixedlarge: β (improved-diffusion uses β̃_1 in place of β at the first step so that
      the decoder term is well defined; difflab does the same), Ho et al. 2020 §3.2.
    - learned: the network outputs log Σ directly.
    - learned_range: v ∈ [-1, 1] → log Σ = f·log β + (1-f)·log β̃, f = (v+1)/2
      (Nichol & Dhariwal 2021, eq. 15).
    """
    check_choice("variance", variance, VARIANCES)
    abar_t = torch.as_tensor(abar_t, dtype=torch.float64)
    abar_prev = torch.as_tensor(abar_prev, dtype=torch.float64)
    post = posterior(abar_t, abar_prev)
    log_small = post.log_variance_clipped if clipped_log_small is None else clipped_log_small
    beta = 1 - abar_t / abar_prev
    log_large = torch.where(abar_prev >= 1, log_small, beta.clamp(min=1e-300).log())
    if variance == "fixedsmall":
        return log_small.float()
    if variance == "fixedlarge":
        return log_large.float()
    if var_values is None:
        raise ValueError(f"variance={variance!r} needs the model's variance output")
    if variance == "learned":
        return var_values.float()
    frac = (var_values.float() + 1) / 2
    nd = var_values.ndim
    lo = append_dims(log_small.float().to(var_values.device), nd)
    hi = append_dims(log_large.float().to(var_values.device), nd)
    return frac * hi + (1 - frac) * lo


LOG2 = math.log(2.0)
