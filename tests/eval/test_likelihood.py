"""Probability-flow ODE likelihood against closed forms for Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.eval.likelihood import dequantize, ode_likelihood
from difflab.parametrization import Denoiser
from difflab.schedules import NoiseSchedule

MU, S = 0.3, 0.5  # data: x0 ~ N(MU, S² I)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def marginal(schedule: NoiseSchedule, lam: float) -> tuple[float, float]:
    """Mean and std of x_t = α x0 + σ ε at log-SNR λ for Gaussian data."""
    a2 = 1 / (1 + math.exp(-lam))
    return math.sqrt(a2) * MU, math.sqrt(a2 * S**2 + 1 - a2)


def gaussian_logpdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    z = (x.double() - mean) / std
    return (-0.5 * z**2 - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def exact_eps_model(schedule: NoiseSchedule):
    """E[ε | x_t] for Gaussian data: σ (x_t - α MU) / (α² S² + σ²)."""

    def model(x_t, t):
        a = schedule.alpha(t).reshape(-1, *[1] * (x_t.ndim - 1))
        s = schedule.sigma(t).reshape(-1, *[1] * (x_t.ndim - 1))
        return s * (x_t - a * MU) / (a**2 * S**2 + s**2)

    return model


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(1000, beta_start=1e-4, beta_end=0.02)


def test_ode_likelihood_gaussian_data_matches_closed_form(schedule):
    g = torch.Generator().manual_seed(0)
    x = MU + S * torch.randn(3, 1, 2, 2, generator=g)
    res = ode_likelihood(exact_eps_model(schedule), x, schedule, generator=g)
    lam0, lam1 = float(schedule.log_snr(0.0)), float(schedule.log_snr(999.0))
    m0, s0 = marginal(schedule, lam0)
    m1, s1 = marginal(schedule, lam1)
    # the flow maps each quantile of p_start to the same quantile of p_end
    torch.testing.assert_close(res.x_end, m1 + s1 * (x.double() - m0) / s0, atol=2e-4, rtol=0)
    # change of variables is exact with the true end marginal in place of the N(0, I) prior
    exact = gaussian_logpdf(x, m0, s0)
    torch.testing.assert_close(
        res.delta_logp + gaussian_logpdf(res.x_end, m1, s1), exact, atol=2e-3, rtol=0
    )
    # with the N(0, I) prior the error is the (tiny) prior mismatch at ᾱ_T ≈ 4e-5
    torch.testing.assert_close(res.prior_logp, gaussian_logpdf(res.x_end, 0.0, 1.0))
    torch.testing.assert_close(res.log_px, res.prior_logp + res.delta_logp)
    torch.testing.assert_close(res.log_px, exact, atol=1e-2, rtol=0)
    d = 4
    torch.testing.assert_close(res.bpd, -res.log_px / (d * math.log(2)))
    assert not res.discrete and res.nfe > 10


def test_ode_likelihood_same_for_eps_and_v_models(schedule):
    eps_model = exact_eps_model(schedule)

    def v_model(x_t, t):  # v = α ε - σ x0, x0 = (x_t - σ ε)/α  =>  v = (ε - σ x_t)/α
        a = schedule.alpha(t).reshape(-1, 1, 1, 1)
        s = schedule.sigma(t).reshape(-1, 1, 1, 1)
        return (eps_model(x_t, t) - s * x_t) / a

    x = MU + S * torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    a = ode_likelihood(eps_model, x, schedule)
    b = ode_likelihood(Denoiser(v_model, schedule, prediction="v"), x, schedule)
    torch.testing.assert_close(a.log_px, b.log_px, atol=1e-3, rtol=0)


def test_uint8_input_is_dequantised_and_offset_by_7_bits(schedule):
    g = torch.Generator().manual_seed(2)
    k = torch.randint(60, 200, (2, 1, 2, 2), dtype=torch.uint8, generator=g)
    deq = dequantize(k, torch.Generator().manual_seed(5))
    lo = k.double() / 128 - 1
    assert torch.all((deq >= lo) & (deq < lo + 1 / 128))
    model = exact_eps_model(schedule)
    disc = ode_likelihood(model, k, schedule, generator=torch.Generator().manual_seed(5))
    cont = ode_likelihood(model, deq, schedule)  # same dequantised point
    assert disc.discrete
    torch.testing.assert_close(disc.log_px, cont.log_px, atol=1e-6, rtol=0)
    # bin width 2/256 on [-1, 1]: -log P(k) <= -log p(x) + D log2(128) bits
    torch.testing.assert_close(disc.bpd, cont.bpd + 7.0)


def test_hutchinson_probes_are_unbiased_for_a_full_jacobian(schedule):
    # correlated Gaussian data: ε̂ has a full Jacobian, so one probe is noisy but unbiased
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.T / 4 + 0.1 * torch.eye(4, dtype=torch.float64)
    mu = torch.randn(4, generator=g, dtype=torch.float64)

    def model(x_t, t):  # E[ε | x_t] = σ C⁻¹ (x_t - α μ), C = α² Σ + σ² I
        al, si = schedule.alpha(t[:1]).double(), schedule.sigma(t[:1]).double()
        c = al**2 * cov + si**2 * torch.eye(4, dtype=torch.float64)
        r = x_t.double().reshape(-1, 4) - al * mu
        return (si * torch.linalg.solve(c, r.T).T).reshape(x_t.shape).float()

    def logpdf(x, lam):
        al2 = 1 / (1 + math.exp(-lam))
        c = al2 * cov + (1 - al2) * torch.eye(4, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(math.sqrt(al2) * mu, c)
        return dist.log_prob(x.double().reshape(-1, 4))

    n = 200
    x0 = mu + torch.linalg.cholesky(cov) @ torch.randn(4, generator=g, dtype=torch.float64)
    x = x0.float().reshape(1, 1, 2, 2).expand(n, -1, -1, -1).contiguous()
    res = ode_likelihood(model, x, schedule, generator=g, rtol=1e-6, atol=1e-6)
    lam0, lam1 = float(schedule.log_snr(0.0)), float(schedule.log_snr(999.0))
    estimates = res.delta_logp + logpdf(res.x_end, lam1)  # one probe each, (n,)
    assert torch.allclose(res.x_end, res.x_end[:1].expand_as(res.x_end), atol=1e-6)
    exact = float(logpdf(x[:1], lam0))
    assert estimates.std() > 1e-3  # the probes do matter here
    assert abs(float(estimates.mean()) - exact) < 4 * float(estimates.std()) / math.sqrt(n)
