"""DPM-Solver (noise prediction): fixed-order singlestep, DPM-Solver-fast and adaptive.

Owns: ``sample_dpm_solver`` (Lu et al. 2022, "DPM-Solver", Alg. 1 (DPM-Solver-2) and
Alg. 2 (DPM-Solver-3), DPM-Solver-1 = DDIM), ``sample_dpm_fast`` (§3.4's order schedule
over a log-SNR-uniform grid) and ``sample_dpm_adaptive`` (§3.4 / App. C adaptive step size,
DPM-Solver-12 and -23), plus the host-float helpers the DPM-Solver++ and UniPC modules share
(``half_log_snr``, ``vp_coefs``).

Knows nothing of the registry or guidance.  Everything is written on the model's (VP)
scale x = α·x0 + σ·ε in the half-log-SNR λ = log(α/σ) of the papers — difflab's
``log_snr`` is log(α²/σ²), twice that.  Step size h = λ_{i+1} - λ_i.

Infinite ends: a step into the clean level (λ = +∞) or out of a zero-SNR level (α = 0,
λ = -∞) has h = ∞; it is taken first-order in the exact limit x_next = α_next·x̂0 +
σ_next·ε̂ (x̂0 exactly when σ_next = 0), so nothing becomes NaN.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..parametrization import Denoiser, DenoiserOutput
from ..schedules import NoiseLevels, _sigmoid
from .common import Generators, SamplerCallback, SamplerSpec, randn_like
from .ddpm import eval_level, eval_log_snr

__all__ = [
    "SPECS",
    "ancestral_split",
    "check_nonneg",
    "half_log_snr",
    "lam_of_sigma_ve",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_dpm_solver",
    "sigma_ve",
    "vp_coefs",
]


def half_log_snr(levels: NoiseLevels) -> list[float]:
    """λ = log(α/σ) at the N+1 levels (host floats; -∞ at zero SNR, +∞ at the clean end)."""
    return [lam / 2 for lam in levels.log_snr]


def vp_coefs(lam: float) -> tuple[float, float]:
    """(α, σ) at half-log-SNR λ: α = √sigmoid(2λ), σ = √sigmoid(-2λ)."""
    return math.sqrt(_sigmoid(2 * lam)), math.sqrt(_sigmoid(-2 * lam))


def sigma_ve(lam: float) -> float:
    """σ^VE = σ/α = e^{-λ} at half-log-SNR λ (∞ at λ = -∞, 0 at λ = +∞)."""
    return math.exp(-lam)


def lam_of_sigma_ve(sve: float) -> float:
    """Inverse of ``sigma_ve``: λ = -log σ^VE (+∞ at σ^VE = 0)."""
    return -math.log(sve) if sve > 0 else math.inf


def ancestral_split(sve_s: float, sve_t: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) in σ^VE for an ancestral step σ_s → σ_t (σ_s may be ∞).

    σ_up = min(σ_t, η·σ_t·√(1 - σ_t²/σ_s²)), σ_down = √(σ_t² - σ_up²) (Ho et al. 2020's
    posterior variance with Song et al. 2021's η, in k-diffusion's σ form).
    """
    ratio = 0.0 if sve_s == math.inf else (sve_t / sve_s) ** 2
    s_up = min(sve_t, eta * sve_t * math.sqrt(max(0.0, 1.0 - ratio)))
    return math.sqrt(max(0.0, sve_t**2 - s_up**2)), s_up


def check_nonneg(name: str, v: float) -> float:
    """``v`` as a float if it is a finite number >= 0, else a ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _check_order(order: int, allowed: tuple[int, ...]) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order not in allowed:
        raise ValueError(f"order must be one of {list(allowed)}, got {order!r}")
    return order


def _ddim_limit(out: DenoiserOutput, lam_t: float) -> Tensor:
    """The first-order step's limit for h = ∞: α_t·x̂0 + σ_t·ε̂ (x̂0 when λ_t = +∞)."""
    if lam_t == math.inf:
        return out.x0
    a_t, s_t = vp_coefs(lam_t)
    return a_t * out.x0 + s_t * out.eps


def _eval_lam(denoiser: Denoiser, x: Tensor, lam: float, cond: dict | None) -> DenoiserOutput:
    return eval_log_snr(denoiser, x, 2 * lam, cond)


def _dpm_solver_step(
    denoiser: Denoiser,
    x: Tensor,
    out: DenoiserOutput,
    lam_s: float,
    lam_t: float,
    order: int,
    cond: dict | None,
    r1: float | None = None,
) -> Tensor:
    """One DPM-Solver-``order`` step from λ_s to λ_t (Lu et al. 2022, eq. 3.7, Alg. 1-2).

    ``out`` is the model at (x, λ_s).  Orders 2 and 3 evaluate the model at the
    intermediate points λ_s + r·h (r1 = 1/2 for order 2; 1/3 and 2/3 for order 3).
    """
    h = lam_t - lam_s
    if not math.isfinite(h):
        return _ddim_limit(out, lam_t)
    a_s, _ = vp_coefs(lam_s)
    a_t, s_t = vp_coefs(lam_t)
    eps = out.eps
    # DPM-Solver-1 (eq. 3.7 with k = 1): x_t = (α_t/α_s)·x - σ_t·(e^h - 1)·ε_s
    x_t = (a_t / a_s) * x - (s_t * math.expm1(h)) * eps
    if order == 1:
        return x_t
    if order == 2:
        r1 = 0.5 if r1 is None else r1
        lam_1 = lam_s + r1 * h
        a_1, s_1 = vp_coefs(lam_1)
        u1 = (a_1 / a_s) * x - (s_1 * math.expm1(r1 * h)) * eps
        eps_1 = _eval_lam(denoiser, u1, lam_1, cond).eps
        # Alg. 1 (general r1): x_t = DPM-Solver-1 - σ_t/(2 r1)·(e^h - 1)·(ε_1 - ε_s)
        return x_t - (s_t / (2 * r1) * math.expm1(h)) * (eps_1 - eps)
    # order 3, Alg. 2 with r1 = 1/3, r2 = 2/3
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    lam_1, lam_2 = lam_s + r1 * h, lam_s + r2 * h
    a_1, s_1 = vp_coefs(lam_1)
    a_2, s_2 = vp_coefs(lam_2)
    u1 = (a_1 / a_s) * x - (s_1 * math.expm1(r1 * h)) * eps
    d1 = _eval_lam(denoiser, u1, lam_1, cond).eps - eps
    phi_2 = math.expm1(r2 * h) / (r2 * h) - 1.0
    u2 = (a_2 / a_s) * x - (s_2 * math.expm1(r2 * h)) * eps - (s_2 * r2 / r1 * phi_2) * d1
    d2 = _eval_lam(denoiser, u2, lam_2, cond).eps - eps
    return x_t - (s_t / r2 * (math.expm1(h) / h - 1.0)) * d2


def sample_dpm_solver(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    order: int = 2,
) -> Tensor:
    """Singlestep DPM-Solver-``order`` (Lu et al. 2022, Alg. 1-2), x ``[B, ...]`` -> clean.

    Each interval [λ_i, λ_{i+1}] is one DPM-Solver-k step of k model evaluations, the extra
    ones at λ_i + r·h (model time from ``schedule.t_from_log_snr``).  The step into the
    clean level (h = ∞) is first-order: x̂0 of the model at the last level.  NFE:
    order·(N-1) + 1 for a clean final level.

    This is the noise-prediction solver of the paper (and of k-diffusion's DPMSolver).
    diffusers' ``DPMSolverSinglestepScheduler(algorithm_type="dpmsolver")`` is the same
    method with the intermediate points placed on its timestep grid: for orders 1 and 2
    (``solver_type="midpoint"``) it equals this function when those grid points sit at
    the λ-midpoints; its order 3 uses a midpoint- or heun-type formula for both stages,
    while Alg. 2 takes the heun-type second stage and the midpoint-type last stage.

    :param order: 1 (DDIM), 2 or 3.
    """
    _check_order(order, (1, 2, 3))
    lam = half_log_snr(levels)
    for i in range(len(levels)):
        out = eval_level(denoiser, x, levels, i, cond)
        if callback is not None:
            callback(i, levels.t[i], x, out.x0)
        x = _dpm_solver_step(denoiser, x, out, lam[i], lam[i + 1], order, cond)
    return x


class _Walk:
    """A walk over λ-points with callbacks numbered consecutively (for fast/adaptive)."""

    def __init__(self, denoiser: Denoiser, cond: dict | None, callback: SamplerCallback | None):
        self.denoiser, self.cond, self.callback, self.i = denoiser, cond, callback, 0

    def eval(self, x: Tensor, lam: float) -> DenoiserOutput:
        out = _eval_lam(self.denoiser, x, lam, self.cond)
        if self.callback is not None:
            t = self.denoiser.schedule.t_from_log_snr(2 * lam)
            self.callback(self.i, t, x, out.x0)
        self.i += 1
        return out


def _ends(denoiser: Denoiser, levels: NoiseLevels) -> tuple[float, float, bool]:
    """(λ_start, λ_end, denoise_at_end) for the fast / adaptive solvers.

    A clean final level is replaced by the schedule's cleanest level (t = 0, k-diffusion's
    σ_min), where x̂0 is then taken.
    """
    lam = half_log_snr(levels)
    clean = lam[-1] == math.inf
    end = max(float(denoiser.schedule.log_snr(0.0)) / 2, lam[-2]) if clean else lam[-1]
    return lam[0], end, clean


def _leave_zero_snr(walk: _Walk, x: Tensor, lam0: float, lam1: float) -> Tensor:
    """From α = 0 (λ = -∞) take the exact first-order (DDIM) step to a finite λ."""
    out = walk.eval(x, lam0)
    return _ddim_limit(out, lam1)


def _eta_target(lam_s: float, lam_n: float, lam_cap: float, eta: float) -> tuple[float, float]:
    """(λ_d, σ_up^VE): where the deterministic part of an η-ancestral step λ_s → λ_n lands
    (k-diffusion's DPM-Solver with η: σ_down, capped at ``lam_cap``) and the noise to add."""
    if eta == 0:
        return lam_n, 0.0
    sd, _ = ancestral_split(sigma_ve(lam_s), sigma_ve(lam_n), eta)
    lam_d = min(lam_cap, lam_of_sigma_ve(sd))
    return lam_d, math.sqrt(max(0.0, sigma_ve(lam_n) ** 2 - sigma_ve(lam_d) ** 2))


def _add_ancestral_noise(
    x_d: Tensor, lam_d: float, lam_n: float, s_up: float, s_noise: float, gen: Generators
) -> Tensor:
    """Move x from λ_d to λ_n by adding σ_up noise in σ^VE: x_n = α_n·(x_d/α_d + σ_up·z)."""
    if s_up == 0:
        return x_d
    a_n, a_d = vp_coefs(lam_n)[0], vp_coefs(lam_d)[0]
    return (a_n / a_d) * x_d + (a_n * s_up * s_noise) * randn_like(x_d, gen)


def sample_dpm_fast(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022, §3.4): a budget of N model calls, orders 3, 3, ..., k.

    Uses only the ends of ``levels`` (N = len(levels) steps is the NFE budget, as in
    k-diffusion and A1111's "DPM fast"): it integrates from λ_0 to the schedule's cleanest
    level (t = 0) on M = ⌊K/3⌋+1 steps uniform in λ with orders [3,...,3,2,1] (K mod 3 = 0) or
    [3,...,3,K mod 3], K = N-1, then spends the last call on x̂0 there.  If the final
    level is not clean it integrates to it with K = N.  A zero-SNR start spends one call
    on the exact DDIM step to level 1 first.  The interior spacing of ``levels`` is unused.

    :param eta: ancestral noise (k-diffusion's η; 0 = the ODE solver).  A1111 runs "DPM fast"
        with its "eta (ancestral)" setting, 1.0 by default.
    :param s_noise: scale of the injected noise.
    """
    eta, s_noise = check_nonneg("eta", eta), check_nonneg("s_noise", s_noise)
    walk = _Walk(denoiser, cond, callback)
    lam_start, lam_end, denoise = _ends(denoiser, levels)
    budget = len(levels) - (1 if denoise else 0)
    if lam_start == -math.inf:
        lam_1 = half_log_snr(levels)[1]
        x = _leave_zero_snr(walk, x, lam_start, lam_1)
        if lam_1 == math.inf:
            return x
        lam_start, budget = lam_1, budget - 1
    if budget > 0 and lam_end > lam_start:
        m = budget // 3 + 1
        if budget % 3 == 0:
            orders = [3] * (m - 2) + [2, 1]
        else:
            orders = [3] * (m - 1) + [budget % 3]
        grid = [lam_start + (lam_end - lam_start) * j / m for j in range(m)] + [lam_end]
        for j, k in enumerate(orders):
            out = walk.eval(x, grid[j])
            lam_d, s_up = _eta_target(grid[j], grid[j + 1], lam_end, eta)
            x = _dpm_solver_step(denoiser, x, out, grid[j], lam_d, k, cond)
            x = _add_ancestral_noise(x, lam_d, grid[j + 1], s_up, s_noise, generator)
    if denoise:
        x = walk.eval(x, lam_end).x0
    return x


def sample_dpm_adaptive(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    stats: dict[str, int] | None = None,
) -> Tensor:
    """Adaptive-step DPM-Solver-12 / -23 (Lu et al. 2022, §3.4 and App. C, Alg. 4).

    Each trial step from λ to λ+h computes a lower-order x_L (DPM-Solver-1, or -2 with
    r1 = 1/3 reusing the order-3 evaluation) and a higher-order x_H sharing model calls;
    the error E = RMS((x_H - x_L)/δ) with δ = max(atol, rtol·max(|x_L|, |x_prev|)), taken
    per sample and maximised over the batch, accepts the step when the proposed step-size
    factor (1/E)^(1/order) passes ``accept_safety``; h is rescaled by that factor either way
    (an integral controller, smoothed as 1 + atan(f - 1)).

    Uses only level 0 and the final level: it integrates from λ_0 to the schedule's
    cleanest level t = 0 (to the final level itself when that is not clean) and then
    returns x̂0 there (one more call).  The number of steps is variable; each trial step
    reads the error on the host (one device sync per trial, unavoidable for an adaptive
    method), a rejected trial re-uses the call at its start point, and the step sizes
    depend on the whole batch (so sample i of a batch is not the same seed run alone).
    Pass ``stats={}`` to get ``nfe``, ``n_accept`` and ``n_reject`` back; the callback runs
    once per accepted start point.

    :param order: 2 (DPM-Solver-12) or 3 (DPM-Solver-23).
    :param rtol, atol: relative and absolute tolerance on x (Lu et al.: 0.05, 0.0078).
    :param h_init: first trial step in λ (half-log-SNR).
    :param accept_safety: accept a step when its factor (1/E)^(1/order) is at least this.
    :param eta: ancestral noise added on each accepted step (k-diffusion's η; the
        controller then uses exponent 1/1.5).  A1111 passes its "eta (ancestral)", 1.0.
    :param s_noise: scale of the injected noise.
    :param stats: a dict to receive ``nfe``, ``n_accept``, ``n_reject``.

    The tolerances apply to x on the VP scale, as in Lu et al.'s algorithm (k-diffusion
    applies them to x/α, so its step sequence differs).
    """
    eta, s_noise = check_nonneg("eta", eta), check_nonneg("s_noise", s_noise)
    _check_order(order, (2, 3))
    for name, v in (("rtol", rtol), ("atol", atol), ("h_init", h_init)):
        if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    if not 0 < accept_safety <= 1:
        raise ValueError(f"accept_safety must lie in (0, 1], got {accept_safety!r}")
    walk = _Walk(denoiser, cond, callback)
    nfe0 = denoiser.nfe
    lam, lam_end, denoise = _ends(denoiser, levels)
    if lam == -math.inf:
        lam_1 = half_log_snr(levels)[1] if len(levels) > 1 else lam_end
        x = _leave_zero_snr(walk, x, lam, lam_1)
        lam = lam_1
        denoise = denoise and lam_1 < math.inf  # a one-step zero-SNR run is done: x = x̂0
    h, x_prev = h_init, x
    n_accept = n_reject = 0
    out: DenoiserOutput | None = None
    exponent = 1.0 / (1.5 if eta > 0 else order)
    while lam < lam_end - 1e-5:
        lam_n = min(lam_end, lam + h)
        lam_t, s_up = _eta_target(lam, lam_n, lam_end, eta)
        if out is None:
            out = walk.eval(x, lam)
        if order == 2:
            x_low = _dpm_solver_step(denoiser, x, out, lam, lam_t, 1, cond)
            x_high = _dpm_solver_step(denoiser, x, out, lam, lam_t, 2, cond)
        else:
            x_low, x_high = _dpm_23(denoiser, x, out, lam, lam_t, cond)
        delta = torch.maximum(
            torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs())
        )
        err = ((x_high - x_low) / delta).square().flatten(1).mean(1).sqrt().max()
        factor = (1.0 / (float(err) + 1e-8)) ** exponent
        factor = 1.0 + math.atan(factor - 1.0)
        if factor >= accept_safety:
            x_prev = x_low
            x = _add_ancestral_noise(x_high, lam_t, lam_n, s_up, s_noise, generator)
            lam, out = lam_n, None
            n_accept += 1
        else:
            n_reject += 1
        h *= factor
    if denoise:
        x = walk.eval(x, lam_end).x0
    if stats is not None:
        stats.update(nfe=denoiser.nfe - nfe0, n_accept=n_accept, n_reject=n_reject)
    return x


def _dpm_23(
    denoiser: Denoiser, x: Tensor, out: DenoiserOutput, lam_s: float, lam_t: float, cond
) -> tuple[Tensor, Tensor]:
    """DPM-Solver-2 (r1 = 1/3) and DPM-Solver-3 from λ_s to λ_t sharing the call at λ_s + h/3."""
    h = lam_t - lam_s
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    a_s, _ = vp_coefs(lam_s)
    a_t, s_t = vp_coefs(lam_t)
    lam_1, lam_2 = lam_s + r1 * h, lam_s + r2 * h
    a_1, s_1 = vp_coefs(lam_1)
    a_2, s_2 = vp_coefs(lam_2)
    eps = out.eps
    x_1 = (a_t / a_s) * x - (s_t * math.expm1(h)) * eps
    u1 = (a_1 / a_s) * x - (s_1 * math.expm1(r1 * h)) * eps
    d1 = _eval_lam(denoiser, u1, lam_1, cond).eps - eps
    x_low = x_1 - (s_t / (2 * r1) * math.expm1(h)) * d1
    phi_2 = math.expm1(r2 * h) / (r2 * h) - 1.0
    u2 = (a_2 / a_s) * x - (s_2 * math.expm1(r2 * h)) * eps - (s_2 * r2 / r1 * phi_2) * d1
    d2 = _eval_lam(denoiser, u2, lam_2, cond).eps - eps
    x_high = x_1 - (s_t / r2 * (math.expm1(h) / h - 1.0)) * d2
    return x_low, x_high


def _variable_nfe(n: int) -> int:
    """dpm_adaptive's NFE depends on the tolerances: -1 (read ``stats`` or ``denoiser.nfe``)."""
    return -1


_LU = "Lu, Zhou, Bao, Chen, Li & Zhu 2022, DPM-Solver (NeurIPS)"

SPECS: list[SamplerSpec] = [
    SamplerSpec(
        name="dpm_solver",
        fn=sample_dpm_solver,
        order=2,
        stochastic=False,
        nfe=lambda n: 2 * n - 1,
        aliases={"DPM-Solver": None, "DPMSolverSinglestepScheduler": None},
        paper=_LU + ", Alg. 1-2 (NFE for the default order 2; order k: k·(N-1)+1)",
    ),
    SamplerSpec(
        name="dpm_fast",
        fn=sample_dpm_fast,
        order=3,
        stochastic=False,
        nfe=lambda n: n,
        default_spacing="logsnr",
        aliases={"DPM fast": None, "k_dpm_fast": None},
        paper=_LU + ", §3.4 DPM-Solver-fast",
    ),
    SamplerSpec(
        name="dpm_adaptive",
        fn=sample_dpm_adaptive,
        order=3,
        stochastic=False,
        nfe=_variable_nfe,
        default_spacing="logsnr",
        aliases={"DPM adaptive": None, "k_dpm_adaptive": None},
        paper=_LU + ", §3.4 / App. C adaptive step size (DPM-Solver-12/23)",
    ),
]
