"""UniPC side by side with diffusers' UniPCMultistepScheduler (bh1/bh2, with/without UniC)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UniPCMultistepScheduler  # noqa: E402

from difflab.parametrization import Denoiser, from_x0_eps  # noqa: E402
from difflab.samplers.unipc import SPECS, sample_unipc, unipc_coefficients  # noqa: E402
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
    return float((a.double() - b.double()).norm() / b.double().norm())


def _x_T(seed: int = 1, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference(schedule, model, x, steps, order, variant, corrector, prediction, **kw):
    """diffusers' UniPC loop: (final sample, the sample handed to each step, scheduler)."""
    sched = UniPCMultistepScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.numpy(),
        solver_order=order,
        solver_type=variant,
        predict_x0=True,
        prediction_type=PRED[prediction],
        timestep_spacing="trailing",
        disable_corrector=[] if corrector else list(range(steps)),
        **kw,
    )
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()  # float64 tables on both sides
    sched.set_timesteps(steps)
    states = []
    for t in sched.timesteps:
        states.append(x)
        x = sched.step(model(x, t.float().expand(x.shape[0])), t, x).prev_sample
    return x, states, sched


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("corrector", [True, False], ids=["unipc", "unip"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers(order, variant, corrector, prediction):
    """Every visited state agrees.  The final step into σ = 0: diffusers' bh1 computes
    B(h)·0 = ∞·0 = NaN there (its B(h) = h is infinite); difflab returns x̂0."""
    schedule, model = NoiseSchedule.scaled_linear(1000), ToyModel()
    steps = 8
    x_T = _x_T()
    ref, states, sched = _reference(
        schedule, model, x_T.clone(), steps, order, variant, corrector, prediction
    )
    levels = schedule.noise_levels(sched.timesteps.tolist())
    den = Denoiser(model, schedule, prediction)
    seen = []
    out = sample_unipc(
        den,
        x_T.clone(),
        levels,
        order=order,
        variant=variant,
        corrector=corrector,
        callback=lambda i, t, x, x0: seen.append(x),
    )
    assert den.nfe == steps
    assert max(_rel(a, b) for a, b in zip(seen, states)) <= 1e-5
    if variant == "bh2":
        assert _rel(out, ref) <= 1e-5
    else:
        assert torch.isnan(ref).all()
        last = den(seen[-1], levels.t[-1]).x0
        torch.testing.assert_close(out, last, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_order3_without_lower_order_final_to_sigma_min(variant):
    """Full order on the last step too: levels ending at t = 0 (diffusers' sigma_min)."""
    schedule, model = NoiseSchedule.linear(1000), ToyModel()
    steps = 7
    x_T = _x_T()
    ref, _, sched = _reference(
        schedule,
        model,
        x_T.clone(),
        steps,
        3,
        variant,
        True,
        "eps",
        final_sigmas_type="sigma_min",
        lower_order_final=False,
    )
    ts = sched.timesteps.tolist()
    levels = NoiseLevels(
        t=[float(t) for t in ts],
        log_snr=[float(schedule.log_snr(t)) for t in ts] + [float(schedule.log_snr(0))],
    )
    den = Denoiser(model, schedule, "eps")
    out = sample_unipc(den, x_T.clone(), levels, order=3, variant=variant, lower_order_final=False)
    assert _rel(out, ref) <= 1e-5
    lowered = sample_unipc(den, x_T.clone(), levels, order=3, variant=variant)
    assert _rel(lowered, ref) > 1e-5  # the option changes the last steps


def test_corrector_weights_order_conditions_and_bh_invariance():
    """UniC-p solves R_p·ρ = g/B(h) (Zhao et al. eq. 8); R's first row is all ones, so
    Σρ_k = g_1/B(h) with g_1 = (e^{-h} - 1)/(-h) - 1.  The update uses B(h)·ρ only, so for
    p >= 2 bh1 and bh2 give the same corrector; they differ where ρ is fixed (p = 1)."""
    h, rks = 0.3, [-1.2, -2.1]
    for variant in ("bh1", "bh2"):
        _, b_h, rho = unipc_coefficients(h, rks, 3, variant, corrector=True)
        assert abs(sum(rho) - (math.expm1(-h) / -h - 1.0) / b_h) < 1e-12
    _, b1, rho1 = unipc_coefficients(h, rks, 3, "bh1", corrector=True)
    _, b2, rho2 = unipc_coefficients(h, rks, 3, "bh2", corrector=True)
    assert all(abs(b1 * u - b2 * v) < 1e-12 for u, v in zip(rho1, rho2))
    _, b1, rho1 = unipc_coefficients(h, [], 1, "bh1", corrector=True)
    _, b2, rho2 = unipc_coefficients(h, [], 1, "bh2", corrector=True)
    assert rho1 == rho2 == [0.5] and b1 == -h and b2 == math.expm1(-h)


MEAN = torch.tensor([0.5, -1.0, 2.0]).reshape(1, 3, 1, 1).double()
STD = torch.tensor([0.4, 1.0, 0.7]).reshape(1, 3, 1, 1).double()


class GaussianModel:
    """The exact denoiser of x0 ~ N(MEAN, STD²) as an ``x0`` model (float64 inside)."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        tt = float(t[0])
        a, s = self.schedule.alpha(tt), self.schedule.sigma(tt)
        x0 = MEAN + a * STD**2 / (a**2 * STD**2 + s**2) * (x.double() - a * MEAN)
        return from_x0_eps("x0", x0, x0, a, s).to(x.dtype)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2])
def test_corrector_raises_the_convergence_order_on_gaussian_data(order, variant):
    """UniP-p converges with order p, UniPC-p with order p+1 (Zhao et al. Thm 3.3): halving
    the step divides the error by ~2^p vs ~2^(p+1).  Exact PF-ODE state of N(m, s²) data:
    x(λ) = α m + √(α² s² + σ²)·ξ with ξ fixed by x_T."""
    schedule = NoiseSchedule.linear(1000)
    den = Denoiser(GaussianModel(schedule), schedule, "x0")
    x_T = _x_T(shape=(4, 3, 2, 2))
    ratio = {}
    for corrector in (False, True):
        errs = []
        for n in (20, 40):
            ts = schedule.timesteps(n + 1, "logsnr")  # uniform in λ, ends at t = 0 (not clean)
            levels = NoiseLevels(t=ts[:-1], log_snr=[float(schedule.log_snr(t)) for t in ts])
            (a_T, s_T), (a, s) = _vp(levels.log_snr[0]), _vp(levels.log_snr[-1])
            xi = (x_T.double() - a_T * MEAN) / torch.sqrt(a_T**2 * STD**2 + s_T**2)
            exact = a * MEAN + torch.sqrt(a**2 * STD**2 + s**2) * xi
            out = sample_unipc(
                den,
                x_T,
                levels,
                order=order,
                variant=variant,
                corrector=corrector,
                lower_order_final=False,
            )
            errs.append(_rel(out, exact))
        ratio[corrector] = errs[0] / errs[1]
    assert ratio[False] < 1.25 * 2**order
    assert ratio[True] > 1.6 * 2**order


def _vp(log_snr: float) -> tuple[float, float]:
    """(α, σ) at difflab's log-SNR λ = log(α²/σ²)."""
    return math.sqrt(1 / (1 + math.exp(-log_snr))), math.sqrt(1 / (1 + math.exp(log_snr)))


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_zero_terminal_snr_stays_finite(order, variant, prediction):
    schedule = NoiseSchedule.scaled_linear(1000).rescale_zero_terminal_snr()
    levels = schedule.noise_levels(schedule.timesteps(6, "trailing"))
    assert levels.log_snr[0] == -math.inf
    den = Denoiser(ToyModel(), schedule, prediction)
    for lof in (True, False):
        out = sample_unipc(den, _x_T(), levels, order=order, variant=variant, lower_order_final=lof)
        assert torch.isfinite(out).all()


def test_last_step_into_clean_level_is_x0_hat_and_callbacks():
    schedule = NoiseSchedule.linear(1000)
    den = Denoiser(ToyModel(), schedule, "eps")
    x = _x_T()
    x0 = den(x, 999.0).x0
    torch.testing.assert_close(
        sample_unipc(den, x, schedule.noise_levels([999.0]), order=3), x0, rtol=0, atol=0
    )
    levels = schedule.noise_levels(schedule.timesteps(5, "trailing"))
    seen = []
    sample_unipc(den, x, levels, callback=lambda i, t, xt, x0: seen.append((i, t)))
    assert seen == [(i, levels.t[i]) for i in range(5)]


def test_bad_options_raise():
    schedule = NoiseSchedule.linear(100)
    levels = schedule.noise_levels([99.0])
    den = Denoiser(ToyModel(), schedule, "eps")
    with pytest.raises(ValueError, match="order"):
        sample_unipc(den, _x_T(), levels, order=4)
    with pytest.raises(ValueError, match="bh2"):
        sample_unipc(den, _x_T(), levels, variant="bh3")


def test_specs():
    (spec,) = SPECS
    assert spec.name == "unipc" and spec.aliases["UniPC"] is None and spec.nfe(10) == 10
