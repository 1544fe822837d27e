"""Ancestral DDPM, DDIM (with η) and DDIM inversion.

Owns: ``sample_ddpm`` (Ho et al. 2020, Alg. 2, with the variance choices of
``diffusion.reverse_log_variance``), ``sample_ddim`` (Song et al. 2021, eq. 12) and
``ddim_invert`` (the deterministic DDIM map run from clean to noise), plus the two small
helpers every difflab sampler module uses to call the denoiser at a level
(``eval_level``) or at an intermediate log-SNR (``eval_log_snr``).

Knows nothing of the registry or guidance.  All samplers here walk ``NoiseLevels`` on the
model's (VP) scale: x = α·x0 + σ·ε, with ᾱ = α² taken at consecutive levels, so a respaced
run recomputes β = 1 - ᾱ_t/ᾱ_prev from the kept ᾱ (improved-diffusion's respacing).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..diffusion import posterior, reverse_log_variance
from ..parametrization import Denoiser, DenoiserOutput
from ..schedules import NoiseLevels, _sigmoid
from .common import Generators, SamplerCallback, SamplerSpec, randn_like

__all__ = ["SPECS", "ddim_invert", "eval_level", "eval_log_snr", "sample_ddim", "sample_ddpm"]


def eval_level(
    denoiser: Denoiser, x: Tensor, levels: NoiseLevels, i: int, cond: dict[str, Any] | None
) -> DenoiserOutput:
    """The denoiser at real level ``i``: model time ``levels.t[i]``, that level's (α, σ)."""
    lam = levels.log_snr[i]
    alpha, sigma = math.sqrt(_sigmoid(lam)), math.sqrt(_sigmoid(-lam))
    return denoiser.at(x, levels.t[i], alpha, sigma, **(cond or {}))


def eval_log_snr(
    denoiser: Denoiser, x: Tensor, log_snr: float, cond: dict[str, Any] | None
) -> DenoiserOutput:
    """The denoiser at an intermediate log-SNR λ (x on the model scale at that λ).

    Model time t = ``schedule.t_from_log_snr(λ)`` (clamped to [0, T-1]), α = √sigmoid(λ),
    σ = √sigmoid(-λ): the conversions use the true level even where t is clamped.
    """
    t = denoiser.schedule.t_from_log_snr(log_snr)
    alpha, sigma = math.sqrt(_sigmoid(log_snr)), math.sqrt(_sigmoid(-log_snr))
    return denoiser.at(x, t, alpha, sigma, **(cond or {}))


def _abar(levels: NoiseLevels) -> list[float]:
    """ᾱ = α² = sigmoid(λ) at the N+1 levels (0 at zero SNR, 1 at the clean end)."""
    return [_sigmoid(lam) for lam in levels.log_snr]


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Alg. 2, x ``[B, C, ...]`` -> clean sample.

    x_prev = μ̃(x_t, x̂0) + Σ^½·z with μ̃ the posterior mean (eqs. 6-7) between consecutive
    levels and log Σ from ``denoiser.variance`` (fixedsmall β̃, fixedlarge β, learned:
    the network's log Σ, learned_range: Nichol & Dhariwal 2021 eq. 15).  One noise draw
    per step except the last (which returns the posterior mean).  Works from ᾱ = 0 (zero
    terminal SNR): the first step is then α_1·x̂0 + σ_1·z.
    """
    n = len(levels)
    ab = _abar(levels)
    posts = [posterior(torch.tensor(ab[i]), torch.tensor(ab[i + 1])) for i in range(n)]
    c_x0 = [float(p.coef_x0) for p in posts]
    c_xt = [float(p.coef_xt) for p in posts]
    fixed = denoiser.variance in ("fixedsmall", "fixedlarge")
    std = [
        math.exp(0.5 * float(reverse_log_variance(denoiser.variance, ab[i], ab[i + 1])))
        if fixed and i < n - 1
        else 0.0
        for i in range(n)
    ]
    for i in range(n):
        out = eval_level(denoiser, x, levels, i, cond)
        if callback is not None:
            callback(i, levels.t[i], x, out.x0)
        mean = c_x0[i] * out.x0 + c_xt[i] * x.float()
        if i == n - 1:
            x = mean
            break
        noise = randn_like(mean, generator)
        if fixed:
            x = mean + std[i] * noise
        else:
            log_var = reverse_log_variance(denoiser.variance, ab[i], ab[i + 1], out.var_values)
            x = mean + torch.exp(0.5 * log_var) * noise
    return x


def _check_eta(eta: float) -> float:
    eta = float(eta)
    if not (0.0 <= eta <= 1.0):
        raise ValueError(
            f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's β̃ noise), got {eta}"
        )
    return eta


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12, x ``[B, C, ...]`` -> clean sample.

    x_prev = α_prev·x̂0 + √(1 - ᾱ_prev - s²)·ε̂ + s·z with s = η·√β̃ of the (respaced)
    step, β̃ = (1-ᾱ_prev)/(1-ᾱ_t)·(1 - ᾱ_t/ᾱ_prev) (eq. 16, the standard definition: η = 1
    is DDPM with fixedsmall variance, η = 0 the deterministic DDIM ODE step).  With η > 0
    one noise draw per step except the last (where s = 0).  The step is well defined at
    ᾱ_t = 0 (zero terminal SNR).

    :param eta: noise scale η in [0, 1].
    """
    eta = _check_eta(eta)
    n = len(levels)
    ab = _abar(levels)
    s = []
    for i in range(n):
        var = (1 - ab[i + 1]) / (1 - ab[i]) * (1 - ab[i] / ab[i + 1]) if ab[i] < 1 else 0.0
        s.append(eta * math.sqrt(max(var, 0.0)))
    c_eps = [math.sqrt(max(1 - ab[i + 1] - s[i] ** 2, 0.0)) for i in range(n)]
    a_next = [math.sqrt(v) for v in ab[1:]]
    for i in range(n):
        out = eval_level(denoiser, x, levels, i, cond)
        if callback is not None:
            callback(i, levels.t[i], x, out.x0)
        # DDIM eq. 12: x_prev = sqrt(a_prev)*x0 + sqrt(1 - a_prev - s**2)*eps + s*z
        x = a_next[i] * out.x0 + c_eps[i] * out.eps
        if s[i] > 0:
            x = x + s[i] * randn_like(x, generator)
    return x


def ddim_invert(
    denoiser: Denoiser,
    x0: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """DDIM inversion: the deterministic DDIM map run backwards, clean ``x0`` -> level 0.

    ``levels`` are the sampling levels (noisy -> clean); inversion walks them from the clean
    end to level 0 and returns the state at level 0 on the model scale, so
    ``sample_ddim(denoiser, ddim_invert(denoiser, x0, levels), levels) ≈ x0`` with an error
    that shrinks as the steps get finer (Song et al. 2021, §4.3; Mokady et al. 2023).

    Step from level i+1 (cleaner) to level i: the model is called on the current state
    with the *target* level's time and coefficients (the usual ε(x_{t-1}) ≈ ε(x_t)
    approximation; diffusers' DDIMInverseScheduler does the same), giving ε̂; then
    x̂0 = (x_{i+1} - σ_{i+1}·ε̂)/α_{i+1} and x_i = α_i·x̂0 + σ_i·ε̂ (eq. 12 with η = 0).
    ``callback(k, t_i, x_{i+1}, x̂0)`` runs after the k-th model call (k = 0 at the clean
    end).  Inverting to a zero-SNR level 0 (α_0 = 0) returns x = ε̂.
    """
    n = len(levels)
    a, s = levels.alpha, levels.sigma
    x = x0.float()
    for k, i in enumerate(range(n - 1, -1, -1)):
        out = denoiser.at(x, levels.t[i], a[i], s[i], **(cond or {}))
        eps = out.eps
        x0_hat = (x - s[i + 1] * eps) / a[i + 1]
        if callback is not None:
            callback(k, levels.t[i], x, x0_hat)
        x = a[i] * x0_hat + s[i] * eps
    return x


SPECS: list[SamplerSpec] = [
    SamplerSpec(
        name="ddpm",
        fn=sample_ddpm,
        order=1,
        stochastic=True,
        nfe=lambda n: n,
        aliases={"DDPM": None, "DDPMScheduler": None},
        paper="Ho, Jain & Abbeel 2020, Denoising Diffusion Probabilistic Models (Alg. 2)",
    ),
    SamplerSpec(
        name="ddim",
        fn=sample_ddim,
        order=1,
        stochastic=False,
        nfe=lambda n: n,
        aliases={"DDIM": None, "DDIMScheduler": None},
        paper="Song, Meng & Ermon 2021, Denoising Diffusion Implicit Models (eq. 12)",
    ),
]
