"""DPM-Solver++ (data prediction): 2M, 3M, their SDE variants, 2S ancestral and "DPM++ SDE".

Owns: ``sample_dpmpp_2m`` / ``sample_dpmpp_3m`` (Lu et al. 2022b, "DPM-Solver++", Alg. 2,
multistep, and its third-order extension), ``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde``
(the SDE-DPM-Solver++ of Lu et al. 2022b App. / k-diffusion's ``dpmpp_2m_sde`` and
``dpmpp_3m_sde``, with η), ``sample_dpmpp_2s_ancestral`` (DPM-Solver++(2S), Alg. 1 with
r = 1/2, plus ancestral noise) and ``sample_dpmpp_sde`` (k-diffusion's singlestep
stochastic DPM-Solver++ with an ancestral split of both sub-steps).

Knows nothing of the registry or guidance.  VP scale x = α·x0 + σ·ε throughout,
half-log-SNR λ = log(α/σ) (difflab's ``log_snr``/2), h = λ_{i+1} - λ_i.  A step into the
clean level (λ = +∞) returns x̂0 exactly; a step out of a zero-SNR level (λ = -∞) is
first order (its limit e^{-h} = 0, e^{-h}-1 = -1 is taken on the host), and history
points at λ = -∞ are never used for higher-order corrections.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import Tensor

from .._validate import check_choice
from ..parametrization import Denoiser
from ..schedules import NoiseLevels
from .common import Generators, SamplerCallback, SamplerSpec, randn_like
from .ddpm import eval_level, eval_log_snr
from .dpm_solver import (
    ancestral_split,
    check_nonneg,
    half_log_snr,
    lam_of_sigma_ve,
    sigma_ve,
    vp_coefs,
)

__all__ = [
    "SPECS",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
]

SolverType = Literal["midpoint", "heun"]


def _multistep(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    cond: dict[str, Any] | None,
    callback: SamplerCallback | None,
    generator: Generators,
    *,
    order: int,
    eta: float = 0.0,
    s_noise: float = 1.0,
    solver_type: str = "heun",
    lower_order_final: bool = False,
) -> Tensor:
    """Multistep DPM-Solver++ of order 1-3 with η-SDE noise (η = 0: the ODE solver).

    x_t = (σ_t/σ_s)e^{-ηh}·x + α_t(1 - e^{-ĥ})·D0 + α_t·φ2(ĥ)·d1 - α_t·φ3(ĥ)·d2
          + σ_t√(1 - e^{-2ηh})·z,   ĥ = (1+η)h,
    φ2(ĥ) = (e^{-ĥ}-1)/ĥ + 1, φ3 = φ2/ĥ - 1/2 (Lu et al. 2022b eq. 14 & App. B; the η-form
    is k-diffusion's).  Second order with ``solver_type="midpoint"`` replaces φ2·d1 by
    ½(1 - e^{-ĥ})·d1.  The order ramps up over the first steps; the step into the clean
    level is first order (x̂0); with ``lower_order_final`` and N < 15 the last step is first
    order and the one before at most second order (diffusers' rule).
    """
    lam = half_log_snr(levels)
    n = len(levels)
    hist: list[tuple[float, Tensor]] = []  # (λ, x̂0), newest first
    for i in range(n):
        out = eval_level(denoiser, x, levels, i, cond)
        if callback is not None:
            callback(i, levels.t[i], x, out.x0)
        lam_s, lam_t = lam[i], lam[i + 1]
        hist = [(lam_s, out.x0), *hist][:order]
        if lam_t == math.inf:
            x = out.x0
            continue
        k = 1
        while k < len(hist) and math.isfinite(hist[k][0]) and math.isfinite(lam_s):
            k += 1
        if lower_order_final and n < 15:
            k = 1 if i == n - 1 else (min(k, 2) if i == n - 2 else k)
        h = lam_t - lam_s
        a_t, s_t = vp_coefs(lam_t)
        s_s = vp_coefs(lam_s)[1]
        h_hat = h * (1.0 + eta)
        decay = math.exp(-eta * h) if eta > 0 else 1.0
        c_0 = -a_t * math.expm1(-h_hat)  # α_t(1 - e^{-ĥ})
        m0 = out.x0
        x = (s_t / s_s * decay) * x + c_0 * m0
        if k >= 2:
            phi_2 = math.expm1(-h_hat) / h_hat + 1.0
            r0 = (lam_s - hist[1][0]) / h
            d1_0 = (m0 - hist[1][1]) / r0
            if k == 2:
                c_1 = 0.5 * c_0 if solver_type == "midpoint" else a_t * phi_2
                x = x + c_1 * d1_0
            else:
                phi_3 = phi_2 / h_hat - 0.5
                r1 = (hist[1][0] - hist[2][0]) / h
                d1_1 = (hist[1][1] - hist[2][1]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + (a_t * phi_2) * d1 - (a_t * phi_3) * d2
        if eta > 0:
            c_z = s_t * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise
            x = x + c_z * randn_like(x, generator)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), x ``[B, ...]`` -> clean sample.

    x_t = (σ_t/σ_s)·x - α_t(e^{-h} - 1)·D,  D = (1 + 1/(2r))·x̂0_i - 1/(2r)·x̂0_{i-1},
    r = h_{i-1}/h_i; first step and the step into the clean level are first order.
    Equals k-diffusion's ``sample_dpmpp_2m`` and diffusers' DPMSolverMultistepScheduler
    (``dpmsolver++``, order 2, midpoint).  N model calls.
    """
    return _multistep(
        denoiser, x, levels, cond, callback, generator, order=2, solver_type="midpoint"
    )


def sample_dpmpp_3m(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    lower_order_final: bool = True,
) -> Tensor:
    """Third-order multistep DPM-Solver++ (Lu et al. 2022b, §4 / App. B), N model calls.

    Equals diffusers' DPMSolverMultistepScheduler(``dpmsolver++``, order 3) with
    ``solver_type="heun"`` (its warm-up second-order step uses φ2, like k-diffusion's 3M).

    :param lower_order_final: with fewer than 15 steps, end with orders 2, 1 (diffusers).
    """
    return _multistep(
        denoiser,
        x,
        levels,
        cond,
        callback,
        generator,
        order=3,
        lower_order_final=bool(lower_order_final),
    )


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: SolverType = "midpoint",
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b; k-diffusion ``sample_dpmpp_2m_sde``).

    η = 1 solves the reverse diffusion SDE (diffusers' ``sde-dpmsolver++``, order 2); η = 0
    is the ODE solver DPM-Solver++(2M) (with ``solver_type="midpoint"``).  One noise draw
    per step except the last.  N model calls.

    :param eta: SDE strength η >= 0.
    :param s_noise: scale of the injected noise.
    :param solver_type: "midpoint" or "heun" second-order correction.
    """
    check_choice("solver_type", solver_type, ("midpoint", "heun"))
    return _multistep(
        denoiser,
        x,
        levels,
        cond,
        callback,
        generator,
        order=2,
        eta=check_nonneg("eta", eta),
        s_noise=check_nonneg("s_noise", s_noise),
        solver_type=solver_type,
    )


def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    lower_order_final: bool = False,
) -> Tensor:
    """SDE-DPM-Solver++(3M) (k-diffusion ``sample_dpmpp_3m_sde``), N model calls.

    The third-order term is α_t·[φ2(ĥ)·d1 - φ3(ĥ)·d2] with φ3 = φ2/ĥ - 1/2, ĥ = (1+η)h: the
    ODE formula with h → ĥ, as the exponential integrator of the SDE requires.  diffusers
    0.42's ``sde-dpmsolver++`` order 3 writes the d2 coefficient with -1/2 in place of
    +1/2 (an O(1) instead of O(h) weight: a bug); otherwise they agree.

    :param eta: SDE strength η >= 0 (η = 0: the ODE solver ``dpmpp_3m``).
    :param s_noise: scale of the injected noise.
    :param lower_order_final: with fewer than 15 steps, end with orders 2, 1 (diffusers);
        off by default, as in k-diffusion / A1111 / ComfyUI.
    """
    return _multistep(
        denoiser,
        x,
        levels,
        cond,
        callback,
        generator,
        order=3,
        eta=check_nonneg("eta", eta),
        s_noise=check_nonneg("s_noise", s_noise),
        lower_order_final=bool(lower_order_final),
    )


def _ancestral_update(
    x: Tensor, d: Tensor, lam_s: float, lam_t: float, sve_down: float, s_up: float
) -> tuple[Tensor, float]:
    """Deterministic DPM-Solver++(1) from λ_s to σ^VE_down, put on the scale of level λ_t.

    Returns (α_t·(x_down/α_down), α_t·σ_up): x_next = first + (α_t σ_up)·z.
    """
    a_t = vp_coefs(lam_t)[0]
    s_s = vp_coefs(lam_s)[1]
    h = lam_of_sigma_ve(sve_down) - lam_s
    # VE: x_down = (σ_down/σ_s)x - (e^{-h}-1)·D; VP at t: times α_t (α_s σ^VE_s = σ_s).
    return (a_t * sve_down / s_s) * x - (a_t * math.expm1(-h)) * d, a_t * s_up


def sample_dpmpp_2s_ancestral(
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
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022b Alg. 1, r = 1/2; k-diffusion's 2S a).

    Each step splits σ^VE_{i+1} into (σ_down, σ_up) as ancestral sampling does (Ho et al.
    2020 with η), takes DPM-Solver++(2S) to σ_down — one extra call at the λ-midpoint —
    and adds σ_up noise.  When σ_down = 0 (η = 1 from zero SNR, or the last step) the step
    is x̂0 plus noise, without the midpoint call.  ≤ 2N-1 model calls.
    """
    eta, s_noise = check_nonneg("eta", eta), check_nonneg("s_noise", s_noise)
    lam = half_log_snr(levels)
    for i in range(len(levels)):
        out = eval_level(denoiser, x, levels, i, cond)
        if callback is not None:
            callback(i, levels.t[i], x, out.x0)
        lam_s, lam_t = lam[i], lam[i + 1]
        if lam_t == math.inf:
            x = out.x0
            continue
        sve_down, s_up = ancestral_split(sigma_ve(lam_s), sigma_ve(lam_t), eta)
        lam_d = lam_of_sigma_ve(sve_down)
        d = out.x0
        if math.isfinite(lam_d - lam_s):
            lam_m = lam_s + 0.5 * (lam_d - lam_s)
            a_m, s_m = vp_coefs(lam_m)
            s_s = vp_coefs(lam_s)[1]
            u = (s_m / s_s) * x - (a_m * math.expm1(-(lam_m - lam_s))) * out.x0
            d = eval_log_snr(denoiser, u, 2 * lam_m, cond).x0
        x, c_z = _ancestral_update(x, d, lam_s, lam_t, sve_down, s_up)
        if c_z > 0:
            x = x + (c_z * s_noise) * randn_like(x, generator)
    return x


def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """Stochastic singlestep DPM-Solver++ (k-diffusion ``sample_dpmpp_sde``), 2N-1 calls.

    Step λ_s → λ_t with midpoint λ_m = λ_s + r·h: an ancestral DPM-Solver++(1) sub-step to
    λ_m gives x̂0_m; the full step uses D = (1 - 1/(2r))·x̂0_s + 1/(2r)·x̂0_m, again split
    ancestrally.  Noise: k-diffusion draws both sub-steps' noise from one Brownian tree
    W(σ^VE) (torchsde).  difflab draws independent increments for [σ_s, σ_m] and
    [σ_m, σ_t] and uses z1 = ΔW_sm/√Δσ_sm, z2 = (ΔW_sm + ΔW_mt)/√Δσ_st — the same joint
    law as the Brownian tree (hence statistically equivalent), but different numbers, and
    reproducible from ``generator`` alone.  Handed the same increments, diffusers'
    ``DPMSolverSDEScheduler`` gives the same samples to 1e-5 (tests/samplers/
    test_dpmpp_sde_reference.py).  A zero-SNR start (σ^VE = ∞) takes one
    first-order ancestral step.

    :param eta: ancestral strength η >= 0 (0: deterministic DPM-Solver++(2S) with r).
    :param s_noise: scale of the injected noise.
    :param r: relative position of the midpoint in λ, 0 < r < 1.
    """
    eta, s_noise = check_nonneg("eta", eta), check_nonneg("s_noise", s_noise)
    if not (isinstance(r, int | float) and 0 < r < 1):
        raise ValueError(f"r must lie in (0, 1), got {r!r}")
    lam = half_log_snr(levels)
    for i in range(len(levels)):
        out = eval_level(denoiser, x, levels, i, cond)
        if callback is not None:
            callback(i, levels.t[i], x, out.x0)
        lam_s, lam_t = lam[i], lam[i + 1]
        if lam_t == math.inf:
            x = out.x0
            continue
        sve_s, sve_t = sigma_ve(lam_s), sigma_ve(lam_t)
        if lam_s == -math.inf:
            sd, su = ancestral_split(sve_s, sve_t, eta)
            x, c_z = _ancestral_update(x, out.x0, lam_s, lam_t, sd, su)
            if c_z > 0:
                x = x + (c_z * s_noise) * randn_like(x, generator)
            continue
        lam_m = lam_s + r * (lam_t - lam_s)
        sve_m = sigma_ve(lam_m)
        za = randn_like(x, generator) if eta > 0 else None
        zb = randn_like(x, generator) if eta > 0 else None
        # Step 1: s -> m, ancestral
        sd, su = ancestral_split(sve_s, sve_m, eta)
        x_m, c_z = _ancestral_update(x, out.x0, lam_s, lam_m, sd, su)
        if za is not None:
            x_m = x_m + (c_z * s_noise) * za
        d_m = eval_log_snr(denoiser, x_m, 2 * lam_m, cond).x0
        # Step 2: s -> t with D = (1 - fac)·x̂0_s + fac·x̂0_m, ancestral
        fac = 1.0 / (2.0 * r)
        d = (1.0 - fac) * out.x0 + fac * d_m
        sd, su = ancestral_split(sve_s, sve_t, eta)
        x, c_z = _ancestral_update(x, d, lam_s, lam_t, sd, su)
        if za is not None and zb is not None:
            w_a, w_b = math.sqrt(sve_s - sve_m), math.sqrt(sve_m - sve_t)
            z = (w_a * za + w_b * zb) / math.sqrt(sve_s - sve_t)
            x = x + (c_z * s_noise) * z
    return x


_LU_PP = "Lu, Zhou, Bao, Chen, Li & Zhu 2022b, DPM-Solver++ (arXiv:2211.01095)"

SPECS: list[SamplerSpec] = [
    SamplerSpec(
        name="dpmpp_2m",
        fn=sample_dpmpp_2m,
        order=2,
        stochastic=False,
        nfe=lambda n: n,
        aliases={
            "DPM++ 2M": None,
            "DPM++ 2M Karras": "karras",
            "k_dpmpp_2m": None,
            "dpmpp_2m_karras": "karras",
            "DPMSolverMultistepScheduler": None,
        },
        paper=_LU_PP + ", Alg. 2",
    ),
    SamplerSpec(
        name="dpmpp_3m",
        fn=sample_dpmpp_3m,
        order=3,
        stochastic=False,
        nfe=lambda n: n,
        aliases={"DPM++ 3M": None, "DPM++ 3M Karras": "karras"},
        paper=_LU_PP + ", §4 third-order multistep",
    ),
    SamplerSpec(
        name="dpmpp_2m_sde",
        fn=sample_dpmpp_2m_sde,
        order=2,
        stochastic=True,
        nfe=lambda n: n,
        aliases={
            "DPM++ 2M SDE": None,
            "DPM++ 2M SDE Karras": "karras",
            "DPM++ 2M SDE Exponential": "exponential",
            "k_dpmpp_2m_sde": None,
        },
        paper=_LU_PP + ", SDE-DPM-Solver++(2M)",
    ),
    SamplerSpec(
        name="dpmpp_3m_sde",
        fn=sample_dpmpp_3m_sde,
        order=3,
        stochastic=True,
        nfe=lambda n: n,
        aliases={
            "DPM++ 3M SDE": None,
            "DPM++ 3M SDE Karras": "karras",
            "DPM++ 3M SDE Exponential": "exponential",
            "k_dpmpp_3m_sde": None,
        },
        paper=_LU_PP + ", SDE variant, third order (k-diffusion)",
    ),
    SamplerSpec(
        name="dpmpp_2s_ancestral",
        fn=sample_dpmpp_2s_ancestral,
        order=2,
        stochastic=True,
        nfe=lambda n: 2 * n - 1,
        aliases={
            "DPM++ 2S a": None,
            "DPM++ 2S a Karras": "karras",
            "k_dpmpp_2s_a": None,
            "k_dpmpp_2s_ancestral": None,
        },
        paper=_LU_PP + ", Alg. 1 (2S, r = 1/2) with ancestral noise (k-diffusion)",
    ),
    SamplerSpec(
        name="dpmpp_sde",
        fn=sample_dpmpp_sde,
        order=2,
        stochastic=True,
        nfe=lambda n: 2 * n - 1,
        aliases={
            "DPM++ SDE": None,
            "DPM++ SDE Karras": "karras",
            "k_dpmpp_sde": None,
            "DPMSolverSDEScheduler": None,
        },
        paper=_LU_PP + ", stochastic singlestep (k-diffusion's sample_dpmpp_sde)",
    ),
]
