"""Tests for difflab.parametrization: eps / x0 / v / score round trips, the Denoiser wrapper
and the learned-variance split."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.parametrization import (
    PREDICTIONS,
    Denoiser,
    eps_from_score,
    eps_from_v,
    eps_from_x0,
    from_x0_eps,
    score_from_eps,
    split_variance,
    target,
    to_x0_eps,
    v_from,
    x0_from_eps,
    x0_from_v,
)
from difflab.schedules import NoiseSchedule

SCHED = NoiseSchedule.cosine(1000)


def draw(seed: int, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 999), st.integers(0, 2**16))
def test_eps_x0_v_score_round_trips_at_every_t(t, seed):
    x0, eps = draw(seed)
    a, s = SCHED.alpha(t), SCHED.sigma(t)
    x_t = a * x0 + s * eps
    # x0 <-> eps (dividing by α amplifies float32 error by σ/α at high noise)
    tol = 1e-5 * (1 + s / a)
    torch.testing.assert_close(x0_from_eps(x_t, eps, a, s), x0, atol=tol * 10, rtol=0)
    torch.testing.assert_close(
        eps_from_x0(x_t, x0, a, s), eps, atol=1e-5 * (1 + a / s) * 10, rtol=0
    )
    # v
    v = v_from(x0, eps, a, s)
    torch.testing.assert_close(x0_from_v(x_t, v, a, s), x0, atol=5e-6, rtol=0)
    torch.testing.assert_close(eps_from_v(x_t, v, a, s), eps, atol=5e-6, rtol=0)
    # score of q(x_t|x0): -(x_t - α x0)/σ² = -ε/σ
    score = score_from_eps(eps, s)
    x_t64 = a * x0.double() + s * eps.double()  # float64: x_t - αx0 cancels at small σ
    torch.testing.assert_close(score.double(), -(x_t64 - a * x0.double()) / s**2, rtol=1e-5, atol=0)
    torch.testing.assert_close(eps_from_score(score, s), eps, rtol=1e-6, atol=1e-6)
    # every parametrization converts back to the same (x0, eps)
    for pred in PREDICTIONS:
        out = from_x0_eps(pred, x0, eps, a, s)
        torch.testing.assert_close(out, target(pred, x0, eps, a, s))
        x0b, epsb = to_x0_eps(pred, out, x_t, a, s)
        torch.testing.assert_close(x0b, x0, atol=tol * 10, rtol=0)
        torch.testing.assert_close(epsb, eps, atol=1e-5 * (1 + a / s) * 10, rtol=0)


def test_per_sample_coefficients_broadcast_like_scalars():
    x0, eps = draw(0)
    t = torch.tensor([3.0, 400.0, 999.0])
    a, s = SCHED.alpha(t), SCHED.sigma(t)
    x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    v = v_from(x0, eps, a, s)
    for i in range(3):
        ai, si = float(a[i]), float(s[i])
        torch.testing.assert_close(v[i], ai * eps[i] - si * x0[i])
        torch.testing.assert_close(x0_from_v(x_t, v, a, s)[i], x0[i], atol=1e-5, rtol=0)


def test_x0_from_eps_is_finite_at_zero_terminal_snr():
    z = NoiseSchedule.linear(100).rescale_zero_terminal_snr()
    a, s = z.alpha(99), z.sigma(99)
    assert a == 0.0 and s == 1.0
    x0, eps = draw(1)
    assert torch.isfinite(x0_from_eps(eps, eps * 0.9, a, s)).all()
    torch.testing.assert_close(x0_from_v(eps, -x0, a, s), x0)  # v = -x0 at α = 0


def test_denoiser_gives_same_x0_eps_for_each_parametrization():
    x0, eps = draw(2)
    t = torch.tensor([5.0, 250.5, 900.0])
    a, s = SCHED.alpha(t).view(-1, 1, 1, 1), SCHED.sigma(t).view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    for pred in PREDICTIONS:

        def model(x, tt, pred=pred):
            return from_x0_eps(pred, x0, eps, SCHED.alpha(tt), SCHED.sigma(tt))

        out = Denoiser(model, SCHED, prediction=pred)(x_t, t)
        torch.testing.assert_close(out.x0, x0, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.eps, eps, atol=1e-4, rtol=0)


def test_split_variance_and_bad_choices():
    out = torch.randn(2, 6, 4, 4)
    mean, var = split_variance(out, "learned_range")
    assert torch.equal(mean, out[:, :3]) and torch.equal(var, out[:, 3:])
    assert split_variance(out, "fixedsmall") == (out, None)
    with pytest.raises(ValueError, match="2\\*C"):
        split_variance(torch.randn(2, 3, 4, 4), "learned")
    with pytest.raises(ValueError, match="choices: fixedlarge, fixedsmall, learned, learned_range"):
        split_variance(out, "learnt")
    with pytest.raises(ValueError, match="choices: eps, v, x0"):
        target("epsilon", out, out, 1.0, 0.0)
    with pytest.raises(ValueError, match="did you mean 'eps'"):
        Denoiser(lambda x, t: x, SCHED, prediction="epsilon")
    with pytest.raises(ValueError, match="choices"):
        to_x0_eps("sample", out, out, 1.0, 0.0)
