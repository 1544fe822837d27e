"""Pseudo numerical methods: PNDM (Runge–Kutta warm-up + linear multistep) and PLMS.

Owns: ``sample_pndm`` and ``sample_plms`` (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical
Methods for Diffusion Models on Manifolds").  Both move along the data manifold with the
paper's transfer part φ (eq. 9 — algebraically the deterministic DDIM step
x_prev = α_prev·x̂0(e) + σ_prev·e) and differ in how they combine noise estimates e:

- PNDM: the first three steps are pseudo Runge–Kutta (eq. 13: four evaluations, two of them
  at the step's midpoint in model time), every later step is the 4th-order pseudo linear
  multistep (eq. 12) over the ε̂ at the last four levels.
- PLMS: no Runge–Kutta steps; the first step is a pseudo improved-Euler step (two
  evaluations), then the multistep order ramps 2, 3, 4 — diffusers' ``skip_prk_steps=True``
  and latent-diffusion's PLMS sampler.

Knows nothing of the registry.  ε̂ is converted from the model's parametrization at the
point where the model was called (diffusers converts a *combined* v-prediction with the
step's start coefficients instead, which is not the paper's method for v-models).

Zero terminal SNR (α_0 = 0): step 0 is the exact DDIM limit x_1 = α_1·x̂0 + σ_1·ε̂ (one
call) and its ε̂ enters the multistep history; a warm-up step of PNDM spent there is not
repeated (PNDM then costs N + 6 calls, PLMS N).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..parametrization import Denoiser
from ..schedules import NoiseLevels, _sigmoid
from .common import Generators, SamplerCallback, SamplerSpec
from .ddpm import eval_level

__all__ = ["SPECS", "sample_plms", "sample_pndm"]

# Global order on the PF-ODE (what ``SamplerSpec.order`` declares).  Eq. 12's weights are
# 4th order for ε̂ as a function of the step *index*, i.e. on a grid uniform in σ/α (the
# transfer φ is exact for constant ε̂ in σ/α); on the grids used in practice (log-SNR,
# Karras, trailing, ... — none uniform in σ/α) the fixed weights are O(h²) off and the
# measured global order is 2 (tests/samplers/test_convergence.py: slopes 2.0-2.1 from 10
# to 320 steps; diffusers' PNDM/PLMS behave the same).
_ODE_ORDER = 2

# Adams–Bashforth weights, newest ε̂ first (PNDM eq. 12 and its lower-order warm-up).
_AB = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def _transfer(x: Tensor, e: Tensor, a: float, s: float, a_to: float, s_to: float) -> Tensor:
    """PNDM eq. 9, φ(x_t, e, t, t-δ) = α_{t-δ}·(x_t - σ_t·e)/α_t + σ_{t-δ}·e (needs α_t > 0)."""
    return (a_to / a) * x + (s_to - a_to * s / a) * e


def _multistep(history: list[Tensor], e: Tensor) -> Tensor:
    """Σ_j w_j·ε̂_{i-j} with Adams–Bashforth weights of order len(history) + 1 (≤ 4)."""
    eps = [e] + history[::-1][:3]
    weights = _AB[len(eps) - 1]
    out = weights[0] * eps[0]
    for w, ej in zip(weights[1:], eps[1:]):
        out = out + w * ej
    return out


def sample_pndm(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
) -> Tensor:
    """PNDM, Liu et al. 2022 (Alg. 2): 3 pseudo Runge–Kutta steps, then 4th-order PLMS.

    Runge–Kutta step i (eq. 13), with the midpoint at model time (t_i + t_{i+1})/2:
    e1 = ε̂(x, t_i), e2 = ε̂(φ(x, e1, t_i, mid), mid), e3 = ε̂(φ(x, e2, t_i, mid), mid),
    e4 = ε̂(φ(x, e3, t_i, t_{i+1}), t_{i+1}), x ← φ(x, (e1 + 2e2 + 2e3 + e4)/6, t_i, t_{i+1}).
    N steps cost N + 9 model calls; needs N >= 4 (the warm-up must not reach the clean end).
    """
    n = len(levels)
    if n < 4:
        raise ValueError(
            f"pndm needs at least 4 steps (3 Runge-Kutta warm-up steps + 1), got {n}; "
            "use 'plms' for fewer steps"
        )
    a, s, t = levels.alpha, levels.sigma, levels.t
    sched = denoiser.schedule
    history: list[Tensor] = []
    for i in range(n):
        out = eval_level(denoiser, x, levels, i, cond)
        if callback is not None:
            callback(i, t[i], x, out.x0)
        e1 = out.eps
        if a[i] == 0:  # zero terminal SNR: exact DDIM limit
            x = a[i + 1] * out.x0 + s[i + 1] * e1
        elif i < 3:
            t_mid = 0.5 * (t[i] + t[i + 1])
            lam = float(sched.log_snr(t_mid))
            a_m, s_m = math.sqrt(_sigmoid(lam)), math.sqrt(_sigmoid(-lam))
            x, kw = x.float(), cond or {}
            x_m = _transfer(x, e1, a[i], s[i], a_m, s_m)
            e2 = denoiser.at(x_m, t_mid, a_m, s_m, **kw).eps
            x_m = _transfer(x, e2, a[i], s[i], a_m, s_m)
            e3 = denoiser.at(x_m, t_mid, a_m, s_m, **kw).eps
            x_end = _transfer(x, e3, a[i], s[i], a[i + 1], s[i + 1])
            e4 = eval_level(denoiser, x_end, levels, i + 1, cond).eps
            e_rk = (e1 + 2 * e2 + 2 * e3 + e4) / 6
            x = _transfer(x, e_rk, a[i], s[i], a[i + 1], s[i + 1])
        else:
            x = _transfer(x.float(), _multistep(history, e1), a[i], s[i], a[i + 1], s[i + 1])
        history = (history + [e1])[-3:]
    return x


def sample_plms(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
) -> Tensor:
    """PLMS: PNDM's linear multistep (eq. 12) with a lower-order warm-up instead of PRK.

    Step 0 is a pseudo improved-Euler step: e' = (ε̂(x_0, t_0) + ε̂(φ(x_0, ·, t_0, t_1), t_1))/2
    (the second ε̂ is not kept); step i ≥ 1 uses Adams–Bashforth of order min(i + 1, 4) over
    the ε̂ at the levels visited.  N steps cost N + 1 model calls (1 for N = 1).
    """
    n = len(levels)
    a, s, t = levels.alpha, levels.sigma, levels.t
    history: list[Tensor] = []
    for i in range(n):
        out = eval_level(denoiser, x, levels, i, cond)
        if callback is not None:
            callback(i, t[i], x, out.x0)
        e = out.eps
        if a[i] == 0:  # zero terminal SNR: exact DDIM limit
            x = a[i + 1] * out.x0 + s[i + 1] * e
        elif not history and i + 1 < n:
            x = x.float()
            x_pred = _transfer(x, e, a[i], s[i], a[i + 1], s[i + 1])
            e2 = eval_level(denoiser, x_pred, levels, i + 1, cond).eps
            x = _transfer(x, (e + e2) / 2, a[i], s[i], a[i + 1], s[i + 1])
        else:
            x = _transfer(x.float(), _multistep(history, e), a[i], s[i], a[i + 1], s[i + 1])
        history = (history + [e])[-3:]
    return x


_PNDM = "Liu, Ren, Lin & Zhao 2022, Pseudo Numerical Methods for Diffusion Models on Manifolds"

SPECS: list[SamplerSpec] = [
    SamplerSpec(
        name="pndm",
        fn=sample_pndm,
        order=_ODE_ORDER,
        stochastic=False,
        nfe=lambda n: n + 9,
        aliases={"PNDM": None, "PNDMScheduler": None},
        paper=_PNDM + " (Alg. 2, PRK warm-up)",
    ),
    SamplerSpec(
        name="plms",
        fn=sample_plms,
        order=_ODE_ORDER,
        stochastic=False,
        nfe=lambda n: n + 1 if n > 1 else 1,
        aliases={"PLMS": None},
        paper=_PNDM + " (PLMS, eq. 12, lower-order warm-up)",
    ),
]
