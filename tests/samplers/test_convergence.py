"""Every deterministic sampler converges to the exact probability-flow ODE solution at its order.

For Gaussian data N(m, diag s²) the PF-ODE (Song et al. 2021, eq. 13) maps the marginal at
every level onto every other by the same standardisation, so from the sampler's own first
state x_T the exact solution at level k is
x_k = α_k m + √(α_k² s² + σ_k²)·(x_T - α_T m)/√(α_T² s² + σ_T²).
We compare the state each sampler reports (callback) at its last non-zero level: all
samplers then take the same final jump x̂0(x_{N-1}), which is exact for this denoiser, so the
error there is the solver's discretisation error.  The run is float64 end to end (a
duck-typed exact denoiser that keeps float64 instead of ``Denoiser``'s float32), or the
float32 noise floor (~1e-7) would hide the 3rd-order rates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_all_samplers import MEAN, STD, gaussian_x0

from difflab.parametrization import DenoiserOutput
from difflab.samplers import SAMPLERS
from difflab.schedules import NoiseLevels, NoiseSchedule

STEPS = [10, 20, 40, 80]
# dpm_adaptive picks its own steps from tolerances: no step count to converge in.
DETERMINISTIC = [
    SAMPLERS[n] for n in SAMPLERS if not SAMPLERS[n].stochastic and SAMPLERS[n].nfe(10) >= 0
]
# Every slope is compared with the declared ``spec.order`` (pndm / plms declare 2: their
# Adams-Bashforth weights in the step index are 4th order only on a grid uniform in σ/α;
# measured 2.0-2.1 on logsnr, karras and trailing grids from 10 to 320 steps).  LMS's
# warm-up runs at orders 1-3, so 10..80 steps are pre-asymptotic for it (slope 3.0);
# over 80..320 steps its local slopes are 3.76, 3.85 (logsnr): measured there.
STEPS_FOR = {"lms": [80, 160, 320]}


class ExactGaussianDenoiser64:
    """The exact x̂0 of N(MEAN, diag STD²) with ``Denoiser.at``'s interface, in float64."""

    prediction = "eps"
    variance = "fixedsmall"

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.nfe = 0

    def coefficients(self, t, x):
        return self.schedule.alpha(float(t)), self.schedule.sigma(float(t))

    def __call__(self, x, t, **cond):
        return self.at(x, t, *self.coefficients(t, x))

    def at(self, x, t, alpha, sigma, **cond):
        self.nfe += 1
        x = x.double()
        a = alpha if not isinstance(alpha, torch.Tensor) else alpha.double().reshape(-1, 1)
        s = sigma if not isinstance(sigma, torch.Tensor) else sigma.double().reshape(-1, 1)
        x0 = gaussian_x0(x, a, s, MEAN.double(), STD.double())
        return DenoiserOutput(x0=x0, eps=(x - a * x0) / s)


def exact_pf_ode(x_T: torch.Tensor, levels: NoiseLevels, k: int) -> torch.Tensor:
    """Closed-form PF-ODE solution at level k from x_T at level 0 (Gaussian data)."""
    m, s = MEAN.double(), STD.double()
    a0, s0 = levels.alpha[0], levels.sigma[0]
    ak, sk = levels.alpha[k], levels.sigma[k]
    z = (x_T - a0 * m) / torch.sqrt(a0**2 * s**2 + s0**2)
    return ak * m + torch.sqrt(ak**2 * s**2 + sk**2) * z


def ode_error(spec, schedule, steps: int, spacing: str) -> float:
    levels = schedule.noise_levels(schedule.timesteps(steps, spacing))
    x_T = torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = []
    spec.fn(
        ExactGaussianDenoiser64(schedule),
        x_T.clone(),
        levels,
        callback=lambda i, t, x, x0: states.append((t, x.double())),
    )
    t, x = states[-1]  # the last state visited (level N-1, or a dpm_fast level of its own)
    at = NoiseLevels(t=[levels.t[0], t], log_snr=[levels.log_snr[0], schedule.log_snr(t), math.inf])
    return float((x - exact_pf_ode(x_T, at, 1)).abs().max())


def measured_order(spec, spacing: str = "logsnr") -> tuple[float, list[float]]:
    sched = NoiseSchedule.linear(1000)
    steps = STEPS_FOR.get(spec.name, STEPS)
    errs = [ode_error(spec, sched, n, spacing) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    return float(slope), errs


@pytest.mark.parametrize("spec", DETERMINISTIC, ids=[s.name for s in DETERMINISTIC])
def test_deterministic_sampler_converges_at_its_order(spec):
    slope, errs = measured_order(spec)
    assert all(math.isfinite(e) for e in errs)
    assert errs[-1] < errs[0], f"{spec.name}: error does not decrease: {errs}"
    order = spec.order
    assert slope >= order - 0.3, f"{spec.name}: slope {slope:.2f} < order {order}: {errs}"
