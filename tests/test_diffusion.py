"""Tests for difflab.diffusion's forward process and posterior: Monte-Carlo moments against
q(x_t|x0), the posterior against Bayes' rule, and the reverse-variance choices."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion import (
    posterior,
    q_sample,
    q_step_sample,
    reverse_log_variance,
    schedule_posterior,
)
from difflab.schedules import NoiseSchedule

SCHED = NoiseSchedule.linear(200, 1e-4, 0.05)
N = 40_000  # Monte-Carlo samples: tolerances are 5 standard errors (CLT)


def check_moments(x: torch.Tensor, mean: torch.Tensor, var: float) -> None:
    """Sample mean and variance of x [N, D] against the Gaussian's, within 5 standard errors."""
    n = x.shape[0]
    x = x.double()
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt(2 / (n - 1))  # Var of the sample variance of a Gaussian
    assert (x.mean(0) - mean.double()).abs().max() < 5 * se_mean
    assert (x.var(0) - var).abs().max() < 5 * se_var


@pytest.mark.parametrize("t", [0, 37, 199])
def test_q_sample_moments_match_q_xt_given_x0(t):
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0])
    g = torch.Generator().manual_seed(t)
    x_t, noise = q_sample(SCHED, x0.expand(N, 4), torch.full((N,), t), generator=g)
    ab = float(SCHED.alphas_cumprod[t])
    check_moments(x_t, math.sqrt(ab) * x0, 1 - ab)
    # the returned noise is what was used
    torch.testing.assert_close(
        x_t, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise, atol=1e-6, rtol=0
    )


def test_q_sample_accepts_scalar_t_and_given_noise():
    x0 = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))
    a, b = q_sample(SCHED, x0, 50, noise)
    c, _ = q_sample(SCHED, x0, torch.tensor([50, 50, 50]), noise)
    assert b is noise and torch.equal(a, c)


@pytest.mark.parametrize("t", [0, 5, 60])
def test_q_step_sample_chain_matches_q_xt_given_x0(t):
    x0 = torch.tensor([-0.8, 0.2, 0.9])
    g = torch.Generator().manual_seed(100 + t)
    x = x0.expand(N, 3).clone()
    for s in range(t + 1):  # steps 0..t: x_t has ᾱ_t = Π_{s≤t}(1-β_s)
        x = q_step_sample(SCHED, x, torch.full((N,), s), generator=g)
    ab = float(SCHED.alphas_cumprod[t])
    check_moments(x, math.sqrt(ab) * x0, 1 - ab)


def bayes_posterior(abar_t: float, abar_prev: float, x0: float, x_t: float) -> tuple[float, float]:
    """q(x_prev|x_t,x0) ∝ N(x_t; √a·x_prev, 1-a)·N(x_prev; √ᾱ_prev·x0, 1-ᾱ_prev), a = ᾱ_t/ᾱ_prev."""
    a = abar_t / abar_prev
    prec_prior = 1 / (1 - abar_prev) if abar_prev < 1 else math.inf
    prec_lik = a / (1 - a)  # x_t/√a observed with variance (1-a)/a
    if math.isinf(prec_prior):
        return x0, 0.0
    prec = prec_prior + prec_lik
    mean = (prec_prior * math.sqrt(abar_prev) * x0 + prec_lik * x_t / math.sqrt(a)) / prec
    return mean, 1 / prec


@pytest.mark.parametrize("t,prev", [(1, 0), (10, 9), (150, 149), (199, 198), (120, 40), (80, None)])
def test_posterior_matches_product_of_gaussians(t, prev):
    ab = SCHED.alphas_cumprod.double()
    abar_t = float(ab[t])
    abar_prev = float(ab[prev]) if prev is not None else 1.0  # respaced: jump to any level
    post = posterior(
        torch.tensor(abar_t, dtype=torch.float64), torch.tensor(abar_prev, dtype=torch.float64)
    )
    for x0, x_t in [(0.3, -0.7), (-1.0, 1.5), (0.9, 0.1)]:
        mean, var = bayes_posterior(abar_t, abar_prev, x0, x_t)
        got = float(
            post.mean(torch.tensor(x0, dtype=torch.float64), torch.tensor(x_t, dtype=torch.float64))
        )
        assert got == pytest.approx(mean, rel=1e-10, abs=1e-12)
        assert float(post.variance) == pytest.approx(var, rel=1e-10, abs=1e-15)


def test_posterior_mean_in_eps_form():
    """μ̃ = (x_t - β_t/√(1-ᾱ_t)·ε)/√α_t (Ho et al. 2020, eq. 11) with x0 = (x_t-√(1-ᾱ_t)ε)/√ᾱ_t."""
    ab = SCHED.alphas_cumprod.double()
    beta = SCHED.betas.double()
    t = torch.arange(1, 200)
    post = posterior(ab[t], ab[t - 1])
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(199, generator=g, dtype=torch.float64)
    eps = torch.randn(199, generator=g, dtype=torch.float64)
    x0 = (x_t - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
    want = (x_t - beta[t] / (1 - ab[t]).sqrt() * eps) / (1 - beta[t]).sqrt()
    torch.testing.assert_close(post.mean(x0, x_t), want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(post.variance, (1 - ab[t - 1]) / (1 - ab[t]) * beta[t])


def test_schedule_posterior_clips_first_log_variance_and_handles_zero_snr():
    for s in (SCHED, SCHED.rescale_zero_terminal_snr()):
        post = schedule_posterior(s)
        assert post.variance[0] == 0
        var = post.variance
        torch.testing.assert_close(post.log_variance_clipped[1:], var[1:].log())
        assert post.log_variance_clipped[0] == var[1].log()
        assert torch.isfinite(post.log_variance_clipped).all()
        assert torch.isfinite(post.coef_x0).all() and torch.isfinite(post.coef_xt).all()


def test_reverse_log_variance_choices():
    ab = SCHED.alphas_cumprod.double()
    abp = SCHED.alphas_cumprod_prev.double()
    beta = SCHED.betas.double()
    clipped = schedule_posterior(SCHED).log_variance_clipped
    t = torch.tensor([0, 1, 50, 199])
    small = reverse_log_variance("fixedsmall", ab[t], abp[t], clipped_log_small=clipped[t])
    torch.testing.assert_close(small, clipped[t].float())
    large = reverse_log_variance("fixedlarge", ab[t], abp[t], clipped_log_small=clipped[t])
    want = beta[t].log()
    want[0] = clipped[1]  # improved-diffusion: β̃_1 in place of β_0
    torch.testing.assert_close(large, want.float())
    ones = torch.ones(4, 1, 2)
    for v, want_lr in [
        (-1.0, clipped[t]),
        (1.0, beta[t].log()),
        (0.0, (clipped[t] + beta[t].log()) / 2),
    ]:
        lr = reverse_log_variance(
            "learned_range", ab[t], abp[t], v * ones, clipped_log_small=clipped[t]
        )
        torch.testing.assert_close(lr, want_lr.float().view(-1, 1, 1).expand(4, 1, 2))
    learned = reverse_log_variance("learned", ab[t], abp[t], -3 * ones)
    assert torch.equal(learned, -3 * ones)


def test_reverse_log_variance_bad_arguments():
    with pytest.raises(ValueError, match="choices: fixedlarge, fixedsmall, learned, learned_range"):
        reverse_log_variance("small", torch.tensor(0.5), torch.tensor(0.6))
    with pytest.raises(ValueError, match="needs the model's variance output"):
        reverse_log_variance("learned", torch.tensor(0.5), torch.tensor(0.6))
