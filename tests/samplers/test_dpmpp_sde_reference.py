"""``dpmpp_sde`` side by side with diffusers' DPMSolverSDEScheduler (k-diffusion's algorithm).

Both draw the two sub-steps' noise of a step s -> t (midpoint m) from a Brownian motion
W(σ^VE): k-diffusion and diffusers from a torchsde Brownian tree, difflab from two
independent increments of the generator.  The test hands diffusers the increments difflab
draws, so the noise is the same and the two must agree to float tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchsde")  # diffusers' DPMSolverSDEScheduler needs it

from diffusers import DPMSolverSDEScheduler  # noqa: E402
from test_karras_samplers import _PRED, LinearModel, rel, run_diffusers, start_noise  # noqa: E402

from difflab.parametrization import Denoiser  # noqa: E402
from difflab.samplers.common import randn_like  # noqa: E402
from difflab.samplers.dpmpp import sample_dpmpp_sde  # noqa: E402
from difflab.schedules import NoiseSchedule  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


class IncrementNoise:
    """diffusers' ``noise_sampler(σ_from, σ_to)`` fed with difflab's Brownian increments.

    Per step, difflab draws z_a then z_b (N(0, I) each) and uses z_a on [σ_s, σ_m] and
    (√(σ_s-σ_m)·z_a + √(σ_m-σ_t)·z_b)/√(σ_s-σ_t) on [σ_s, σ_t]: the normalised increments
    of one Brownian path.  diffusers asks for exactly these two, in this order.
    """

    def __init__(self, like: torch.Tensor, generator: torch.Generator, steps: int) -> None:
        self.draws = [randn_like(like, generator) for _ in range(2 * steps)]
        self.calls = 0
        self.mid: float | None = None

    def __call__(self, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
        s, to = float(sigma_from), float(sigma_to)
        step, second = divmod(self.calls, 2)
        self.calls += 1
        za, zb = self.draws[2 * step], self.draws[2 * step + 1]
        if not second:
            self.mid = to
            return za
        assert self.mid is not None
        w_a, w_b = math.sqrt(s - self.mid), math.sqrt(self.mid - to)
        return (w_a * za + w_b * zb) / math.sqrt(s - to)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_dpmpp_sde_matches_diffusers_with_the_same_brownian_increments(spacing, prediction):
    steps = 10
    sch = DPMSolverSDEScheduler(
        beta_schedule="scaled_linear", timestep_spacing=spacing,
        prediction_type=_PRED[prediction],
    )  # fmt: skip
    sch.set_timesteps(steps)
    sched = NoiseSchedule.from_alphas_cumprod(sch.alphas_cumprod.double())
    levels = sched.noise_levels(sched.timesteps(steps, spacing))
    model, x = LinearModel(), start_noise()

    # difflab draws z_a, z_b for every step but the last (which ends at σ = 0, no noise)
    noise = IncrementNoise(x, torch.Generator().manual_seed(5), steps - 1)
    sch.noise_sampler = noise
    ref, calls = run_diffusers(sch, model, x / levels.alpha[0])
    assert noise.calls == 2 * (steps - 1)  # every increment was used, in order

    den = Denoiser(model, sched, prediction=prediction)
    got = sample_dpmpp_sde(den, x, levels, generator=torch.Generator().manual_seed(5))
    assert den.nfe == calls == 2 * steps - 1
    assert rel(got, ref) < 1e-5
