"""PNDM (pseudo Runge–Kutta warm-up) and PLMS against diffusers' PNDMScheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import PNDMScheduler

from difflab.parametrization import Denoiser
from difflab.samplers.ddpm import sample_ddim
from difflab.samplers.pndm import SPECS, sample_plms, sample_pndm
from difflab.schedules import NoiseSchedule

SHAPE = (2, 3, 4, 4)


class LinearModel:
    """A fixed random channel mix of x plus a smooth function of t."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3, 3, generator=g) * 0.4
        self.b = torch.randn(3, generator=g)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        t = t.float().reshape(-1).expand(x.shape[0])
        y = torch.einsum("oc,bchw->bohw", self.w, x)
        return y + torch.sin(t / 170.0 + 0.3)[:, None, None, None] * self.b[None, :, None, None]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def start_noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, model, x) -> tuple[torch.Tensor, int]:
    calls = 0
    for t in scheduler.timesteps:
        out = model(x, t.reshape(1).float())
        calls += 1
        x = scheduler.step(out, t, x).prev_sample
    return x, calls


def make(skip_prk: bool, steps: int):
    sch = PNDMScheduler(
        beta_schedule="scaled_linear", skip_prk_steps=skip_prk, set_alpha_to_one=True,
        timestep_spacing="leading",
    )  # fmt: skip
    sch.set_timesteps(steps)
    sched = NoiseSchedule.from_alphas_cumprod(sch.alphas_cumprod.double())
    return sch, sched, sched.timesteps(steps, "leading")


@pytest.mark.parametrize("steps", [10, 20])
def test_pndm_prk_matches_diffusers(steps):
    sch, sched, ts = make(skip_prk=False, steps=steps)
    model, x = LinearModel(), start_noise()
    ref, calls = run_diffusers(sch, model, x)
    den = Denoiser(model, sched)
    got = sample_pndm(den, x, sched.noise_levels(ts))
    assert den.nfe == calls == steps + 9 == SPECS[0].nfe(steps)
    assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("steps", [2, 5, 15])
def test_plms_matches_diffusers_skip_prk(steps):
    sch, sched, ts = make(skip_prk=True, steps=steps)
    model, x = LinearModel(), start_noise()
    ref, calls = run_diffusers(sch, model, x)
    den = Denoiser(model, sched)
    got = sample_plms(den, x, sched.noise_levels(ts))
    assert den.nfe == calls == SPECS[1].nfe(steps)
    assert rel(got, ref) < 1e-5


def test_pndm_v_prediction_converts_at_each_evaluation():
    """Deliberate difference: diffusers converts the *combined* v output to ε with the step's
    start coefficients; difflab converts each evaluation where it was made.  difflab with a
    v-model equals diffusers run on that model's exact ε = σ_t·x + α_t·v."""
    sch, sched, ts = make(skip_prk=False, steps=10)
    v_model, x = LinearModel(), start_noise()

    def eps_model(x, t):
        a, s = sched.alpha(t.float()), sched.sigma(t.float())
        return s[:, None, None, None] * x + a[:, None, None, None] * v_model(x, t)

    ref, _ = run_diffusers(sch, eps_model, x)
    got = sample_pndm(Denoiser(v_model, sched, prediction="v"), x, sched.noise_levels(ts))
    assert rel(got, ref) < 1e-5
    sch_v, _, _ = make(skip_prk=False, steps=10)
    sch_v.register_to_config(prediction_type="v_prediction")
    diffusers_v, _ = run_diffusers(sch_v, v_model, x)
    assert rel(diffusers_v, ref) > 1e-3  # diffusers' own v path is not the same method


class GaussianX0:
    """Exact x0-denoiser of data N(μ, s²·I): E[x0|x_t] = μ + α·s²/(α²s² + σ²)·(x_t - α·μ)."""

    def __init__(self, schedule: NoiseSchedule, mu: torch.Tensor, s: float):
        self.schedule, self.mu, self.s = schedule, mu, s

    def __call__(self, x, t, **cond):
        a = self.schedule.alpha(t.float())[:, None, None, None]
        sg = self.schedule.sigma(t.float())[:, None, None, None]
        return self.mu + a * self.s**2 / (a**2 * self.s**2 + sg**2) * (x - a * self.mu)


def test_pndm_and_plms_beat_ddim_on_the_same_ode():
    """All three solve DDIM's ODE; the 4th-order methods land far closer to its solution
    (a 1000-step DDIM run) for an exact Gaussian denoiser."""
    sched = NoiseSchedule.linear(1000)
    mu = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(3)) * 0.5
    den = Denoiser(GaussianX0(sched, mu, 0.6), sched, prediction="x0")
    x = start_noise()
    exact = sample_ddim(den, x, sched.noise_levels(sched.timesteps(1000, "trailing")))
    levels = sched.noise_levels(sched.timesteps(10, "trailing"))
    e_ddim = rel(sample_ddim(den, x, levels), exact)
    e_pndm = rel(sample_pndm(den, x, levels), exact)
    e_plms = rel(sample_plms(den, x, levels), exact)
    assert e_pndm < e_ddim / 3 and e_plms < e_ddim / 3, (e_ddim, e_pndm, e_plms)


def test_pndm_needs_four_steps():
    sched = NoiseSchedule.linear(100)
    den = Denoiser(LinearModel(), sched)
    with pytest.raises(ValueError, match="at least 4 steps"):
        sample_pndm(den, start_noise(), sched.noise_levels([99.0, 60.0, 30.0]))


@pytest.mark.parametrize("fn", [sample_pndm, sample_plms])
def test_zero_terminal_snr_v_prediction_is_finite(fn):
    sched = NoiseSchedule.scaled_linear(1000).rescale_zero_terminal_snr()
    den = Denoiser(LinearModel(), sched, prediction="v")
    levels = sched.noise_levels(sched.timesteps(8, "trailing"))
    assert levels.alpha[0] == 0
    out = fn(den, start_noise(), levels)
    assert torch.isfinite(out).all()
