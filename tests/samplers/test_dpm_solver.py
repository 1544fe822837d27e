"""DPM-Solver (noise prediction): singlestep orders 1-3, DPM-Solver-fast, adaptive.

Known answers: diffusers' DPMSolverSinglestepScheduler(algorithm_type="dpmsolver") run on
a schedule linear in log-SNR, whose integer timesteps then sit exactly at the λ-points of
Lu et al.'s intermediate evaluations; and the exact probability-flow ODE of Gaussian data.
"""

from __future__ import annotations

import math

import pytest
import torch

from difflab.parametrization import Denoiser, from_x0_eps
from difflab.samplers.dpm_solver import (
    SPECS,
    sample_dpm_adaptive,
    sample_dpm_fast,
    sample_dpm_solver,
)
from difflab.schedules import NoiseLevels, NoiseSchedule

PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPE = (2, 3, 4, 4)
T = 1000


class ToyModel:
    """A fixed random linear map of x plus a smooth function of t (any parametrization)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = 0.6 * torch.eye(3) + 0.1 * torch.randn(3, 3, generator=g)
        self.p = torch.randn(3, 4, 4, generator=g)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        t = t.float().reshape(-1, 1, 1, 1)
        return torch.einsum("oc,bchw->bohw", self.w, x) + torch.sin(t / 250.0) * self.p


MEAN = torch.tensor([0.5, -1.0, 2.0]).reshape(1, 3, 1, 1).double()
STD = torch.tensor([0.4, 1.0, 0.7]).reshape(1, 3, 1, 1).double()


class GaussianModel:
    """The exact denoiser of x0 ~ N(MEAN, STD²) (Tweedie), in float64, as an ``eps`` model."""

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps"):
        self.schedule, self.prediction = schedule, prediction

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        tt = float(t[0])
        a, s = self.schedule.alpha(tt), self.schedule.sigma(tt)
        xd = x.double()
        x0 = MEAN + a * STD**2 / (a**2 * STD**2 + s**2) * (xd - a * MEAN)
        eps = (xd - a * x0) / s if s > 0 else torch.zeros_like(xd)
        return from_x0_eps(self.prediction, x0, eps, a, s).to(x.dtype)


def _pf_ode_x0_hat(x_T: torch.Tensor, lam_T: float, lam_end: float) -> torch.Tensor:
    """x̂0 at the exact PF-ODE state at log-SNR ``lam_end`` started from x_T at ``lam_T``.

    For N(m, s²) data the ODE keeps ξ = (x - α m)/√(α² s² + σ²) fixed, so
    x̂0(λ) = m + α s²/√(α² s² + σ²)·ξ (→ m + s·ξ as λ → ∞).
    """
    a_T, s_T = _vp(lam_T)
    xi = (x_T.double() - a_T * MEAN) / torch.sqrt(a_T**2 * STD**2 + s_T**2)
    a, s = _vp(lam_end)
    return MEAN + a * STD**2 / torch.sqrt(a**2 * STD**2 + s**2) * xi


def _vp(log_snr: float) -> tuple[float, float]:
    """(α, σ) at difflab's log-SNR λ = log(α²/σ²)."""
    return math.sqrt(1 / (1 + math.exp(-log_snr))), math.sqrt(1 / (1 + math.exp(log_snr)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _x_T(seed: int = 1, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _lambda_linear_schedule() -> NoiseSchedule:
    lam = torch.linspace(9.0, -9.0, T, dtype=torch.float64)
    return NoiseSchedule.from_alphas_cumprod(torch.sigmoid(lam))


def _singlestep_reference(schedule, model, x, outer, order, prediction, solver_types):
    """diffusers' singlestep 'dpmsolver' on the grid that puts its stages at Lu's λ-points.

    ``outer`` are difflab's levels (the last step goes to t = 0, diffusers' ``sigma_min``);
    each outer interval is cut into ``order`` equal pieces of t (= of λ, on this schedule).
    ``solver_types[k]`` is the diffusers ``solver_type`` used for its order-k stages.
    """
    pytest.importorskip("diffusers")
    from diffusers import DPMSolverSinglestepScheduler

    ends = [*outer, 0]
    grid = [a - j * (a - b) // order for a, b in zip(ends[:-1], ends[1:]) for j in range(order)]
    sched = DPMSolverSinglestepScheduler(
        num_train_timesteps=T,
        trained_betas=schedule.betas.numpy(),
        algorithm_type="dpmsolver",
        solver_order=order,
        prediction_type=PRED[prediction],
        final_sigmas_type="sigma_min",
        lower_order_final=False,
    )
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()  # float64: no float32 cumprod drift
    sched.set_timesteps(timesteps=grid)
    assert sched.order_list == list(range(1, order + 1)) * len(outer)
    for k, t in enumerate(sched.timesteps):
        stage = sched.order_list[k]
        if stage > 1:
            sched.register_to_config(solver_type=solver_types[stage])
        out = model(x, t.float().expand(x.shape[0]))
        x = sched.step(out, t, x).prev_sample
    return x


def _levels_to_t0(schedule: NoiseSchedule, outer: list[int]) -> NoiseLevels:
    """Levels at ``outer`` ending at the schedule's t = 0 level (not clean): diffusers'
    ``final_sigmas_type="sigma_min"``, which its noise-prediction solver requires."""
    lams = [float(schedule.log_snr(t)) for t in outer] + [float(schedule.log_snr(0))]
    return NoiseLevels(t=[float(t) for t in outer], log_snr=lams)


OUTER = [960, 720, 480, 240]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_matches_diffusers_singlestep(order, prediction):
    schedule, model = _lambda_linear_schedule(), ToyModel()
    x_T = _x_T()
    ref = _singlestep_reference(
        schedule, model, x_T.clone(), OUTER, order, prediction, {2: "midpoint"}
    )
    den = Denoiser(model, schedule, prediction)
    out = sample_dpm_solver(den, x_T.clone(), _levels_to_t0(schedule, OUTER), order=order)
    assert _rel(out, ref) <= 1e-5
    assert den.nfe == order * len(OUTER)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_3_is_heun_stage_then_midpoint_stage_of_diffusers(prediction):
    """Lu et al. Alg. 2 (and k-diffusion): u2 by the φ-weighted ("heun") second-order formula,
    x_t by the "midpoint"-type third-order one.  diffusers uses one solver_type for both
    stages, so neither of its variants equals DPM-Solver-3; mixing them does."""
    schedule, model = _lambda_linear_schedule(), ToyModel()
    outer = [960, 600, 240]
    x_T = _x_T()
    den = Denoiser(model, schedule, prediction)
    out = sample_dpm_solver(den, x_T.clone(), _levels_to_t0(schedule, outer), order=3)
    refs = {
        kind: _singlestep_reference(schedule, model, x_T.clone(), outer, 3, prediction, types)
        for kind, types in {
            "mixed": {2: "heun", 3: "midpoint"},
            "midpoint": {2: "midpoint", 3: "midpoint"},
            "heun": {2: "heun", 3: "heun"},
        }.items()
    }
    assert _rel(out, refs["mixed"]) <= 1e-5
    assert _rel(out, refs["midpoint"]) > 1e-4
    assert _rel(out, refs["heun"]) > 1e-4


def test_dpm_solver_orders_converge_on_gaussian_data():
    schedule = NoiseSchedule.linear(T)
    den = Denoiser(GaussianModel(schedule), schedule, "eps")
    x_T = _x_T(shape=(4, 3, 2, 2))
    lam_0, lam_end = float(schedule.log_snr(999)), float(schedule.log_snr(0))
    exact = _pf_ode_x0_hat(x_T, lam_0, lam_end)
    errs = {}
    for order in (1, 2, 3):
        for n in (4, 8):
            ts = schedule.timesteps(n + 1, "logsnr")  # uniform in λ from t=999 to t=0
            levels = NoiseLevels(t=ts[:-1], log_snr=[float(schedule.log_snr(t)) for t in ts])
            x = sample_dpm_solver(den, x_T, levels, order=order)
            x0_hat = GaussianModel(schedule, "x0")(x, torch.zeros(4)).double()
            errs[order, n] = _rel(x0_hat, exact)
    assert errs[3, 8] < errs[2, 8] < errs[1, 8]
    assert errs[1, 4] / errs[1, 8] > 1.6  # ~2: first order
    assert errs[2, 4] / errs[2, 8] > 3.0  # ~4: second order
    assert errs[3, 4] / errs[3, 8] > 5.0  # ~8: third order


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_reaches_tolerance_on_exact_gaussian(order):
    schedule = NoiseSchedule.linear(T)
    den = Denoiser(GaussianModel(schedule), schedule, "eps")
    x_T = _x_T(shape=(4, 3, 2, 2))
    levels = schedule.noise_levels(schedule.timesteps(10, "trailing"))
    lam_0, lam_end = levels.log_snr[0], float(schedule.log_snr(0))
    exact = _pf_ode_x0_hat(x_T, lam_0, lam_end)
    results = {}
    for tol in (1e-2, 1e-4):
        stats: dict = {}
        nfe0 = den.nfe
        out = sample_dpm_adaptive(den, x_T, levels, order=order, rtol=tol, atol=tol, stats=stats)
        assert stats["nfe"] == den.nfe - nfe0
        assert stats["n_accept"] >= 1
        results[tol] = (_rel(out, exact), stats["nfe"])
    assert results[1e-4][0] < 2e-3
    assert results[1e-4][0] < results[1e-2][0]
    assert results[1e-4][1] > results[1e-2][1]


def test_dpm_fast_uses_its_budget_and_converges_to_the_ode_solution():
    schedule = NoiseSchedule.linear(T)
    den = Denoiser(GaussianModel(schedule), schedule, "eps")
    x_T = _x_T(shape=(4, 3, 2, 2))
    seen: list[int] = []
    errs = {}
    for n in (15, 30):
        levels = schedule.noise_levels(schedule.timesteps(n, "trailing"))
        exact = _pf_ode_x0_hat(x_T, levels.log_snr[0], float(schedule.log_snr(0)))
        nfe0 = den.nfe
        seen.clear()
        out = sample_dpm_fast(den, x_T, levels, callback=lambda i, t, x, x0: seen.append(i))
        assert den.nfe - nfe0 == n  # N steps = N model calls
        assert seen == list(range((n - 1) // 3 + 2))  # M = ⌊(N-1)/3⌋+1 steps + x̂0
        errs[n] = _rel(out, exact)
    assert errs[30] < 2e-3
    assert errs[15] / errs[30] > 6.0  # third order: ~8 for half the step


def test_dpm_fast_with_eta_samples_the_data_distribution():
    """η = 1 (A1111's default for "DPM fast"): the ancestral chain still samples N(m, s²)."""
    schedule = NoiseSchedule.linear(T)
    den = Denoiser(GaussianModel(schedule), schedule, "eps")
    x_T = _x_T(shape=(4000, 3, 1, 1))
    levels = schedule.noise_levels(schedule.timesteps(30, "trailing"))
    g = torch.Generator().manual_seed(0)
    out = sample_dpm_fast(den, x_T, levels, eta=1.0, generator=g).double()
    ode = sample_dpm_fast(den, x_T, levels).double()
    assert (out - ode).abs().mean() > 0.05  # noise was injected
    mean, std = out.mean((0, 2, 3)), out.std((0, 2, 3))
    assert torch.allclose(mean, MEAN.flatten(), atol=0.05)
    assert torch.allclose(std, STD.flatten(), rtol=0.06)


def test_eta_noise_is_per_sample():
    schedule = NoiseSchedule.linear(T)
    levels = schedule.noise_levels(schedule.timesteps(7, "trailing"))
    den = Denoiser(ToyModel(), schedule, "eps")
    x = _x_T()
    batch = sample_dpm_fast(
        den, x, levels, eta=1.0, generator=[torch.Generator().manual_seed(s) for s in (3, 4)]
    )
    for j, seed in enumerate((3, 4)):
        one = sample_dpm_fast(
            den, x[j : j + 1], levels, eta=1.0, generator=[torch.Generator().manual_seed(seed)]
        )
        torch.testing.assert_close(batch[j : j + 1], one, rtol=1e-5, atol=1e-6)


def test_final_step_into_clean_level_is_x0_hat():
    schedule = NoiseSchedule.linear(T)
    den = Denoiser(ToyModel(), schedule, "eps")
    x = _x_T()
    levels = schedule.noise_levels([999.0])
    x0 = den(x, 999.0).x0
    for order in (1, 2, 3):
        torch.testing.assert_close(sample_dpm_solver(den, x, levels, order=order), x0)


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_zero_terminal_snr_stays_finite(prediction):
    schedule = NoiseSchedule.scaled_linear(T).rescale_zero_terminal_snr()
    levels = schedule.noise_levels(schedule.timesteps(6, "trailing"))
    assert levels.log_snr[0] == -math.inf
    den = Denoiser(ToyModel(), schedule, prediction)
    x = _x_T()
    outs = [sample_dpm_solver(den, x, levels, order=k) for k in (1, 2, 3)]
    outs += [sample_dpm_fast(den, x, levels), sample_dpm_adaptive(den, x, levels)]
    gen = torch.Generator().manual_seed(0)
    outs += [
        sample_dpm_fast(den, x, levels, eta=1.0, generator=gen),
        sample_dpm_adaptive(den, x, levels, eta=1.0, generator=gen),
    ]
    for out in outs:
        assert torch.isfinite(out).all()
    one = schedule.noise_levels([999.0])
    assert torch.isfinite(sample_dpm_adaptive(den, x, one)).all()
    assert torch.isfinite(sample_dpm_fast(den, x, one)).all()


def test_bad_options_raise():
    schedule = NoiseSchedule.linear(100)
    levels = schedule.noise_levels([99.0, 50.0])
    den = Denoiser(ToyModel(), schedule, "eps")
    x = _x_T()
    with pytest.raises(ValueError, match="order"):
        sample_dpm_solver(den, x, levels, order=4)
    with pytest.raises(ValueError, match="order"):
        sample_dpm_adaptive(den, x, levels, order=1)
    with pytest.raises(ValueError, match="rtol"):
        sample_dpm_adaptive(den, x, levels, rtol=0.0)
    with pytest.raises(ValueError, match="eta"):
        sample_dpm_fast(den, x, levels, eta=-0.5)
    with pytest.raises(ValueError, match="accept_safety"):
        sample_dpm_adaptive(den, x, levels, accept_safety=2.0)


def test_specs():
    by = {s.name: s for s in SPECS}
    assert set(by) == {"dpm_solver", "dpm_fast", "dpm_adaptive"}
    assert by["dpm_fast"].aliases["DPM fast"] is None
    assert by["dpm_solver"].nfe(10) == 19
    assert by["dpm_adaptive"].nfe(10) == -1


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_adaptive_callback_fires_once_per_accepted_step(eta):
    """A rejected trial re-uses the evaluation at its start point and must not report it
    again: the callback runs once per accepted step (at its start state) plus once for the
    final x̂0 evaluation, numbered 0, 1, ... with strictly decreasing t.  h_init = 5 forces
    rejections (4 with η = 0 on this setup), so a re-report would show up as an extra call
    and a repeated t."""
    schedule = NoiseSchedule.linear(T)
    den = Denoiser(GaussianModel(schedule), schedule, "eps")
    levels = schedule.noise_levels(schedule.timesteps(10, "trailing"))
    seen: list[tuple[int, float, torch.Tensor]] = []
    stats: dict = {}
    out = sample_dpm_adaptive(
        den,
        _x_T(shape=(4, 3, 2, 2)),
        levels,
        h_init=5.0,
        eta=eta,
        generator=torch.Generator().manual_seed(0),
        stats=stats,
        callback=lambda i, t, x, x0: seen.append((i, t, x0)),
    )
    assert stats["n_reject"] >= 2
    assert len(seen) == stats["n_accept"] + 1
    assert [i for i, _, _ in seen] == list(range(len(seen)))
    ts = [t for _, t, _ in seen]
    assert all(a > b for a, b in zip(ts, ts[1:])) and ts[0] == levels.t[0] and ts[-1] == 0.0
    assert torch.equal(seen[-1][2], out)  # the last report is the returned x̂0
