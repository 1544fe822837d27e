"""Tests for difflab.schedules: published beta formulas, diffusers' tables side by side, the
zero-terminal-SNR rescale, spacings, and the continuous-time view."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.schedules import SPACINGS, NoiseSchedule

SCHEDULES = {
    "linear": lambda T: NoiseSchedule.linear(T),
    "scaled_linear": lambda T: NoiseSchedule.scaled_linear(T, 0.00085, 0.012),
    "cosine": lambda T: NoiseSchedule.cosine(T),
    "sigmoid": lambda T: NoiseSchedule.sigmoid(T),
}


# ---------------------------------------------------------------------------- published formulas
def test_linear_betas_equal_ddpm_formula():
    T = 1000
    s = NoiseSchedule.linear(T, 1e-4, 0.02)
    want = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    np.testing.assert_allclose(s.betas.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - np.array(want)), rtol=1e-12)
    assert s.betas.dtype == torch.float64 and s.alphas_cumprod.dtype == torch.float64


def test_scaled_linear_betas_are_linear_in_sqrt_beta():
    T = 1000
    s = NoiseSchedule.scaled_linear(T, 0.00085, 0.012)
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    want = [(a + (b - a) * i / (T - 1)) ** 2 for i in range(T)]
    np.testing.assert_allclose(s.betas.numpy(), want, rtol=1e-12)


def test_cosine_alphas_cumprod_equal_nichol_dhariwal_eq17():
    T, s_ = 1000, 0.008
    s = NoiseSchedule.cosine(T, s=s_)
    f = [math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2 for t in range(T + 1)]
    abar = np.array([f[t + 1] / f[0] for t in range(T)])
    betas = np.minimum(1 - abar / np.concatenate([[1.0], abar[:-1]]), 0.999)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-10)
    unclipped = betas < 0.999
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[unclipped], abar[unclipped], rtol=1e-10)


@pytest.mark.parametrize(
    "name,ours",
    [
        ("linear", "linear"),
        ("scaled_linear", "scaled_linear"),
        ("squaredcos_cap_v2", "cosine"),
        ("sigmoid", "sigmoid"),
    ],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_equal_diffusers_ddpm_scheduler(name, ours, zero_snr):
    T = 1000
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if ours == "scaled_linear" else {}
    ref = DDPMScheduler(
        num_train_timesteps=T, beta_schedule=name, rescale_betas_zero_snr=zero_snr, **kw
    )
    s = NoiseSchedule.from_name(ours, T, **kw)
    if zero_snr:
        s = s.rescale_zero_terminal_snr()
    # diffusers builds in float32 (and rescales from float32 ratios of ᾱ, which costs ~5e-4
    # relative in β; the float64 rescale is checked exactly in the next test)
    # (diffusers 0.42's float32 rescale puts β_0 of the cosine table 3.8e-3 off)
    rtol = 5e-3 if zero_snr else 2e-5
    np.testing.assert_allclose(s.betas.numpy(), ref.betas.double().numpy(), rtol=rtol, atol=1e-8)
    np.testing.assert_allclose(
        s.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(), rtol=5e-5, atol=1e-7
    )


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_zero_snr_rescale_matches_diffusers_and_keeps_first_alpha(name):
    s = SCHEDULES[name](500)
    z = s.rescale_zero_terminal_snr()
    assert float(z.alphas_cumprod[-1]) == 0.0 and z.zero_terminal_snr
    assert float(z.alphas_cumprod[0]) == pytest.approx(float(s.alphas_cumprod[0]), rel=1e-12)
    want = rescale_zero_terminal_snr(s.betas.clone())  # diffusers' function, float64 input
    np.testing.assert_allclose(z.betas.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)
    assert z.log_snr_table[-1] == -math.inf and math.isfinite(float(z.log_snr_table[-2]))
    # config round trip keeps the rescale
    assert NoiseSchedule.from_config(z.to_config()) == z


# ---------------------------------------------------------------------------- spacings
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(
    "T,N,offset",
    [
        (1000, 50, 0),
        (1000, 50, 1),
        (1000, 3, 0),
        (1000, 7, 1),
        (1000, 999, 0),
        (1000, 1000, 0),
        (100, 30, 0),
        (100, 33, 1),
        (37, 5, 0),
        (1000, 20, 1),
        (1000, 250, 1),
        (50, 1, 0),
    ],
)
def test_integer_spacings_equal_diffusers_ddim_set_timesteps(spacing, T, N, offset):
    if spacing != "leading" and offset:
        pytest.skip("diffusers ignores steps_offset outside 'leading'; difflab rejects it")
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(N)
    want = [float(v) for v in ref.timesteps.tolist()]
    got = NoiseSchedule.linear(T).timesteps(N, spacing, steps_offset=offset)
    if spacing == "linspace" and N == 1:
        want = [float(T - 1)]  # diffusers' linspace(0, T-1, 1) = [0]: difflab starts at T-1
    if spacing == "trailing" and len(want) == N + 1:
        # diffusers' np.arange(T, 0, -T/N) can overshoot by one element (float roundoff)
        want = want[:N]
    assert got == want


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("N", [1, 2, 5, 50, 200])
def test_every_spacing_gives_n_strictly_decreasing_timesteps(spacing, zero_snr, N):
    s = NoiseSchedule.scaled_linear(300, 0.00085, 0.012)
    if zero_snr:
        s = s.rescale_zero_terminal_snr()
    ts = s.timesteps(N, spacing)
    assert len(ts) == N
    assert all(0 <= v <= 299 for v in ts)
    assert all(b < a for a, b in zip(ts, ts[1:]))
    levels = s.noise_levels(ts)
    assert len(levels) == N and levels.log_snr[-1] == math.inf


@pytest.mark.parametrize("rho", [7.0, 3.0, -10.0])
def test_karras_spacing_equals_karras_formula(rho):
    s = NoiseSchedule.linear(1000)
    sig = s.sigmas_ve
    smin, smax = float(sig[0]), float(sig[-1])
    N = 12
    ts = s.timesteps(N, "karras", rho=rho)
    got = s.noise_levels(ts).sigma_ve[:-1]
    want = [
        (smax ** (1 / rho) + i / (N - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        for i in range(N)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    ts2 = s.timesteps(N, "karras", rho=rho, sigma_min=0.1, sigma_max=10.0)
    got2 = s.noise_levels(ts2).sigma_ve[:-1]
    assert got2[0] == pytest.approx(10.0, rel=1e-9) and got2[-1] == pytest.approx(0.1, rel=1e-9)


def test_karras_rho_must_be_finite_and_nonzero():
    s = NoiseSchedule.linear(1000)
    for rho in (0.0, math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="rho"):
            s.timesteps(10, "karras", rho=rho)


def test_logsnr_and_exponential_spacings_are_uniform_in_log_snr():
    s = NoiseSchedule.cosine(1000)
    for spacing in ("logsnr", "exponential"):
        lam = s.noise_levels(s.timesteps(9, spacing)).log_snr[:-1]
        np.testing.assert_allclose(np.diff(lam), np.full(8, lam[1] - lam[0]), rtol=1e-8)


def test_custom_timesteps_checked():
    s = NoiseSchedule.linear(100)
    assert s.timesteps(3, [90.0, 40.5, 0.0]) == [90.0, 40.5, 0.0]
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.timesteps(3, [90, 90, 0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.timesteps(3, [10, 20, 30])
    with pytest.raises(ValueError, match=r"outside \[0, 99\]"):
        s.timesteps(2, [100, 0])


# ---------------------------------------------------------------------------- continuous view
def test_alpha_squared_at_integers_equals_alphas_cumprod():
    s = NoiseSchedule.cosine(1000)
    t = torch.arange(1000)
    ab = s.alphas_cumprod
    torch.testing.assert_close(s.alpha(t.float()) ** 2, ab.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.sigma(t.float()) ** 2, (1 - ab).float(), rtol=1e-5, atol=1e-7)
    for i in (0, 17, 500, 999):
        assert s.alpha(i) ** 2 == pytest.approx(float(ab[i]), rel=1e-12)
        assert s.sigma(float(i)) ** 2 == pytest.approx(1 - float(ab[i]), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 998), st.floats(0.0, 1.0))
def test_log_snr_is_linear_between_integers(i, frac):
    s = NoiseSchedule.linear(1000)
    lam = s.log_snr_table
    want = float(lam[i]) + frac * float(lam[i + 1] - lam[i])
    assert s.log_snr(i + frac) == pytest.approx(want, rel=1e-12, abs=1e-12)
    got_t = float(s.log_snr(torch.tensor([i + frac], dtype=torch.float32)))
    assert got_t == pytest.approx(float(s.log_snr(float(torch.tensor(i + frac).float()))), abs=1e-4)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.0, 998.0), st.sampled_from(["linear", "cosine", "zsnr"]))
def test_t_from_log_snr_round_trips(t, name):
    s = {"linear": NoiseSchedule.linear(1000), "cosine": NoiseSchedule.cosine(1000)}.get(name)
    if s is None:  # zero terminal SNR: λ = -∞ at T-1, round trip holds on [0, T-2]
        s = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012).rescale_zero_terminal_snr()
    assert s.t_from_log_snr(s.log_snr(t)) == pytest.approx(t, abs=1e-7)


def test_from_config_round_trip_and_equality():
    for s in (NoiseSchedule.cosine(64), NoiseSchedule.from_betas(torch.linspace(0.01, 0.3, 8))):
        assert NoiseSchedule.from_config(s.to_config()) == s


# ---------------------------------------------------------------------------- bad arguments
def test_bad_schedule_arguments_raise_value_errors_naming_allowed_values():
    with pytest.raises(ValueError, match="cosine.*linear.*scaled_linear.*sigmoid"):
        NoiseSchedule.from_name("cosin", 100)
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        NoiseSchedule.from_name("cosin", 100)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule.from_betas([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule.from_betas([0.1, 1.5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule.from_betas([0.1, float("nan")])
    with pytest.raises(ValueError, match="T"):
        NoiseSchedule.linear(1)
    s = NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match="exceeds the schedule's T=100"):
        s.timesteps(101, "trailing")
    with pytest.raises(ValueError, match="choices: exponential, karras, leading"):
        s.timesteps(10, "uniform")
    with pytest.raises(ValueError, match="positive integer"):
        s.timesteps(0, "leading")
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.timesteps(3, [5, 6, 1])
    with pytest.raises(ValueError, match="steps_offset"):
        s.timesteps(10, "trailing", steps_offset=1)
    with pytest.raises(ValueError, match="choices"):
        s.table("alpha")


def test_zero_snr_last_interval_has_finite_log_snr_and_exact_inverse():
    """On ᾱ_{T-1} = 0 the last interval interpolates α linearly to 0: finite λ, exact inverse."""
    import math

    sched = NoiseSchedule.linear(100).rescale_zero_terminal_snr()
    a_lo = math.sqrt(sched.alphas_cumprod[98].item())
    for t in (98.25, 98.5, 98.9):
        lam = sched.log_snr(t)
        assert math.isfinite(lam)
        assert math.isclose(sched.alpha(t), (99 - t) * a_lo, rel_tol=1e-12)
        assert math.isclose(sched.t_from_log_snr(lam), t, rel_tol=1e-12)
        as_tensor = sched.log_snr(torch.tensor([t], dtype=torch.float32)).item()
        assert math.isclose(as_tensor, lam, rel_tol=1e-4)
    assert sched.log_snr(99.0) == -math.inf


def test_unknown_schedule_options_name_the_allowed_ones():
    with pytest.raises(ValueError, match=r"did you mean 'zero_terminal_snr'"):
        NoiseSchedule.from_config({"name": "linear", "rescale_zero_terminal_snr": True})
    with pytest.raises(ValueError, match=r"option of the 'cosine' schedule 'beta_start'"):
        NoiseSchedule.from_name("cosine", 100, beta_start=1e-4)
    sched = NoiseSchedule.from_config({"name": "linear", "T": 50, "zero_terminal_snr": True})
    assert sched.zero_terminal_snr and sched.num_timesteps == 50
