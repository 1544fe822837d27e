"""Samplers written in the rectified-flow frame: flow-matching Euler and Heun.

Owns: ``sample_flow_euler`` and ``sample_flow_heun``, which integrate the probability-flow
ODE as a flow model's sampler does (Esser et al. 2024, "SD3"; diffusers'
``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler``): in the frame
x_f = x/(α+σ), t = σ/(α+σ), where x_f = (1-t)·x0 + t·ε and the ODE is dx_f/dt = ε̂ - x̂0
(the velocity).  Any denoiser works, flow-trained or not: the frame is a rescaling of the
VP state (docs/maths.md, "Formulations"), so nothing here knows which formulation trained
the network.  Pure noise (α = 0, t = 1) needs no special case in this frame.

Flow Euler equals DDIM (x_f + (t'-t)·v̂ = (1-t')·x̂0 + t'·ε̂); Heun is not the VE-frame Heun
of ``karras`` (a different ODE variable), and is second order.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..parametrization import Denoiser, DenoiserOutput
from ..schedules import NoiseLevels
from .common import Generators, SamplerCallback, SamplerSpec
from .ddpm import eval_level, eval_log_snr

__all__ = ["SPECS", "sample_flow_euler", "sample_flow_heun"]


def _flow_frame(levels: NoiseLevels) -> tuple[list[float], list[float]]:
    """(k_i = α_i + σ_i, t_i = σ_i/k_i) at the N+1 levels: x = k·x_f."""
    k = [a + s for a, s in zip(levels.alpha, levels.sigma)]
    return k, [s / kk for s, kk in zip(levels.sigma, k)]


def _eval(
    denoiser: Denoiser, x: Tensor, levels: NoiseLevels, i: int, cond: dict[str, Any] | None
) -> DenoiserOutput:
    if i < len(levels):
        return eval_level(denoiser, x, levels, i, cond)
    return eval_log_snr(denoiser, x, levels.log_snr[i], cond)  # a non-clean final level


def _walk(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    cond: dict[str, Any] | None,
    callback: SamplerCallback | None,
    heun: bool,
) -> Tensor:
    k, t = _flow_frame(levels)
    n = len(levels)
    x_f = x.float() / k[0]
    for i in range(n):
        out = eval_level(denoiser, x_f * k[i], levels, i, cond)
        if callback is not None:
            callback(i, levels.t[i], x_f * k[i], out.x0)
        v = out.eps - out.x0  # dx_f/dt
        dt = t[i + 1] - t[i]
        x_next = x_f + dt * v
        if heun and t[i + 1] > 0:  # trapezoid (EDM Alg. 1 lines 9-11), skipped at t = 0
            out2 = _eval(denoiser, x_next * k[i + 1], levels, i + 1, cond)
            x_next = x_f + dt * 0.5 * (v + (out2.eps - out2.x0))
        x_f = x_next
    return x_f * k[n]


def sample_flow_euler(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
) -> Tensor:
    """Flow-matching Euler: x_f ← x_f + (t_{i+1} - t_i)·v̂, v̂ = ε̂ - x̂0 (SD3's sampler)."""
    return _walk(denoiser, x, levels, cond, callback, heun=False)


def sample_flow_heun(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
) -> Tensor:
    """Heun's method (EDM Alg. 1) on dx_f/dt = v̂ in the flow frame; 2N - 1 model calls."""
    return _walk(denoiser, x, levels, cond, callback, heun=True)


_SD3 = "Esser et al. 2024, Scaling Rectified Flow Transformers (SD3); Liu et al. 2023"
SPECS: list[SamplerSpec] = [
    SamplerSpec(
        name="flow_euler",
        fn=sample_flow_euler,
        order=1,
        stochastic=False,
        nfe=lambda n: n,
        aliases={"FlowMatchEulerDiscreteScheduler": None},
        paper=_SD3 + " (Euler in the flow frame; equals DDIM)",
    ),
    SamplerSpec(
        name="flow_heun",
        fn=sample_flow_heun,
        order=2,
        stochastic=False,
        nfe=lambda n: max(2 * n - 1, 1),
        aliases={"FlowMatchHeunDiscreteScheduler": None},
        paper=_SD3 + " (Heun in the flow frame, Karras et al. 2022 Alg. 1)",
    ),
]
