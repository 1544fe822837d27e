"""Exact likelihood of data under the probability-flow ODE, in bits/dim.

Owns: the probability-flow ODE of a variance-preserving diffusion (Song et al. 2021, "Score-
based generative modeling through SDEs", eq. 13 and appendix D.2), integrated with scipy's
``solve_ivp`` together with the instantaneous change of variables
``d log p / ds = -div f`` (Chen et al. 2018); the divergence by Hutchinson's trace estimator
with Rademacher probes (Grathwohl et al. 2019, FFJORD); uniform dequantisation of 8-bit data
(Ho et al. 2019 / Song et al. 2021) and the conversion to bits/dim.

Knows nothing of samplers or training.  A ddpm model is asked for ε̂ through
`difflab.parametrization.Denoiser`, so any parametrization works; an edm or flow network
through its formulation's own ODE (`difflab.formulations.Formulation.ode_drift`: flow's
dx/dt = v, EDM's dx/dσ = (x - D)/σ), solved by the same integrator and trace estimator.

The ODE is written in the log-SNR λ = log(α²/σ²) of the schedule's continuous view (α² =
sigmoid(λ)), which needs no time derivatives of the schedule:
``dx/dλ = ½σ²·x - ½σ·ε̂(x, λ)``  (from dx/dt = f x - ½g² ∇log p with f = dlogα/dt,
g² = -σ² dλ/dt and ∇log p = -ε̂/σ), integrated from λ(t_start) (data) to λ(t_end) (noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from difflab.formulations import Formulation, FormulationDenoiser, FormulationSchedule
from difflab.parametrization import Denoiser
from difflab.schedules import NoiseSchedule

_MIN_LOG_SNR = -30.0  # zero-terminal-SNR schedules end at λ = -∞; the ODE stops here instead
BIN_WIDTH = 2.0 / 256.0  # an 8-bit level's width on the [-1, 1] scale


@dataclass
class ODELikelihood:
    """Per-sample results of `ode_likelihood` (all float64 tensors ``[B]`` unless noted).

    ``log_px``: log density of the (dequantised) data, nats; ``prior_logp``: log N(x_T; 0, I);
    ``delta_logp``: ∫ div f along the path (log_px = prior_logp + delta_logp); ``bpd``: bits
    per dimension (the discrete 8-bit bound when ``discrete``); ``x_end``: the ODE's end state
    ``[B, ...]``; ``nfe``: model evaluations (each with one vector-Jacobian product).
    """

    log_px: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    bpd: Tensor
    x_end: Tensor
    discrete: bool
    nfe: int

    def mean_bpd(self) -> float:
        """The batch mean of ``bpd``."""
        return float(self.bpd.mean())


def dequantize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of ``uint8`` images: ``(k + u) / 256`` mapped to [-1, 1].

    Each level k occupies ``[k/128 - 1, (k+1)/128 - 1)``; ``u ~ U[0, 1)`` from ``generator``.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"dequantize takes uint8 images, got {images.dtype}")
    u = torch.rand(images.shape, generator=generator, dtype=torch.float64)
    return (images.double() + u) / 256.0 * 2.0 - 1.0


def rademacher(shape: torch.Size, generator: torch.Generator | None = None) -> Tensor:
    """±1 entries with equal probability (Hutchinson probes)."""
    return torch.randint(0, 2, shape, generator=generator).to(torch.float32) * 2.0 - 1.0


def _normal_logp(x: Tensor, std: float = 1.0) -> Tensor:
    """log N(x; 0, std²·I) per sample ``[B]``."""
    d = x[0].numel()
    return -0.5 * d * math.log(2 * math.pi * std**2) - 0.5 * x.flatten(1).pow(2).sum(1) / std**2


Drift = Callable[[float, Tensor], Tensor]  # (u, x [B, ...] float32) -> dx/du


def _vp_drift(denoiser: Denoiser, schedule: NoiseSchedule, cond: dict[str, Any]) -> Drift:
    """dx/dλ = ½σ²·x - ½σ·ε̂(x, λ) of the VP process (module docstring)."""

    def drift(lam: float, x: Tensor) -> Tensor:
        alpha, sigma = math.sqrt(_sigmoid(lam)), math.sqrt(_sigmoid(-lam))
        t = torch.full((x.shape[0],), schedule.t_from_log_snr(lam), device=x.device)
        eps = denoiser.at(x, t, alpha, sigma, **cond).eps
        return 0.5 * sigma**2 * x - 0.5 * sigma * eps

    return drift


def _formulation_drift(
    formulation: Formulation, model: Callable[..., Tensor], cond: dict[str, Any]
) -> Drift:
    """The formulation's own ODE (``Formulation.ode_drift``: EDM in ln σ, flow in t)."""

    def drift(u: float, x: Tensor) -> Tensor:
        return formulation.ode_drift(model, x, u, cond)

    return drift


def _solve(
    drift: Drift, data: Tensor, span: tuple[float, float], probe: Tensor, **solver: Any
) -> tuple[Tensor, Tensor, int]:
    """Integrate ``dx/du = drift`` with ``d(Δlog p)/du = div drift`` over ``span``.

    The divergence is Hutchinson's ``zᵀ (∂f/∂x) z`` with the fixed Rademacher ``probe`` z
    (exact for the identity parts of f: zᵢ² = 1).  Returns ``(x_end [B, ...] float64,
    ∫ div f du [B] float64, number of drift evaluations)``.
    """
    shape, b = data.shape, data.shape[0]
    d = data[0].numel()
    nfe = 0

    def rhs(u: float, state: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(state[: b * d]).reshape(shape).to(probe.device, torch.float32)
        with torch.enable_grad():
            xt.requires_grad_(True)
            f = drift(u, xt)
            (vjp,) = torch.autograd.grad((f * probe).sum(), xt)  # zᵀ ∂f/∂x
        div = (vjp * probe).flatten(1).sum(1)  # Hutchinson: E[zᵀ J z] = tr J, (B,)
        return np.concatenate([f.detach().double().flatten().cpu().numpy(),
                               div.double().cpu().numpy()])  # fmt: skip

    y0 = np.concatenate([data.flatten().cpu().numpy(), np.zeros(b)])
    sol = solve_ivp(rhs, span, y0, **solver)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE solve failed: {sol.message}")
    end = sol.y[:, -1]
    x_end = torch.from_numpy(end[: b * d].copy()).reshape(shape)
    return x_end, torch.from_numpy(end[b * d :].copy()), nfe


def ode_likelihood(
    model: Callable[..., Tensor] | Denoiser,
    x: Tensor,
    schedule: NoiseSchedule,
    *,
    prediction: str = "eps",
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    t_start: float = 0.0,
    t_end: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    formulation: Formulation | None = None,
) -> ODELikelihood:
    """Log-likelihood and bits/dim under the probability-flow ODE (Song et al. 2021, app. D.2).

    ``x``: ``uint8 [B, C, ...]`` images — dequantised uniformly (noise from ``generator``) and
    reported as the 8-bit bound ``bpd = (-log p(x) - D·log(2/256)) / (D ln 2)`` — or float data
    on the model's [-1, 1] scale, reported as a continuous density (``bpd = -log p / (D ln 2)``).
    The divergence uses one Rademacher probe per sample, fixed along the path (from
    ``generator``); it is exact when the Jacobian of the drift is diagonal.

    ddpm: the VP ODE from ``t_start`` to ``t_end`` (default T-1), prior N(0, I); ``model`` a raw
    model (with ``prediction``) or a Denoiser.  edm / flow (``formulation``, or a ``schedule``
    that is a formulation's sampling table, or a ``FormulationDenoiser``): the formulation's
    own ODE on the raw network — flow: dx/dt = v(x, t), t: 0 → 1, prior N(0, I); EDM:
    dx/dσ = (x - D(x; σ))/σ (Karras et al. 2022 eq. 1, 3), σ_min → σ_max, prior
    N(0, σ_max²·I), integrated in ln σ — and ``t_start`` / ``t_end`` must stay unset.
    """
    if isinstance(model, FormulationDenoiser):
        formulation, model = formulation or model.formulation, model.model
    if formulation is None and isinstance(schedule, FormulationSchedule):
        formulation = schedule.formulation
    discrete = x.dtype == torch.uint8
    data = dequantize(x, generator) if discrete else x.double()
    d = data[0].numel()
    probe = rademacher(data.shape, generator).to(x.device)
    cond = cond or {}
    if formulation is None:
        denoiser = model if isinstance(model, Denoiser) else Denoiser(model, schedule, prediction)
        t_end = float(schedule.num_timesteps - 1) if t_end is None else float(t_end)
        lam_end = max(float(schedule.log_snr(t_end)), _MIN_LOG_SNR)
        span = (float(schedule.log_snr(t_start)), lam_end)
        drift, prior_std = _vp_drift(denoiser, schedule, cond), 1.0
    else:
        if isinstance(model, Denoiser) or t_start != 0.0 or t_end is not None:
            raise ValueError(
                f"the {formulation.name} likelihood takes the raw network and its own ODE span "
                "(t_start / t_end are for ddpm schedules)"
            )
        span, prior_std = formulation.ode_span(), formulation.prior_std
        drift = _formulation_drift(formulation, model, cond)
    x_end, delta_logp, nfe = _solve(
        drift, data, span, probe, method=method, rtol=rtol, atol=atol
    )  # log p_0(x) = log p_T(x_T) + ∫ div f
    prior_logp = _normal_logp(x_end, prior_std)
    log_px = prior_logp + delta_logp
    nll = -log_px - (d * math.log(BIN_WIDTH) if discrete else 0.0)
    bpd = nll / (d * math.log(2.0))
    return ODELikelihood(log_px, prior_logp, delta_logp, bpd, x_end, discrete, nfe)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))
