"""The forward process, its posterior, and the reverse-step variance choices.

Owns: ``q_sample`` (q(x_t|x_0) by reparameterisation, Ho et al. 2020 eq. 4), the one-step
``q(x_t|x_{t-1})`` (eq. 2), the posterior q(x_{t-1}|x_t, x_0) (eqs. 6-7), the reverse-step
variances fixedsmall (β̃_t), fixedlarge (β_t), learned and learned_range (Nichol & Dhariwal
2021, eq. 15), and the variational bound built on them (Ho et al. 2020, eq. 5): the Gaussian
KL, the discretised-Gaussian decoder for 8-bit data, the prior term, per-timestep terms
``vlb_terms`` / ``vlb_from_output`` and the full bound ``bits_per_dim`` (plus the sampled
``bits_per_dim_estimate``).

Knows nothing of training loops or samplers; samplers call the posterior helpers here.

The posterior helpers take ᾱ at the two levels of a step, ``abar_t`` and ``abar_prev``
(ᾱ_{t-1}, or ᾱ of whatever level comes next on a respaced grid), so a respaced DDPM uses
β_t = 1 - ᾱ_t/ᾱ_prev recomputed from the kept ᾱ (improved-diffusion's respacing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._validate import check_choice
from .parametrization import (
    PREDICTIONS,
    VARIANCES,
    Denoiser,
    DenoiserNet,
    append_dims,
    split_variance,
    to_x0_eps,
)
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
    abar_t: Tensor | float,
    abar_prev: Tensor | float,
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
    log_small, log_large, log_beta = _log_variances(abar_t, abar_prev, clipped_log_small)
    return _select_log_variance(variance, log_small, log_large, log_beta, var_values)


def _log_variances(
    abar_t: Tensor | float, abar_prev: Tensor | float, clipped_log_small: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(log β̃ clipped, log of fixedlarge's variance, log β) in float64, on the host."""
    abar_t = torch.as_tensor(abar_t, dtype=torch.float64)
    abar_prev = torch.as_tensor(abar_prev, dtype=torch.float64)
    post = posterior(abar_t, abar_prev)
    log_small = post.log_variance_clipped if clipped_log_small is None else clipped_log_small
    beta = 1 - abar_t / abar_prev
    log_beta = beta.clamp(min=1e-300).log()
    log_large = torch.where(abar_prev >= 1, log_small, log_beta)
    return log_small, log_large, log_beta


def _select_log_variance(
    variance: str,
    log_small: Tensor,
    log_large: Tensor,
    log_beta: Tensor,
    var_values: Tensor | None,
) -> Tensor:
    """log Σ_θ (float32) from the three fixed log-variances and the network's output."""
    if variance == "fixedsmall":
        return log_small.float()
    if variance == "fixedlarge":
        return log_large.float()
    if var_values is None:
        raise ValueError(f"variance={variance!r} needs the model's variance output")
    if variance == "learned":
        return var_values.float()
    # improved-diffusion interpolates between the clipped log β̃ and log β itself (β_0 at the
    # first step, not the β̃_1 that fixedlarge substitutes there).
    frac = (var_values.float() + 1) / 2
    nd = var_values.ndim
    lo = append_dims(log_small.float().to(var_values.device), nd)
    hi = append_dims(log_beta.float().to(var_values.device), nd)
    return frac * hi + (1 - frac) * lo


# ---------------------------------------------------------------------------- variational bound
LOG2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: ``[B, ...] -> [B]``."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    ½(-1 + logvar2 - logvar1 + e^(logvar1-logvar2) + (mean1-mean2)²·e^(-logvar2)); the
    Gaussian KL of Ho et al. 2020 eq. 5.  Arguments broadcast against each other.
    """
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _log_normal_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Φ(hi) - Φ(lo)) for lo < hi, accurate in both tails and for narrow intervals."""
    # Work in the lower tail, where log Φ keeps full relative precision: Φ(hi)-Φ(lo) equals
    # Φ(-lo)-Φ(-hi), so reflect every interval whose centre is positive.
    flip = (lo + hi) > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    d = torch.special.log_ndtr(a) - log_b  # <= 0
    width = b - a
    narrow = width < 1e-3
    # log(Φ(b)-Φ(a)) = log Φ(b) + log(1 - e^d); -expm1 is exact for d near 0.
    d_safe = torch.where(narrow, torch.full_like(d, -1.0), d).clamp(max=-1e-30)
    exact = log_b + torch.log(-torch.expm1(d_safe))
    # Midpoint rule for a narrow interval (relative error ≈ width²/24·|m²-1|).
    mid = 0.5 * (a + b)
    approx = torch.log(width.clamp(min=1e-38)) - 0.5 * mid**2 - _HALF_LOG_2PI
    return torch.where(narrow, approx, exact)


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised to its 256 bins.

    Ho et al. 2020, eq. 13: bin i covers x ± 1/255; the edge bins extend to -∞ (x = -1) and
    +∞ (x = 1).  Computed with ``torch.special.log_ndtr`` in both tails (no probability
    floor), elementwise, in nats.  ``means`` and ``log_scales`` (log standard deviations)
    broadcast against ``x``.
    """
    x = x.float()
    centered = x - means.float()
    inv_std = torch.exp(-log_scales.float())
    hi = inv_std * (centered + 1.0 / 255.0)
    lo = inv_std * (centered - 1.0 / 255.0)
    lo, hi = torch.broadcast_tensors(lo, hi)
    x = x.expand_as(lo)
    log_cdf_hi = torch.special.log_ndtr(hi)  # left edge bin: P(X <= -1 + 1/255)
    log_sf_lo = torch.special.log_ndtr(-lo)  # right edge bin: P(X > 1 - 1/255)
    inner = _log_normal_mass(lo, hi)
    return torch.where(x < -0.999, log_cdf_hi, torch.where(x > 0.999, log_sf_lo, inner))


def prior_bpd(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """KL(q(x_T|x0) || N(0, I)) in bits/dim, per sample ``[B]`` (the L_T term of Ho et al. eq. 5).

    Zero for a zero-terminal-SNR schedule (q(x_T|x0) is N(0, I) itself).
    """
    abar = float(schedule.alphas_cumprod[-1])
    mean = math.sqrt(abar) * x0.float()
    logvar = torch.tensor(math.log1p(-abar), device=x0.device)
    kl = normal_kl(
        mean, logvar, torch.zeros((), device=x0.device), torch.zeros((), device=x0.device)
    )
    return mean_flat(kl) / LOG2


@dataclass
class VLBTerm:
    """One term L_t per sample (bits/dim) and what the model predicted at that t."""

    vb: Tensor  # [B] decoder NLL at t = 0, KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) otherwise
    x0: Tensor  # x̂0 the model predicted, [B, ...]
    eps: Tensor  # ε̂ the model predicted, [B, ...]


def vlb_from_output(
    schedule: NoiseSchedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    output: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixedsmall",
    clip_denoised: bool = False,
) -> VLBTerm:
    """L_t (bits/dim, ``[B]``) from a network ``output`` already evaluated at ``(x_t, t)``.

    Nichol & Dhariwal 2021, §2-3 (improved-diffusion's ``_vb_terms_bpd``): for t > 0 the KL
    between the true posterior q(x_{t-1}|x_t, x0) (Ho et al. eqs. 6-7, log-variance clipped
    at t = 0 to β̃_1) and p_θ(x_{t-1}|x_t) = N(μ̃(x_t, x̂0), Σ_θ); at t = 0 the negative log
    likelihood of x0 under the discretised Gaussian decoder N(μ̃, Σ_θ) (Ho et al. eq. 13).
    ``t`` are integer training timesteps ``[B]``; the schedule is the full training schedule.
    The hybrid loss passes an ``output`` whose mean channels are detached.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("variance", variance, VARIANCES)
    dev, nd = x_t.device, x_t.ndim
    t = torch.as_tensor(t, device=dev).long()
    if t.ndim == 0:
        t = t.expand(x0.shape[0])
    x0, x_t = x0.float(), x_t.float()
    mean_out, var_values = split_variance(output.float(), variance)
    table = schedule.derived_table("vlb", lambda: _vlb_table(schedule), dev)
    rows = table[:, t].reshape(len(table), -1, *(1,) * (nd - 1))  # gathered on the device
    alpha, sigma, coef_x0, coef_xt, true_logvar, log_large, log_beta = rows.unbind(0)
    x0_hat, eps_hat = to_x0_eps(prediction, mean_out, x_t, alpha, sigma)
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1, 1)
    model_logvar = _select_log_variance(variance, true_logvar, log_large, log_beta, var_values)
    # Both terms for every sample, then each sample's own: choosing on the host which to
    # compute would read t, a device synchronisation per training step. The term a sample
    # does not use is fed harmless inputs, so that its gradient, multiplied by zero, cannot
    # be inf·0 = NaN (the decoder NLL's gradient overflows for means far off the data).
    first = (t == 0).reshape(-1, *(1,) * (nd - 1))
    # KL(q || p): the two means differ by coef_x0·(x0 - x̂0) exactly (same coef_xt·x_t term).
    mean_gap = torch.where(first, 0.0, coef_x0 * (x0 - x0_hat))
    zero = torch.zeros((), device=dev)
    kl = normal_kl(mean_gap, true_logvar, zero, torch.where(first, true_logvar, model_logvar))
    model_mean = torch.where(first, coef_x0 * x0_hat + coef_xt * x_t, x0)
    log_std = 0.5 * torch.where(first, model_logvar, 0.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, log_std)
    vb = torch.where(t == 0, mean_flat(nll), mean_flat(kl)) / LOG2
    return VLBTerm(vb=vb, x0=x0_hat, eps=eps_hat)


def _vlb_table(schedule: NoiseSchedule) -> Tensor:
    """Per-timestep rows of the bound, float64 ``[7, T]``: α, σ, the posterior's coef_x0,
    coef_xt and clipped log-variance (t = 0 clipped to β̃_1), fixedlarge's log-variance
    and log β."""
    ab = schedule.alphas_cumprod
    post = schedule_posterior(schedule)
    log_small, log_large, log_beta = _log_variances(
        ab, schedule.alphas_cumprod_prev, post.log_variance_clipped
    )
    return torch.stack(
        [ab.sqrt(), (1 - ab).sqrt(), post.coef_x0, post.coef_xt, log_small, log_large, log_beta]
    )


def _resolve(
    model: DenoiserNet | Denoiser,
    prediction: str | None,
    variance: str | None,
) -> tuple[Callable[..., Tensor], str, str]:
    """The raw model and its (prediction, variance); a ``Denoiser`` supplies its own."""
    if isinstance(model, Denoiser):
        for kind, given, own in (
            ("prediction", prediction, model.prediction),
            ("variance", variance, model.variance),
        ):
            if given is not None and given != own:
                raise ValueError(f"{kind}={given!r} contradicts the Denoiser's {kind}={own!r}")
        return model.model, model.prediction, model.variance
    prediction = check_choice("prediction", prediction or "eps", PREDICTIONS)
    variance = check_choice("variance", variance or "fixedsmall", VARIANCES)
    return model, prediction, variance


def vlb_terms(
    model: DenoiserNet | Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor | int,
    *,
    prediction: str | None = None,
    variance: str | None = None,
    cond: dict[str, Any] | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
) -> Tensor:
    """Per-sample L_t in bits/dim ``[B]`` at integer timesteps ``t`` (Ho et al. 2020, eq. 5).

    Draws x_t ~ q(x_t|x0) (``noise`` or ``generator``), runs ``model(x_t, t, **cond)`` and
    returns the decoder NLL where t = 0 and KL(q(x_{t-1}|x_t,x0) || p_θ(x_{t-1}|x_t))
    elsewhere (see ``vlb_from_output``).  ``model`` is a raw network (``prediction``,
    ``variance`` default to "eps", "fixedsmall") or a ``Denoiser`` (its own settings).
    """
    return _vlb_step(
        model, schedule, x0, t, prediction, variance, cond, noise, generator, clip_denoised
    )[0].vb


def _vlb_step(model, schedule, x0, t, prediction, variance, cond, noise, generator, clip):
    net, prediction, variance = _resolve(model, prediction, variance)
    t = torch.as_tensor(t, device=x0.device).long()
    if t.ndim == 0:
        t = t.expand(x0.shape[0])
    T = schedule.num_timesteps
    if ((t < 0) | (t >= T)).any():
        raise ValueError(f"timesteps must be integers in [0, {T - 1}], got {t.tolist()}")
    x0 = x0.float()
    if noise is None:
        gdev = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gdev).to(x0.device)
    x_t, noise = q_sample(schedule, x0, t, noise.float())
    out = net(x_t, t.float(), **(cond or {}))
    term = vlb_from_output(
        schedule, x0, x_t, t, out, prediction=prediction, variance=variance, clip_denoised=clip
    )
    return term, noise


@dataclass
class BitsPerDim:
    """The full variational bound of a batch, in bits/dim (Ho et al. 2020, eq. 5).

    ``total = prior + terms.sum(1)``: every term L_0 .. L_{T-1} plus the prior L_T.
    ``terms[:, t]`` is L_t (decoder NLL at t = 0), ``mse[:, t]`` the ε-prediction MSE and
    ``x0_mse[:, t]`` the x̂0 MSE at t.  ``timesteps`` lists the t each column holds.
    """

    total: Tensor  # [B]
    prior: Tensor  # [B]
    terms: Tensor  # [B, T]
    mse: Tensor  # [B, T]
    x0_mse: Tensor  # [B, T]
    timesteps: list[int] = field(default_factory=list)

    def mean(self) -> float:
        """The batch mean of ``total``: the data set's bits/dim."""
        return float(self.total.mean())


@torch.no_grad()
def bits_per_dim(
    model: DenoiserNet | Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    prediction: str | None = None,
    variance: str | None = None,
    cond: dict[str, Any] | None = None,
    batch_size: int | None = None,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> BitsPerDim:
    """The exact variational bound on -log p(x0) in bits/dim: every term t = T-1 .. 0 + prior.

    Nichol & Dhariwal 2021 §3 (improved-diffusion's ``calc_bpd_loop``); x0 is 8-bit data in
    [-1, 1].  T model calls per sample, in chunks of ``batch_size`` (default: all at once);
    ``cond`` values that are tensors are sliced with the batch.  ``prediction`` and
    ``variance`` default to "eps" / "fixedsmall" for a raw model, or the ``Denoiser``'s own.
    """
    from ._progress import progress as progress_bar  # lazy: tqdm only when it is used

    net, prediction, variance = _resolve(model, prediction, variance)
    T = schedule.num_timesteps
    n = x0.shape[0]
    bs = batch_size or n
    if bs < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    cond = cond or {}
    terms = torch.zeros(n, T)
    mse = torch.zeros(n, T)
    x0_mse = torch.zeros(n, T)
    chunks = [(s, min(s + bs, n)) for s in range(0, n, bs)]
    steps = [(s, e, t) for s, e in chunks for t in range(T - 1, -1, -1)]
    for s, e, t in progress_bar(
        steps, total=len(steps), desc="bits/dim", disable=not progress or None
    ):
        xb = x0[s:e].float()
        cb = {
            k: (v[s:e] if isinstance(v, Tensor) and v.shape[:1] == x0.shape[:1] else v)
            for k, v in cond.items()
        }
        tb = torch.full((e - s,), t, device=x0.device, dtype=torch.long)
        term, noise = _vlb_step(
            net, schedule, xb, tb, prediction, variance, cb, None, generator, clip_denoised
        )
        terms[s:e, t] = term.vb.cpu()
        mse[s:e, t] = mean_flat((term.eps - noise) ** 2).cpu()
        x0_mse[s:e, t] = mean_flat((term.x0 - xb) ** 2).cpu()
    prior = prior_bpd(schedule, x0).cpu()
    total = terms.sum(1) + prior
    return BitsPerDim(
        total=total, prior=prior, terms=terms, mse=mse, x0_mse=x0_mse, timesteps=list(range(T))
    )


@dataclass
class BitsPerDimEstimate:
    """An unbiased Monte-Carlo estimate of the bound from a subset of its terms.

    ``total = prior + L_0 + (T-1)/K·Σ_k L_{t_k}`` over the K timesteps ``timesteps`` (drawn
    uniformly without replacement from 1 .. T-1); ``terms[:, k]`` is L_{timesteps[k]}.
    """

    total: Tensor  # [B]
    prior: Tensor  # [B]
    decoder: Tensor  # [B]: L_0, always computed exactly
    terms: Tensor  # [B, K]
    timesteps: list[int]

    def mean(self) -> float:
        """The batch mean of ``total``."""
        return float(self.total.mean())


@torch.no_grad()
def bits_per_dim_estimate(
    model: DenoiserNet | Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    num_terms: int = 50,
    prediction: str | None = None,
    variance: str | None = None,
    cond: dict[str, Any] | None = None,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
) -> BitsPerDimEstimate:
    """Estimate of ``bits_per_dim`` from L_0, the prior and ``num_terms`` random KL terms.

    Unbiased for the full bound (Ho et al. 2020, eq. 5, with the sum over t > 0 estimated by
    uniform sampling); the timesteps used are recorded in the result.  Costs
    ``num_terms + 1`` model calls per sample instead of T.
    """
    net, prediction, variance = _resolve(model, prediction, variance)
    T = schedule.num_timesteps
    if not isinstance(num_terms, int) or not 1 <= num_terms <= T - 1:
        raise ValueError(f"num_terms must be an integer in [1, {T - 1}], got {num_terms!r}")
    gdev = generator.device if generator is not None else "cpu"
    perm = torch.randperm(T - 1, generator=generator, device=gdev).cpu() + 1
    ts = sorted(perm[:num_terms].tolist(), reverse=True)
    x0f = x0.float()
    b = x0.shape[0]

    def term(t: int) -> Tensor:
        tb = torch.full((b,), t, device=x0.device, dtype=torch.long)
        step, _ = _vlb_step(
            net, schedule, x0f, tb, prediction, variance, cond, None, generator, clip_denoised
        )
        return step.vb.cpu()

    terms = torch.stack([term(t) for t in ts], 1) if ts else torch.zeros(b, 0)
    decoder = term(0)
    prior = prior_bpd(schedule, x0).cpu()
    total = prior + decoder + terms.sum(1) * (T - 1) / num_terms
    return BitsPerDimEstimate(total=total, prior=prior, decoder=decoder, terms=terms, timesteps=ts)
