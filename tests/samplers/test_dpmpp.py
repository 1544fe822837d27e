"""DPM-Solver++ family side by side with diffusers' DPMSolverMultistepScheduler.

Same schedule, same timesteps (the scheduler's own, handed to ``schedule.noise_levels``),
same deterministic toy "model" and, for the SDE variants, the same noise (one seeded CPU
generator each; both draw one ``randn`` of the sample's shape per step in step order).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler  # noqa: E402

from difflab.parametrization import Denoiser  # noqa: E402
from difflab.samplers.dpmpp import (  # noqa: E402
    SPECS,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from difflab.schedules import NoiseLevels, NoiseSchedule  # noqa: E402

PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPE = (2, 3, 4, 4)


class ToyModel:
    """A fixed random linear map of x plus a smooth function of t (any parametrization)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = 0.6 * torch.eye(3) + 0.1 * torch.randn(3, 3, generator=g)
        self.p = torch.randn(3, 4, 4, generator=g)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        t = t.float().reshape(-1, 1, 1, 1)
        return torch.einsum("oc,bchw->bohw", self.w, x) + torch.sin(t / 250.0) * self.p


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _x_T(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _diffusers_run(sched, model, x, generator=None):
    for t in sched.timesteps:
        out = model(x, t.float().expand(x.shape[0]))
        kw = {"generator": generator} if generator is not None else {}
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def _multistep(schedule: NoiseSchedule, steps: int, **kw) -> DPMSolverMultistepScheduler:
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.numpy(),
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        **kw,
    )
    s.set_timesteps(steps)
    return s


CASES = [
    # (difflab fn, difflab options, diffusers options)
    (sample_dpmpp_2m, {}, dict(algorithm_type="dpmsolver++", solver_order=2)),
    (
        sample_dpmpp_3m,
        {},
        dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="heun"),
    ),
    (
        sample_dpmpp_3m,
        {"lower_order_final": False},
        dict(
            algorithm_type="dpmsolver++",
            solver_order=3,
            solver_type="heun",
            lower_order_final=False,
        ),
    ),
    (
        sample_dpmpp_2m_sde,
        {},
        dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint"),
    ),
    (
        sample_dpmpp_2m_sde,
        {"solver_type": "heun"},
        dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun"),
    ),
]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_dpmpp_matches_diffusers_multistep(case, prediction):
    fn, opts, dopts = CASES[case]
    schedule = NoiseSchedule.scaled_linear(1000)
    model = ToyModel()
    steps = 10
    sched = _multistep(schedule, steps, prediction_type=PRED[prediction], **dopts)
    x_T = _x_T()
    ref = _diffusers_run(sched, model, x_T.clone(), torch.Generator().manual_seed(7))
    levels = schedule.noise_levels(sched.timesteps.tolist())
    den = Denoiser(model, schedule, prediction)
    out = fn(den, x_T.clone(), levels, generator=torch.Generator().manual_seed(7), **opts)
    assert _rel(out, ref) <= 1e-5
    assert den.nfe == steps


@pytest.mark.parametrize("steps", [14, 16])
def test_dpmpp_3m_lower_order_final_only_below_15_steps(steps):
    """diffusers lowers the order of the last steps only when N < 15; so does difflab."""
    schedule, model = NoiseSchedule.linear(1000), ToyModel()
    dopts = dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="heun")
    sched = _multistep(schedule, steps, **dopts)
    x_T = _x_T()
    ref = _diffusers_run(sched, model, x_T.clone())
    levels = schedule.noise_levels(sched.timesteps.tolist())
    den = Denoiser(model, schedule, "eps")
    out = sample_dpmpp_3m(den, x_T.clone(), levels)
    assert _rel(out, ref) <= 1e-5
    plain = sample_dpmpp_3m(den, x_T.clone(), levels, lower_order_final=False)
    assert (_rel(plain, out) == 0.0) == (steps >= 15)


class _FixedSDE3(DPMSolverMultistepScheduler):
    """diffusers with its sde-dpmsolver++ order-3 d2 weight corrected from -1/2 to +1/2.

    diffusers 0.42 writes α_t·((1 - e^{-2h} - 2h)/(2h)² - 1/2)·D2; the exponential
    integrator (and k-diffusion's dpmpp_3m_sde) has +1/2: the difference is exactly α_t·D2.
    """

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, **kwargs):
        x = super().multistep_dpm_solver_third_order_update(model_output_list, *args, **kwargs)
        i = self.step_index
        alpha_t, _ = self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])
        lams = []
        for j in (i, i - 1, i - 2):
            a, s = self._sigma_to_alpha_sigma_t(self.sigmas[j])
            lams.append(torch.log(a) - torch.log(s))
        lam_t = torch.log(alpha_t) - torch.log(self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])[1])
        h, h0, h1 = lam_t - lams[0], lams[0] - lams[1], lams[1] - lams[2]
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        r0, r1 = h0 / h, h1 / h
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        return x + alpha_t * d2


@pytest.mark.parametrize("lower_order_final", [False, True])
def test_dpmpp_3m_sde_matches_diffusers_with_d2_sign_fixed(lower_order_final):
    schedule = NoiseSchedule.scaled_linear(1000)
    model = ToyModel()
    steps = 12
    kw = dict(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.numpy(),
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        algorithm_type="sde-dpmsolver++",
        solver_order=3,
        solver_type="heun",
        lower_order_final=lower_order_final,
    )
    fixed, buggy = _FixedSDE3(**kw), DPMSolverMultistepScheduler(**kw)
    fixed.set_timesteps(steps)
    buggy.set_timesteps(steps)
    x_T = _x_T()
    ref = _diffusers_run(fixed, model, x_T.clone(), torch.Generator().manual_seed(3))
    ref_bug = _diffusers_run(buggy, model, x_T.clone(), torch.Generator().manual_seed(3))
    levels = schedule.noise_levels(fixed.timesteps.tolist())
    out = sample_dpmpp_3m_sde(
        Denoiser(model, schedule, "eps"),
        x_T.clone(),
        levels,
        generator=torch.Generator().manual_seed(3),
        lower_order_final=lower_order_final,
    )
    assert _rel(out, ref) <= 1e-5
    assert _rel(out, ref_bug) > 1e-3  # the documented diffusers bug is visible


def test_sde_variants_with_eta0_are_the_ode_solvers():
    schedule = NoiseSchedule.linear(1000)
    levels = schedule.noise_levels(schedule.timesteps(8, "trailing"))
    den = Denoiser(ToyModel(), schedule, "eps")
    x = _x_T()
    a = sample_dpmpp_2m_sde(den, x, levels, eta=0.0)
    torch.testing.assert_close(a, sample_dpmpp_2m(den, x, levels), rtol=1e-6, atol=1e-6)
    b = sample_dpmpp_3m_sde(den, x, levels, eta=0.0)
    c = sample_dpmpp_3m(den, x, levels, lower_order_final=False)
    torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-6)
    d = sample_dpmpp_sde(den, x, levels, eta=0.0)
    e = sample_dpmpp_2s_ancestral(den, x, levels, eta=0.0)
    torch.testing.assert_close(d, e, rtol=1e-6, atol=1e-6)


def test_dpmpp_2s_eta0_matches_diffusers_singlestep_on_midpoint_grid():
    """DPM-Solver++(2S) = diffusers' singlestep dpmsolver++ order 2 whose odd timesteps sit
    at the λ-midpoints: a schedule linear in log-SNR makes integer midpoints exact."""
    T = 1000
    lam = torch.linspace(9.0, -9.0, T, dtype=torch.float64)
    schedule = NoiseSchedule.from_alphas_cumprod(torch.sigmoid(lam))
    model = ToyModel()
    outer = [960, 720, 480, 240]
    inner = [t for a in outer for t in (a, a - 120)][:-1]  # ..., 240 then clean
    sched = DPMSolverSinglestepScheduler(
        num_train_timesteps=T,
        trained_betas=schedule.betas.numpy(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    sched.set_timesteps(timesteps=inner)
    x_T = _x_T()
    ref = _diffusers_run(sched, model, x_T.clone())
    levels = schedule.noise_levels(outer)
    out = sample_dpmpp_2s_ancestral(Denoiser(model, schedule, "eps"), x_T.clone(), levels, eta=0)
    assert _rel(out, ref) <= 1e-5


STOCHASTIC = [sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_sde]


@pytest.mark.parametrize("fn", STOCHASTIC, ids=lambda f: f.__name__)
def test_batch_equals_single_seed_runs(fn):
    schedule = NoiseSchedule.linear(1000)
    levels = schedule.noise_levels(schedule.timesteps(6, "trailing"))
    den = Denoiser(ToyModel(), schedule, "eps")
    x = _x_T()
    batch = fn(den, x, levels, generator=[torch.Generator().manual_seed(s) for s in (4, 5)])
    for j, s in enumerate((4, 5)):
        one = fn(den, x[j : j + 1], levels, generator=[torch.Generator().manual_seed(s)])
        torch.testing.assert_close(batch[j : j + 1], one, rtol=1e-5, atol=1e-6)


ALL = [
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
]


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_zero_terminal_snr_stays_finite(fn, prediction):
    schedule = NoiseSchedule.scaled_linear(1000).rescale_zero_terminal_snr()
    levels = schedule.noise_levels(schedule.timesteps(7, "trailing"))
    assert levels.log_snr[0] == -math.inf
    seen = []
    den = Denoiser(ToyModel(), schedule, prediction)
    out = fn(
        den,
        _x_T(),
        levels,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x, x0: seen.append((i, t)),
    )
    assert torch.isfinite(out).all()
    assert seen == [(i, levels.t[i]) for i in range(7)]


def test_final_step_returns_x0_hat_exactly():
    schedule = NoiseSchedule.linear(1000)
    levels = schedule.noise_levels([999.0])
    model = ToyModel()
    den = Denoiser(model, schedule, "eps")
    x = _x_T()
    x0 = den(x, 999.0).x0
    for fn in ALL:
        torch.testing.assert_close(fn(den, x, levels), x0, rtol=0, atol=0)


def test_bad_options_raise():
    schedule = NoiseSchedule.linear(100)
    levels = NoiseLevels(t=[99.0], log_snr=[float(schedule.log_snr(99)), math.inf])
    den = Denoiser(ToyModel(), schedule, "eps")
    x = _x_T()
    with pytest.raises(ValueError, match="solver_type"):
        sample_dpmpp_2m_sde(den, x, levels, solver_type="midpiont")
    with pytest.raises(ValueError, match="eta"):
        sample_dpmpp_2m_sde(den, x, levels, eta=-1.0)
    with pytest.raises(ValueError, match="r must"):
        sample_dpmpp_sde(den, x, levels, r=1.5)


def test_specs_declare_names_and_aliases():
    names = {s.name for s in SPECS}
    assert names == {
        "dpmpp_2m",
        "dpmpp_3m",
        "dpmpp_2m_sde",
        "dpmpp_3m_sde",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
    }
    by = {s.name: s for s in SPECS}
    assert by["dpmpp_2m"].aliases["DPM++ 2M Karras"] == "karras"
    assert by["dpmpp_3m_sde"].aliases["DPM++ 3M SDE Exponential"] == "exponential"
    assert by["dpmpp_sde"].stochastic and not by["dpmpp_2m"].stochastic


def test_dpm_solver_sde_scheduler_needs_torchsde():
    pytest.importorskip("torchsde", reason="DPMSolverSDEScheduler needs torchsde (not installed)")
