"""The k-diffusion family: Euler, Euler ancestral, Heun, DPM-2, DPM-2 ancestral, LMS.

Owns: the samplers Karras et al. 2022 ("Elucidating the design space", EDM) and
k-diffusion made standard, written as the papers write them in the variance-exploding
frame x_ve = x/α with noise level σ^VE = σ/α = exp(-λ/2).  The input ``x`` is on the
model's (VP) scale and is converted once; every model call receives x_ve·α.  The
derivative of the probability-flow ODE dx_ve/dσ = (x_ve - x̂0)/σ (EDM eq. 3 with
s(t) = 1) is the denoiser's ε̂, used directly.

Every update x_ve + Σ_j c_j·ε̂_j is evaluated as x̂0 + (σ_i + c_0)·ε̂_0 + Σ_{j≥1} c_j·ε̂_j
(x_ve = x̂0 + σ_i·ε̂_0 at the point of the first evaluation): the same number in exact
arithmetic, without the cancellation of two O(σ) terms at large σ (float32 at σ^VE ~ 10⁴
otherwise loses ~3 digits).

Large steps (``max_ratio``).  Heun's trapezoid and DPM-2's midpoint rule write the step as
DDIM plus a correction c·(ε̂_i - ε̂'), with c = (σ_i - σ_{i+1})/2 (Heun) or σ_i (DPM-2):
proportional to the step's length in σ^VE.  ε̂ along the ODE changes by O(1) where σ^VE
crosses the data's scale and is flat above it, so on a step from σ_i ≫ data scale to
σ_{i+1} ≲ data scale the correction is O(σ_i) wrong, not O(h³).  VP grids make such steps:
cosine T=1000 starts at σ^VE = 20291 (trailing, 5 steps: first ratio 6600), DDPM-linear
at 157 (logsnr, 3 steps: ratio 125; linspace ends 3.4 -> 0.01).  EDM never meets this
(σ_max = 80 with ρ = 7 keeps ratios small).  For Gaussian data N(0, s²) the worst case
over s of one step's error, in units of the target std, is < 1 for Euler at any ratio,
but ~r/5 for Heun and ~√r/2 for DPM-2 at ratio r = σ_i/σ_{i+1} (Heun 0.89, DPM-2 0.34,
two Euler substeps 0.19 at r = 8).  So a step with r > ``max_ratio`` (default 8) is two
Euler (DDIM) substeps through the geometric midpoint, using the step's second model call
there: bounded error, same 2N - 1 calls.  ``max_ratio=math.inf`` is the textbook (and
diffusers') algorithm.  This is not a precision problem: d = ε̂ is used directly and the
update is already written without the O(σ) cancellation (below).

Knows nothing of the registry.  Shared pieces: ``_churn_gamma`` (EDM Alg. 2's γ_i),
``_ancestral_step`` (σ_down / σ_up of k-diffusion's ancestral samplers) and
``_lms_coefficients`` (the integrated Lagrange weights of LMS).

Zero terminal SNR (α_0 = 0, σ^VE_0 = ∞): every sampler here takes the first step as its
exact first-order limit x_ve,1 = x̂0 + σ_1·ε̂ (for the ancestral samplers
x̂0 + σ_down·ε̂ + σ_up·z, with σ_up = min(σ_1, η·σ_1) in the limit).  Heun and DPM-2 skip
their second evaluation on that step (one model call), no churn is applied at σ = ∞, and
LMS drops the derivative at σ = ∞ from its history (its Lagrange weight vanishes as the
node goes to infinity), so the following steps start their warm-up from order 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

from ..parametrization import Denoiser, DenoiserOutput
from ..schedules import NoiseLevels
from .common import Generators, SamplerCallback, SamplerSpec, randn_like
from .ddpm import eval_level, eval_log_snr

__all__ = [
    "SPECS",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
]

_SQRT2_M1 = math.sqrt(2.0) - 1.0
DEFAULT_MAX_RATIO = 8.0


# ---------------------------------------------------------------------- helpers
def _check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    if not s_churn >= 0:
        raise ValueError(f"s_churn must be >= 0 (0 = deterministic), got {s_churn}")
    if not (0 <= s_tmin <= s_tmax):
        raise ValueError(f"need 0 <= s_tmin <= s_tmax, got s_tmin={s_tmin}, s_tmax={s_tmax}")
    if not s_noise >= 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise}")


def _check_eta_noise(eta: float, s_noise: float) -> None:
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic, 1: full ancestral), got {eta}")
    if not s_noise >= 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise}")


def _churn_gamma(sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM Alg. 2, line 4: γ_i = min(S_churn/N, √2-1) if σ_i ∈ [S_tmin, S_tmax], else 0."""
    if s_churn > 0 and math.isfinite(sigma) and s_tmin <= sigma <= s_tmax:
        return min(s_churn / n, _SQRT2_M1)
    return 0.0


def _ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) with σ_down² + σ_up² = σ_next² (k-diffusion's ``get_ancestral_step``).

    σ_up = min(σ_next, η·√(σ_next²·(σ² - σ_next²)/σ²)); the limit σ → ∞ is min(σ_next, η·σ_next).
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    if math.isinf(sigma):
        up = min(sigma_next, eta * sigma_next)
    else:
        up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def _alpha_ve(sigma_ve: float) -> float:
    """α = 1/√(1 + σ^VE²): the factor from the VE frame to the model's scale."""
    return 1.0 / math.sqrt(1.0 + sigma_ve**2)


def _eval_ve(
    denoiser: Denoiser, x_ve: Tensor, sigma_ve: float, cond: dict[str, Any] | None
) -> tuple[Tensor, DenoiserOutput]:
    """The denoiser at an intermediate VE level: returns (x on the model scale, output)."""
    x = x_ve * _alpha_ve(sigma_ve)
    return x, eval_log_snr(denoiser, x, -2.0 * math.log(sigma_ve), cond)


def _two_euler(
    denoiser: Denoiser,
    out: DenoiserOutput,
    sigma: float,
    sigma_to: float,
    cond: dict[str, Any] | None,
) -> Tensor:
    """Euler (DDIM) to the geometric midpoint √(σ·σ_to), a model call there, Euler to σ_to."""
    sigma_mid = math.sqrt(sigma * sigma_to)
    _, out_mid = _eval_ve(denoiser, out.x0 + sigma_mid * out.eps, sigma_mid, cond)
    return out_mid.x0 + sigma_to * out_mid.eps


def _first_step_from_infinity(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    cond: dict[str, Any] | None,
    callback: SamplerCallback | None,
) -> DenoiserOutput:
    """Step 0 from σ^VE = ∞: the model at level 0 (x on the model scale), reported."""
    out = eval_level(denoiser, x, levels, 0, cond)
    if callback is not None:
        callback(0, levels.t[0], x, out.x0)
    return out


def _start(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    cond: dict[str, Any] | None,
    callback: SamplerCallback | None,
) -> tuple[Tensor, int]:
    """(x_ve, first step left to take): x/α_0, 0 normally; from σ^VE_0 = ∞ the state after
    the exact first-order limit step x̂0 + σ_1·ε̂, 1."""
    if levels.alpha[0] > 0:
        return x.float() / levels.alpha[0], 0
    out = _first_step_from_infinity(denoiser, x, levels, cond, callback)
    return out.x0 + levels.sigma_ve[1] * out.eps, 1


def _churned_eval(
    denoiser: Denoiser,
    x_ve: Tensor,
    levels: NoiseLevels,
    sig: list[float],
    alpha: list[float],
    i: int,
    gamma: float,
    s_noise: float,
    cond: dict[str, Any] | None,
    callback: SamplerCallback | None,
    generator: Generators,
) -> tuple[Tensor, float, DenoiserOutput]:
    """EDM Alg. 2, lines 5-7: raise σ_i to σ̂ = (1+γ)σ_i with fresh noise, then evaluate.

    Returns (x̂_ve at σ̂, σ̂, the denoiser's output there).  With γ = 0 it evaluates level i
    itself (no draw).
    """
    sigma = sig[i]
    if gamma > 0:
        sigma_hat = sigma * (1 + gamma)
        x_ve = x_ve + randn_like(x_ve, generator) * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))
        x, out = _eval_ve(denoiser, x_ve, sigma_hat, cond)
        t = denoiser.schedule.t_from_log_snr(-2.0 * math.log(sigma_hat))
    else:
        sigma_hat, t = sigma, levels.t[i]
        x = x_ve * alpha[i]
        out = eval_level(denoiser, x, levels, i, cond)
    if callback is not None:
        callback(i, t, x, out.x0)
    return x_ve, sigma_hat, out


# ---------------------------------------------------------------------- samplers
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without the
    second-order correction), with optional EDM churn.

    x_ve ← x_ve + ε̂·(σ_{i+1} - σ̂_i).  With ``s_churn > 0`` one noise draw per step whose
    σ_i lies in [s_tmin, s_tmax] (EDM Alg. 2 lines 4-6); otherwise deterministic.  The
    model is called at the churned level σ̂ (model time from ``t_from_log_snr``, clamped to
    T-1 above the schedule's largest σ) — diffusers' Euler instead reuses the output at σ_i.

    :param s_churn: EDM S_churn ≥ 0; γ_i = min(S_churn/N, √2 - 1) (0: no churn).
    :param s_tmin: churn only where σ^VE_i ≥ s_tmin.
    :param s_tmax: churn only where σ^VE_i ≤ s_tmax (never at σ = ∞).
    :param s_noise: EDM S_noise, scale of the churn noise.
    """
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    n, sig, alpha = len(levels), levels.sigma_ve, levels.alpha
    x_ve, start = _start(denoiser, x, levels, cond, callback)
    for i in range(start, n):
        gamma = _churn_gamma(sig[i], n, s_churn, s_tmin, s_tmax)
        x_ve, sigma_hat, out = _churned_eval(
            denoiser, x_ve, levels, sig, alpha, i, gamma, s_noise, cond, callback, generator
        )
        x_ve = out.x0 + sig[i + 1] * out.eps  # = x_ve + ε̂·(σ_{i+1} - σ̂)
    return x_ve


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``; Song et al. 2021 SDE view).

    Each step goes deterministically to σ_down and adds σ_up·s_noise·z, with
    σ_down² + σ_up² = σ_{i+1}² (``_ancestral_step``; η = 1 matches DDPM's posterior noise).
    One noise draw per step except the last (σ_{i+1} = 0).

    :param eta: scale of σ_up, ≥ 0 (0: deterministic Euler; 1: full ancestral step).
    :param s_noise: scale of the injected noise.
    """
    _check_eta_noise(eta, s_noise)
    n, sig, alpha = len(levels), levels.sigma_ve, levels.alpha
    x_ve = x.float() / alpha[0] if alpha[0] > 0 else None
    for i in range(n):
        down, up = _ancestral_step(sig[i], sig[i + 1], eta)
        if x_ve is None:  # σ_0 = ∞: exact first-order limit
            out = _first_step_from_infinity(denoiser, x, levels, cond, callback)
            x_ve = out.x0 + down * out.eps
        else:
            out = eval_level(denoiser, x_ve * alpha[i], levels, i, cond)
            if callback is not None:
                callback(i, levels.t[i], x_ve * alpha[i], out.x0)
            x_ve = out.x0 + down * out.eps  # = x_ve + ε̂·(σ_down - σ_i)
        if sig[i + 1] > 0:
            x_ve = x_ve + randn_like(x_ve, generator) * (s_noise * up)
    assert x_ve is not None  # set by the first step (NoiseLevels has at least one)
    return x_ve


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> Tensor:
    """Heun's second-order method, Karras et al. 2022 Alg. 1 (deterministic) / Alg. 2 (churn).

    Euler predictor to σ_{i+1}, then the trapezoidal corrector with the derivative there
    (a real level: its own timestep); the last step (σ_{i+1} = 0) is plain Euler (Alg. 1
    line 9), so N steps cost 2N - 1 model calls.  Churn as in ``sample_euler``.

    :param max_ratio: steps with σ̂_i/σ_{i+1} above it are two Euler substeps through
        √(σ̂_i·σ_{i+1}) (same model calls; module docstring, "Large steps"); ``math.inf``:
        every step second order, as EDM / k-diffusion / diffusers.
    """
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    n, sig, alpha = len(levels), levels.sigma_ve, levels.alpha
    x_ve, start = _start(denoiser, x, levels, cond, callback)
    for i in range(start, n):
        gamma = _churn_gamma(sig[i], n, s_churn, s_tmin, s_tmax)
        x_ve, sigma_hat, out = _churned_eval(
            denoiser, x_ve, levels, sig, alpha, i, gamma, s_noise, cond, callback, generator
        )
        s_next, d = sig[i + 1], out.eps
        if s_next == 0:
            x_ve = out.x0  # Euler to σ = 0 (Alg. 1 line 9)
            continue
        if sigma_hat > max_ratio * s_next:  # two Euler substeps via √(σ̂·σ_next)
            x_ve = _two_euler(denoiser, out, sigma_hat, s_next, cond)
            continue
        x_pred = out.x0 + s_next * d  # Euler predictor
        d2 = eval_level(denoiser, x_pred * alpha[i + 1], levels, i + 1, cond).eps
        # EDM Alg. 1 line 8: x_ve + (σ_next - σ̂)·(d + d2)/2, with x_ve = x̂0 + σ̂·d
        x_ve = out.x0 + (0.5 * (sigma_hat + s_next)) * d + (0.5 * (s_next - sigma_hat)) * d2
    return x_ve


def sample_dpm_2(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> Tensor:
    """DPM-Solver-2 in k-diffusion's form (Lu et al. 2022, Alg. 1 with r = ½ in log σ).

    Euler half-step to the geometric midpoint σ_mid = √(σ̂_i·σ_{i+1}) (λ_mid is the mean of
    the two log-SNRs; its model time from ``t_from_log_snr``), then the full step with the
    midpoint derivative.  The last step (σ_{i+1} = 0) is plain Euler: 2N - 1 model calls.
    Churn as in ``sample_euler``.  Steps with σ̂_i/σ_{i+1} > ``max_ratio`` take their second
    Euler substep from the midpoint instead (see ``sample_heun``; ``math.inf``: diffusers).
    """
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    n, sig, alpha = len(levels), levels.sigma_ve, levels.alpha
    x_ve, start = _start(denoiser, x, levels, cond, callback)
    for i in range(start, n):
        gamma = _churn_gamma(sig[i], n, s_churn, s_tmin, s_tmax)
        x_ve, sigma_hat, out = _churned_eval(
            denoiser, x_ve, levels, sig, alpha, i, gamma, s_noise, cond, callback, generator
        )
        x_ve = _dpm_2_update(denoiser, out, sigma_hat, sig[i + 1], cond, max_ratio)
    return x_ve


def _dpm_2_update(
    denoiser: Denoiser,
    out: DenoiserOutput,
    sigma: float,
    sigma_to: float,
    cond: dict[str, Any] | None,
    max_ratio: float,
) -> Tensor:
    """One DPM-2 step from σ (where ``out`` was evaluated) to σ_to: midpoint rule in log σ,
    or Euler when σ_to = 0.  x_ve + d_mid·(σ_to - σ) is written x̂0 + σ_to·d_mid + σ·(d - d_mid).
    """
    d = out.eps
    if sigma_to == 0:
        return out.x0 + sigma_to * d
    sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_to)))
    x_mid = out.x0 + sigma_mid * d  # Euler to the midpoint
    _, out_mid = _eval_ve(denoiser, x_mid, sigma_mid, cond)
    d_mid = out_mid.eps
    if sigma > max_ratio * sigma_to:  # second Euler substep from the midpoint
        return out_mid.x0 + sigma_to * d_mid
    return out.x0 + sigma_to * d_mid + sigma * (d - d_mid)


def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> Tensor:
    """Ancestral DPM-2 (k-diffusion's ``sample_dpm_2_ancestral``).

    A DPM-2 step to σ_down (midpoint √(σ_i·σ_down)), then σ_up·s_noise·z
    (``_ancestral_step``).  One noise draw per step with σ_down > 0 (every step but the last,
    which is plain Euler to 0): 2N - 1 model calls.  ``max_ratio`` as in ``sample_dpm_2``
    (on σ_i/σ_down).
    """
    _check_eta_noise(eta, s_noise)
    n, sig, alpha = len(levels), levels.sigma_ve, levels.alpha
    x_ve = x.float() / alpha[0] if alpha[0] > 0 else None
    for i in range(n):
        down, up = _ancestral_step(sig[i], sig[i + 1], eta)
        if x_ve is None:  # σ_0 = ∞: exact first-order limit
            out = _first_step_from_infinity(denoiser, x, levels, cond, callback)
            x_ve = out.x0 + down * out.eps
        else:
            out = eval_level(denoiser, x_ve * alpha[i], levels, i, cond)
            if callback is not None:
                callback(i, levels.t[i], x_ve * alpha[i], out.x0)
            x_ve = _dpm_2_update(denoiser, out, sig[i], down, cond, max_ratio)
        if down > 0:
            x_ve = x_ve + randn_like(x_ve, generator) * (s_noise * up)
    assert x_ve is not None  # set by the first step (NoiseLevels has at least one)
    return x_ve


def _lms_coefficient(nodes: list[float], j: int, lo: float, hi: float) -> float:
    """∫_lo^hi ℓ_j(σ) dσ for the Lagrange basis polynomial ℓ_j on ``nodes`` (exact)."""
    poly = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antider = poly.integ()
    return float(antider(hi) - antider(lo))


def _lms_coefficients(sigmas: list[float], order: int) -> list[list[float]]:
    """Per step i, the weights of ε̂_i, ε̂_{i-1}, ... (newest first) in LMS's update.

    Integrates the Lagrange interpolant of the last min(order, #finite nodes) derivatives
    over [σ_i, σ_{i+1}] (k-diffusion's ``linear_multistep_coeff``, exactly instead of by
    quadrature).  A node at σ = ∞ is never included.
    """
    coefs: list[list[float]] = []
    history: list[float] = []
    for i in range(len(sigmas) - 1):
        if math.isinf(sigmas[i]):
            coefs.append([])
            continue
        history = (history + [sigmas[i]])[-order:]
        nodes = history[::-1]  # newest first
        coefs.append(
            [_lms_coefficient(nodes, j, sigmas[i], sigmas[i + 1]) for j in range(len(nodes))]
        )
    return coefs


def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep in σ (k-diffusion's ``sample_lms``; Adams–Bashforth on the PF-ODE).

    x_ve ← x_ve + Σ_j c_ij·ε̂_{i-j}, c_ij the integral over [σ_i, σ_{i+1}] of the Lagrange
    basis polynomial of node σ_{i-j}; order ramps up 1, 2, ..., ``order`` over the first
    steps.  Coefficients are computed once on the host.  One model call per step.

    :param order: the highest number of past derivatives combined, 1 to 6 (1 = Euler).
    """
    if not isinstance(order, int) or not 1 <= order <= 6:
        raise ValueError(f"order must be an integer from 1 to 6, got {order!r}")
    n, sig, alpha = len(levels), levels.sigma_ve, levels.alpha
    coefs = _lms_coefficients(sig, order)
    history: list[Tensor] = []
    x_ve, start = _start(denoiser, x, levels, cond, callback)  # σ_0 = ∞: ε̂_0 not kept
    for i in range(start, n):
        out = eval_level(denoiser, x_ve * alpha[i], levels, i, cond)
        if callback is not None:
            callback(i, levels.t[i], x_ve * alpha[i], out.x0)
        history = (history + [out.eps])[-order:]
        # x_ve + Σ_j c_j·ε̂_{i-j} with x_ve = x̂0 + σ_i·ε̂_i
        x_ve = out.x0 + (sig[i] + coefs[i][0]) * history[-1]
        for c, d in zip(coefs[i][1:], reversed(history[:-1])):
            x_ve = x_ve + c * d
    return x_ve


def _karras_aliases(a1111: str, diffusers: str) -> dict[str, str | None]:
    return {a1111: None, f"{a1111} Karras": "karras", diffusers: None}


_EDM = "Karras, Aittala, Aila & Laine 2022, Elucidating the Design Space of Diffusion-Based"
_EDM += " Generative Models"
_DPM = "Lu et al. 2022, DPM-Solver (DPM-Solver-2); k-diffusion form (Crowson)"

SPECS: list[SamplerSpec] = [
    SamplerSpec(
        name="euler",
        fn=sample_euler,
        order=1,
        stochastic=False,
        nfe=lambda n: n,
        aliases=_karras_aliases("Euler", "EulerDiscreteScheduler"),
        paper=_EDM + " (Alg. 2, first order)",
    ),
    SamplerSpec(
        name="euler_ancestral",
        fn=sample_euler_ancestral,
        order=1,
        stochastic=True,
        nfe=lambda n: n,
        aliases={**_karras_aliases("Euler a", "EulerAncestralDiscreteScheduler")},
        paper="k-diffusion (Crowson 2022) ancestral Euler; Song et al. 2021 reverse SDE",
    ),
    SamplerSpec(
        name="heun",
        fn=sample_heun,
        order=2,
        stochastic=False,
        nfe=lambda n: max(2 * n - 1, 1),
        aliases=_karras_aliases("Heun", "HeunDiscreteScheduler"),
        paper=_EDM + " (Alg. 1, Alg. 2 with churn)",
    ),
    SamplerSpec(
        name="dpm_2",
        fn=sample_dpm_2,
        order=2,
        stochastic=False,
        nfe=lambda n: max(2 * n - 1, 1),
        aliases=_karras_aliases("DPM2", "KDPM2DiscreteScheduler"),
        paper=_DPM,
    ),
    SamplerSpec(
        name="dpm_2_ancestral",
        fn=sample_dpm_2_ancestral,
        order=2,
        stochastic=True,
        nfe=lambda n: max(2 * n - 1, 1),
        aliases=_karras_aliases("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        paper=_DPM + ", ancestral",
    ),
    SamplerSpec(
        name="lms",
        fn=sample_lms,
        order=4,
        stochastic=False,
        nfe=lambda n: n,
        aliases=_karras_aliases("LMS", "LMSDiscreteScheduler"),
        paper="k-diffusion (Crowson 2022) linear multistep on the PF-ODE of Karras et al. 2022",
    ),
]
