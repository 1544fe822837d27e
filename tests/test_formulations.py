"""EDM and flow formulations: preconditioning, level sampling, exact conversion to the
sampler contract, and the probability-flow ODE of Gaussian data solved by difflab's samplers."""

from __future__ import annotations

import math

import pytest
import torch

import difflab as dl
from difflab.formulations import (
    EDM,
    Flow,
    FormulationDenoiser,
    formulation_from_config,
    resolution_shift,
    shift_for_resolution,
)

MU, S = 0.3, 0.5  # data N(μ, s²·I)


def _x0_exact_vp(x, alpha, sigma):
    """E[x0 | x] for x = α·x0 + σ·ε, x0 ~ N(μ, s²): μ + α·s²/(α²s² + σ²)·(x - α·μ)."""
    return MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)


def edm_exact_net(edm: EDM):
    """The network F whose preconditioned D is the exact denoiser of N(μ, s²)."""

    def net(x_in, c_noise, **_):
        sigma = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm.precondition(sigma)
        x = x_in / c_in
        d = MU + S**2 / (S**2 + sigma**2) * (x - MU)
        return (d - c_skip * x) / c_out

    return net


def flow_exact_net(time_scale: float = 1000.0):
    """The exact velocity of N(μ, s²): v = -μ + (t - (1-t)s²)/((1-t)²s² + t²)·(x - (1-t)μ)."""

    def net(x, time, **_):
        t = (time / time_scale).reshape(-1, 1, 1, 1).double()
        r2 = (1 - t) ** 2 * S**2 + t**2
        v = -MU + (t - (1 - t) * S**2) / r2 * (x.double() - (1 - t) * MU)
        return v.float()

    return net


# ------------------------------------------------------------------------- EDM
def test_edm_preconditioning_matches_table1_and_diffusers():
    from diffusers import EDMEulerScheduler

    edm = EDM(sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precondition(sigma)
    sd = 0.5
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / torch.sqrt(sd**2 + sigma**2))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + sd**2))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    w = edm.loss_weight(sigma)
    torch.testing.assert_close(w, (sigma**2 + sd**2) / (sigma * sd) ** 2)
    torch.testing.assert_close(w * c_out**2, torch.ones_like(sigma))  # effective weight 1
    ref = EDMEulerScheduler(sigma_data=sd)
    x, f = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    s2 = sigma[:, None]
    torch.testing.assert_close(ref.precondition_inputs(x, s2), c_in[:, None] * x)
    torch.testing.assert_close(ref.precondition_noise(sigma), c_noise)
    torch.testing.assert_close(
        ref.precondition_outputs(x, f, s2), c_skip[:, None] * x + c_out[:, None] * f
    )


def test_edm_lognormal_sigma_statistics():
    edm = EDM(p_mean=-1.2, p_std=1.2)
    sig = edm.draw_levels(200_000, torch.Generator().manual_seed(0))
    ln = sig.double().log()
    assert abs(ln.mean().item() + 1.2) < 0.01
    assert abs(ln.std().item() - 1.2) < 0.01
    assert (sig > 0).all()


def test_edm_loss_with_exact_denoiser_is_the_bayes_error():
    # E[λ(σ)·‖D* - x0‖²] = λ(σ)·Var[x0 | x] = λ(σ)·s²σ²/(s²+σ²) per dimension
    edm = EDM(sigma_data=0.5)
    gen = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(4000, 1, 2, 2, generator=gen)
    sigma = torch.full((4000,), 0.7)
    out = edm.training_loss(edm_exact_net(edm), x0, sigma, torch.randn(x0.shape, generator=gen))
    expect = edm.loss_weight(torch.tensor(0.7)) * S**2 * 0.49 / (S**2 + 0.49)
    assert abs(out.loss.item() / expect.item() - 1) < 0.03


def test_edm_sampling_grid_is_eq5():
    edm = EDM()
    lv = edm.schedule.noise_levels(edm.schedule.timesteps(18, "karras", rho=7.0))
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    ref = [(a + i / 17 * (b - a)) ** 7 for i in range(18)]
    assert lv.sigma_ve[:-1] == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("churn", [0.0, 40.0], ids=["alg1", "alg2-churn"])
def test_edm_heun_is_edm_algorithms_1_and_2(churn):
    """difflab's ``heun`` on EDM's σ grid is Karras et al. 2022 Alg. 1 (deterministic) and,
    with S_churn, Alg. 2 (stochastic; ImageNet's S_tmin, S_tmax, S_noise), same noise draws."""
    edm, n = EDM(), 12
    net = edm_exact_net(edm)
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    smax, smin, rho = 80.0, 0.002, 7.0
    s_tmin, s_tmax, s_noise = 0.05, 50.0, 1.003
    ts = [
        (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        for i in range(n)
    ] + [0.0]

    def d_of(x, s):
        c_skip, c_out, c_in, c_noise = edm.precondition(torch.full((3, 1, 1, 1), s))
        return c_skip * x + c_out * net(c_in * x, c_noise.reshape(-1))

    gen = torch.Generator().manual_seed(9)
    x = z * ts[0]  # Alg. 1/2 line 2
    for i in range(n):
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= ts[i] <= s_tmax else 0.0
        t_hat = ts[i] * (1 + gamma)
        if gamma > 0:  # Alg. 2 lines 5-6
            x = x + math.sqrt(t_hat**2 - ts[i] ** 2) * s_noise * torch.randn(x.shape, generator=gen)
        d = (x - d_of(x, t_hat)) / t_hat
        x_next = x + (ts[i + 1] - t_hat) * d
        if ts[i + 1] != 0:
            d2 = (x_next - d_of(x_next, ts[i + 1])) / ts[i + 1]
            x_next = x + (ts[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    alpha0 = 1 / math.sqrt(1 + smax**2)  # difflab's start state is on the VP scale
    opts = dict(s_churn=churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise) if churn else {}
    out = dl.sample(
        net, noise=z * smax * alpha0, formulation=edm, sampler="heun", steps=n,
        spacing="karras", rho=7.0, max_ratio=math.inf,
        generator=torch.Generator().manual_seed(9), **opts,
    )  # fmt: skip
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- flow
def _sd3_draws(scheme: str, n: int, gen: torch.Generator, m=0.5, s=0.8, scale=1.29):
    """SD3 §3.1 written out (diffusers' compute_density_for_timestep_sampling draws the same)."""
    if scheme == "logit_normal":  # eq. 19: t = sigmoid(m + s·n)
        return torch.sigmoid(torch.normal(m, s, size=(n,), generator=gen))
    u = torch.rand(n, generator=gen)
    if scheme == "mode":  # eq. 20
        return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def test_flow_timestep_sampling_matches_sd3():
    n = 100_000
    for scheme, opts in [
        ("uniform", {}),
        ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.8}),
        ("mode", {"mode_scale": 1.29}),
    ]:
        flow = Flow(timestep_sampling=scheme, **opts)
        t = flow.draw_levels(n, torch.Generator().manual_seed(0))
        r = _sd3_draws(scheme, n, torch.Generator().manual_seed(0))
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-6)  # same draws, same formula
        assert ((t >= 0) & (t <= 1)).all()
    t = Flow(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8).draw_levels(n)
    logit = torch.log(t / (1 - t)).double()
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    # mode: t = f(u) is decreasing with f(0) = 1, f(1) = 0, so P(t <= f(u0)) = 1 - u0
    s = 1.29
    t = Flow(timestep_sampling="mode", mode_scale=s).draw_levels(n)
    for u0 in (0.2, 0.5, 0.8):
        f = 1 - u0 - s * (math.cos(math.pi / 2 * u0) ** 2 - 1 + u0)
        assert abs((t <= f).double().mean().item() - (1 - u0)) < 0.01


def test_resolution_shift_is_sd3_eq23():
    assert shift_for_resolution(1024 * 1024, 256 * 256) == 4.0
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        m_over_n = 16.0
        expect = math.sqrt(m_over_n) * t / (1 + (math.sqrt(m_over_n) - 1) * t)
        assert resolution_shift(t, 4.0) == pytest.approx(expect)
    # diffusers' FlowMatchEulerDiscreteScheduler shifts its sigmas (= flow times) the same way
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    # its grid: u uniform from 1 to its smallest (already shifted) training sigma, then shifted
    u = torch.linspace(1.0, resolution_shift(1 / 1000, 3.0), 10, dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas[:-1].double(), resolution_shift(u, 3.0), rtol=1e-6,
                               atol=1e-6)  # fmt: skip
    flow = Flow(shift=3.0)  # trailing spacing walks the shifted uniform grid
    lv = flow.schedule.noise_levels(flow.schedule.timesteps(4, "trailing"))
    t = [s / (a + s) for a, s in zip(lv.alpha, lv.sigma)]
    assert t == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-9)


def test_flow_state_is_the_scaled_vp_state():
    # x_flow = (1-t)x0 + tε is x_VP·((1-t)+t)... exactly x_VP/√((1-t)²+t²) with λ = 2 log((1-t)/t)
    t = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    lam = Flow().log_snr(t)
    alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    norm = ((1 - t) ** 2 + t**2).sqrt()
    torch.testing.assert_close(alpha, (1 - t) / norm)
    torch.testing.assert_close(sigma, t / norm)
    torch.testing.assert_close(sigma / (alpha + sigma), t)


@pytest.mark.parametrize("form", ["edm", "flow"])
def test_converted_exact_model_gives_exact_x0(form):
    f = EDM() if form == "edm" else Flow()
    net = edm_exact_net(f) if form == "edm" else flow_exact_net()
    den = FormulationDenoiser(net, f)
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    for lam in (-6.0, -1.0, 0.0, 2.0, 7.0):
        a, s = math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))
        out = den.at(x, 0.0, a, s)
        torch.testing.assert_close(out.x0, _x0_exact_vp(x, a, s), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a * out.x0 + s * out.eps, x, rtol=1e-4, atol=1e-5)
    if form == "flow":  # pure noise (t = 1, α = 0): x̂0 = μ, ε̂ = x exactly
        out = den.at(x, 0.0, 0.0, 1.0)
        torch.testing.assert_close(out.x0, torch.full_like(x, MU), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.eps, x)


def _flow_error(sampler: str, steps: int, **opts) -> float:
    z = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    out = dl.sample(flow_exact_net(), noise=z, formulation="flow", sampler=sampler,
                    steps=steps, spacing="trailing", **opts)  # fmt: skip
    return (out - (MU + S * z)).abs().max().item()  # the ODE maps ε at t = 1 to μ + s·ε


@pytest.mark.parametrize("sampler,order", [("flow_euler", 1), ("euler", 1), ("ddim", 1),
                                           ("flow_heun", 2)])  # fmt: skip
def test_flow_pf_ode_converges_at_the_expected_order(sampler, order):
    e1, e2 = _flow_error(sampler, 16), _flow_error(sampler, 32)
    assert e2 < e1
    ratio = math.log2(e1 / e2)
    assert order - 0.3 < ratio < order + 0.5, (e1, e2, ratio)


@pytest.mark.parametrize(
    "sampler", ["heun", "dpmpp_2m", "unipc", "lms", "dpm_2", "plms", "dpmpp_3m_sde"]
)
def test_every_sampler_solves_a_flow_model(sampler):
    # uniform flow times from t = 1 (zero SNR) converge for every solver, not only flow's own
    opts = {"eta": 0.0} if sampler == "dpmpp_3m_sde" else {}
    e10, e80 = _flow_error(sampler, 10, **opts), _flow_error(sampler, 80, **opts)
    assert e80 < 3e-3 and e80 < e10 / 3, (e10, e80)


def test_flow_euler_equals_ddim():
    z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    a = dl.sample(flow_exact_net(), noise=z, formulation="flow", sampler="flow_euler", steps=7)
    b = dl.sample(flow_exact_net(), noise=z, formulation="flow", sampler="ddim", steps=7,
                  spacing="trailing")  # fmt: skip
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flow_euler_matches_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    net, n = flow_exact_net(), 8
    ref = FlowMatchEulerDiscreteScheduler(shift=2.0)
    ref.set_timesteps(n)
    z = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(6))
    x = z.clone()
    for t in ref.timesteps:
        x = ref.step(net(x, t.expand(2)), t, x).prev_sample
    flow = Flow(shift=2.0)  # diffusers' grid: u = linspace(1, shift(1/T), N), then the shift
    u = torch.linspace(1.0, resolution_shift(1 / 1000, 2.0), n, dtype=torch.float64)
    t = resolution_shift(u, 2.0)
    ts = [flow.schedule.t_from_log_snr(float(v)) for v in flow.log_snr(t)]
    out = dl.sample(net, noise=z, formulation=flow, sampler="flow_euler", spacing=ts)
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-5)


def test_formulation_config_errors():
    assert formulation_from_config("ddpm") is None
    assert formulation_from_config("edm", {"sigma_data": 1.0}) == EDM(sigma_data=1.0)
    f = Flow(shift=3.0, timestep_sampling="mode")
    assert formulation_from_config(f.to_config()["name"], f.to_config()) == f
    with pytest.raises(ValueError, match="did you mean 'sigma_data'"):
        formulation_from_config("edm", {"sigma_dat": 1.0})
    with pytest.raises(ValueError, match="unknown diffusion.formulation 'edn'"):
        formulation_from_config("edn")
    with pytest.raises(ValueError, match="timestep_sampling"):
        Flow(timestep_sampling="cosmap")
