"""Tests for the variational bound in difflab.diffusion: Gaussian KL, the discretised decoder,
the prior term and bits/dim against analytic answers for Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from difflab.diffusion import (
    LOG2,
    bits_per_dim,
    bits_per_dim_estimate,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    q_sample,
    vlb_from_output,
    vlb_terms,
)
from difflab.parametrization import Denoiser, from_x0_eps
from difflab.schedules import NoiseSchedule

M, S = 0.1, 0.25  # data: N(M, S²) discretised to the 256 bins of 8-bit data in [-1, 1]
GRID = -1 + 2 * np.arange(256) / 255


def bin_probs(m: float, s: float) -> np.ndarray:
    """P(bin k) of N(m, s²): bins x_k ± 1/255, edge bins to ±∞."""
    hi = np.append(GRID[:-1] + 1 / 255, np.inf)
    lo = np.insert(GRID[1:] - 1 / 255, 0, -np.inf)
    return norm.cdf((hi - m) / s) - norm.cdf((lo - m) / s)


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(2))


def sample_data(n: int, d: int, m: float, s: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xc = m + s * torch.randn(n, 1, d, generator=g)
    return ((xc + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def logsnr_schedule(T: int, lam_max: float = 13.8, lam_min: float = -10.0) -> NoiseSchedule:
    """λ linear in t between fixed endpoints: the same ᾱ_0 and ᾱ_{T-1} for every T."""
    lam = torch.linspace(lam_max, lam_min, T, dtype=torch.float64)
    return NoiseSchedule.from_alphas_cumprod(torch.sigmoid(lam))


def gaussian_model(sched: NoiseSchedule, prediction: str, m: float, s: float, bias: float = 0.0):
    """The exact denoiser of continuous N(m, s²) data: E[x0|x_t] = m + αs²/(α²s²+σ²)(x_t-αm)."""

    def model(x_t, t):
        a = sched.alpha(t).view(-1, 1, 1)
        sg = sched.sigma(t).view(-1, 1, 1)
        x0 = m + a * s * s / (a * a * s * s + sg * sg) * (x_t - a * m) + bias
        return from_x0_eps(prediction, x0, (x_t - a * x0) / sg, a, sg)

    return model


def discrete_model(sched: NoiseSchedule, m: float, s: float):
    """The exact denoiser of the *discretised* data: E[x0|x_t] over the bins with P > 1e-15."""
    p = bin_probs(m, s)
    keep = p > 1e-15
    grid = torch.tensor(GRID[keep], dtype=torch.float32)
    logp = torch.tensor(np.log(p[keep]), dtype=torch.float32)

    def model(x_t, t):
        a = sched.alpha(t).view(-1, 1, 1)
        sg = sched.sigma(t).view(-1, 1, 1)
        logits = logp - 0.5 * ((x_t.unsqueeze(-1) - a.unsqueeze(-1) * grid) / sg.unsqueeze(-1)) ** 2
        x0 = (logits.softmax(-1) * grid).sum(-1)
        return (x_t - a * x0) / sg

    return model


# ---------------------------------------------------------------------------- building blocks
def test_normal_kl_matches_closed_form_and_is_zero_for_equal_gaussians():
    m1, v1, m2, v2 = 0.3, 0.5, -0.2, 2.0
    want = math.log(math.sqrt(v2 / v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    got = normal_kl(
        torch.tensor(m1), torch.tensor(math.log(v1)), torch.tensor(m2), torch.tensor(math.log(v2))
    )
    assert float(got) == pytest.approx(want, rel=1e-6)
    same = normal_kl(torch.tensor(1.0), torch.tensor(0.3), torch.tensor(1.0), torch.tensor(0.3))
    assert float(same) == pytest.approx(0.0, abs=1e-7)


def test_discretized_likelihood_matches_scipy_bin_masses():
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (400,), generator=g)
    x = k / 127.5 - 1
    x[:3] = torch.tensor([-1.0, 1.0, 0.0])
    means = torch.randn(400, generator=g) * 0.5
    log_scales = torch.rand(400, generator=g) * 4 - 5  # scales in [e^-5, e^-1]
    got = discretized_gaussian_log_likelihood(x, means, log_scales).double().numpy()
    xs, ms, ss = x.double().numpy(), means.double().numpy(), np.exp(log_scales.double().numpy())
    hi = np.where(xs > 0.999, np.inf, xs + 1 / 255)
    lo = np.where(xs < -0.999, -np.inf, xs - 1 / 255)
    # Φ(hi)-Φ(lo) via survival functions where that is the accurate side
    upper = (lo - ms) > 0
    mass = np.where(
        upper,
        norm.sf((lo - ms) / ss) - norm.sf((hi - ms) / ss),
        norm.cdf((hi - ms) / ss) - norm.cdf((lo - ms) / ss),
    )
    ok = mass > 1e-30
    np.testing.assert_allclose(got[ok], np.log(mass[ok]), rtol=2e-4, atol=2e-5)


def test_discretized_likelihood_sums_to_one_over_bins_and_stays_finite_in_tails():
    x = torch.tensor(GRID, dtype=torch.float32)
    for mean, log_scale in [(0.0, -1.0), (0.7, -3.0), (-0.95, -6.0), (0.0, 2.0)]:
        lp = discretized_gaussian_log_likelihood(x, torch.tensor(mean), torch.tensor(log_scale))
        assert float(lp.double().exp().sum()) == pytest.approx(1.0, abs=1e-5)
    far = discretized_gaussian_log_likelihood(
        torch.tensor([0.5]), torch.tensor([-0.5]), torch.tensor([-7.0])
    )
    assert torch.isfinite(far).all() and float(far) < -1e5  # no 1e-12 floor: true tail mass


def test_prior_bpd_is_closed_form_kl_and_zero_at_zero_terminal_snr():
    sched = NoiseSchedule.linear(100, 1e-4, 0.05)
    x0 = torch.linspace(-1, 1, 10).view(2, 1, 5)
    ab = float(sched.alphas_cumprod[-1])
    kl = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0**2)
    want = kl.mean(dim=(1, 2)) / math.log(2)
    torch.testing.assert_close(prior_bpd(sched, x0), want.float(), rtol=1e-4, atol=1e-9)
    zsnr = sched.rescale_zero_terminal_snr()
    assert torch.equal(prior_bpd(zsnr, x0), torch.zeros(2))


def test_vlb_term_is_zero_kl_for_the_true_posterior_mean_and_matches_manual_kl():
    sched = NoiseSchedule.linear(50, 1e-4, 0.2)
    x0 = sample_data(4, 6, M, S)
    t = torch.tensor([3, 10, 25, 49])
    # a model that returns the true ε recovers x0 exactly: the KL is only the variance mismatch
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    oracle = lambda x_t, tt: noise  # noqa: E731
    got = vlb_terms(oracle, sched, x0, t, noise=noise, variance="fixedsmall")
    assert torch.allclose(got, torch.zeros(4), atol=1e-5)
    # fixedlarge: KL(N(μ, β̃) || N(μ, β)) = ½(log β/β̃ + β̃/β - 1), per dim, in bits
    got = vlb_terms(oracle, sched, x0, t, noise=noise, variance="fixedlarge")
    ab = sched.alphas_cumprod.double()
    abp = sched.alphas_cumprod_prev.double()
    beta = sched.betas.double()
    bt = (1 - abp) / (1 - ab) * beta
    want = 0.5 * (torch.log(beta / bt) + bt / beta - 1) / LOG2
    torch.testing.assert_close(got.double(), want[t], rtol=1e-4, atol=1e-6)


def test_vlb_hybrid_learned_range_extremes_equal_fixed_variances():
    sched = NoiseSchedule.cosine(40)
    x0 = sample_data(3, 5, M, S)
    t = torch.tensor([0, 7, 30])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    eps_model = lambda x_t, tt: 0.9 * noise  # noqa: E731
    for v, fixed in [(-1.0, "fixedsmall"), (1.0, None)]:
        learned = lambda x_t, tt, v=v: torch.cat([0.9 * noise, torch.full_like(noise, v)], 1)  # noqa: E731
        got = vlb_terms(learned, sched, x0, t, noise=noise, variance="learned_range")
        if fixed:
            want = vlb_terms(eps_model, sched, x0, t, noise=noise, variance=fixed)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:  # v = 1 is log β at every t (β_0 at t = 0; improved-diffusion's max_log)
            logb = sched.betas.log().float()
            lv = lambda x_t, tt, logb=logb: torch.cat(  # noqa: E731
                [0.9 * noise, logb[tt.long()].view(-1, 1, 1).expand_as(noise)], 1
            )
            want = vlb_terms(lv, sched, x0, t, noise=noise, variance="learned")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vlb_from_output_mixed_batch_equals_each_sample_alone_with_finite_gradients():
    """A batch mixing t = 0 (decoder NLL) and t > 0 (KL) gives each sample the term it would
    get alone, and the gradient each sample has alone: the term a sample does not use must
    not leak inf·0 = NaN into the batch's gradient. The t > 0 samples predict far off the
    data, where the decoder NLL's gradient overflows (the previous code computed it for the
    whole batch whenever one sample had t = 0, and its gradient was NaN here)."""
    sched = NoiseSchedule.cosine(40)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (4, 2, 3, 3), generator=gen) / 127.5 - 1  # 8-bit data
    t = torch.tensor([0, 9, 0, 39])
    x_t, _ = q_sample(sched, x0, t, torch.randn(x0.shape, generator=gen))
    later = (t > 0).view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=gen) * torch.where(later, 60.0, 0.1)
    logvar = torch.where(later, torch.empty(x0.shape).uniform_(-30, 5, generator=gen), -6.0)
    output = torch.cat([eps, logvar], 1).requires_grad_()
    vb = vlb_from_output(sched, x0, x_t, t, output, variance="learned").vb
    vb.sum().backward()
    alone, grads = [], []
    for i in range(4):
        out_i = output.detach()[i : i + 1].clone().requires_grad_()
        term = vlb_from_output(sched, x0[i : i + 1], x_t[i : i + 1], t[i : i + 1], out_i,
                               variance="learned").vb  # fmt: skip
        term.sum().backward()
        alone.append(term.detach())
        grads.append(out_i.grad)
    torch.testing.assert_close(vb.detach(), torch.cat(alone))
    assert torch.isfinite(torch.cat(grads)).all()  # so the batch's gradient must be too
    torch.testing.assert_close(output.grad, torch.cat(grads))


# ---------------------------------------------------------------------------- bits/dim
def test_bits_per_dim_is_same_for_eps_x0_v_and_denoiser_wrappers():
    sched = logsnr_schedule(30)
    x0 = sample_data(16, 3, M, S)
    res = []
    for pred in ("eps", "x0", "v"):
        model = gaussian_model(sched, pred, M, S)
        res.append(
            bits_per_dim(
                model,
                x0,
                sched,
                prediction=pred,
                generator=torch.Generator().manual_seed(3),
                progress=False,
            )
        )
    wrapped = Denoiser(gaussian_model(sched, "v", M, S), sched, prediction="v")
    res.append(
        bits_per_dim(wrapped, x0, sched, generator=torch.Generator().manual_seed(3), progress=False)
    )
    for r in res[1:]:
        torch.testing.assert_close(r.total, res[0].total, rtol=1e-3, atol=1e-3)
    r = res[0]
    assert r.terms.shape == (16, 30) and r.timesteps == list(range(30))
    torch.testing.assert_close(r.total, r.terms.sum(1) + r.prior)
    # batch_size chunks give the same numbers as one batch (same generator consumption order
    # differs, so compare the noise-free parts: the prior)
    rb = bits_per_dim(
        gaussian_model(sched, "eps", M, S),
        x0,
        sched,
        batch_size=5,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    torch.testing.assert_close(rb.prior, r.prior)
    assert torch.isfinite(rb.total).all()


def test_bits_per_dim_gaussian_denoiser_bounds_discrete_nll_and_gap_shrinks_with_T():
    """Exact E[x0|x_t] of N(M, S²), data discretised: bpd ≥ H(data), gap falls as T grows."""
    x0 = sample_data(128, 4, M, S, seed=0)
    p = bin_probs(M, S)
    H = entropy_bits(p)
    k = ((x0 + 1) * 127.5).round().long()
    sample_nll = torch.tensor(-np.log2(p))[k].mean(dim=(1, 2))  # the data's own NLL, per sample
    assert float(sample_nll.mean()) == pytest.approx(H, abs=0.1)
    gaps = []
    for T in (50, 200, 1000):
        sched = logsnr_schedule(T)
        r = bits_per_dim(
            gaussian_model(sched, "eps", M, S),
            x0,
            sched,
            generator=torch.Generator().manual_seed(T),
            progress=False,
        )
        gap = r.total.double() - sample_nll
        se = float(gap.std() / math.sqrt(len(gap)))
        assert float(gap.mean()) > 3 * se, (T, float(gap.mean()), se)
        assert float(r.total.mean()) > H
        gaps.append(float(gap.mean()))
    assert gaps[0] > gaps[1] + 0.5 > gaps[2] + 0.5 + 0.1, gaps


def test_bits_per_dim_exact_discrete_denoiser_is_tight():
    """With the exact posterior mean of the discretised data the bound closes on H(data)."""
    m, s = 0.1, 0.03
    x0 = sample_data(128, 4, m, s, seed=1)
    p = bin_probs(m, s)
    k = ((x0 + 1) * 127.5).round().long()
    sample_nll = torch.tensor(-np.log2(np.maximum(p, 1e-300)))[k].mean(dim=(1, 2))
    gaps = []
    for T in (25, 100, 400):
        sched = logsnr_schedule(T)
        r = bits_per_dim(
            discrete_model(sched, m, s),
            x0,
            sched,
            generator=torch.Generator().manual_seed(T),
            progress=False,
        )
        gap = r.total.double() - sample_nll
        gaps.append(float(gap.mean()))
        assert float(gap.mean()) > 2 * float(gap.std() / math.sqrt(len(gap)))
    assert gaps[0] > 2 * gaps[1] > 4 * gaps[2], gaps
    assert gaps[2] < 0.5


def test_bits_per_dim_worse_model_scores_worse():
    sched = logsnr_schedule(100)
    x0 = sample_data(64, 4, M, S)
    good = bits_per_dim(
        gaussian_model(sched, "eps", M, S),
        x0,
        sched,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    for model in (
        gaussian_model(sched, "eps", M, S, bias=0.02),
        gaussian_model(sched, "eps", M + 0.2, S * 2),
    ):
        bad = bits_per_dim(
            model, x0, sched, generator=torch.Generator().manual_seed(0), progress=False
        )
        assert bad.mean() > good.mean() + 0.1


def test_vlb_bad_arguments_raise():
    sched = NoiseSchedule.linear(10)
    x0 = torch.zeros(2, 1, 3)
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="choices"):
        vlb_terms(model, sched, x0, 3, prediction="epsilon")
    with pytest.raises(ValueError, match="choices"):
        vlb_terms(model, sched, x0, 3, variance="learnt")
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        vlb_terms(model, sched, x0, 10)
    with pytest.raises(ValueError, match="contradicts"):
        bits_per_dim(Denoiser(model, sched, prediction="x0"), x0, sched, prediction="eps")


def test_bits_per_dim_estimate_records_its_timesteps_and_matches_the_full_bound():
    """An x0-oracle with fixedlarge variance makes every term deterministic (pure variance
    mismatch; the decoder mean is x0 exactly), so the estimate can be checked exactly."""
    sched = NoiseSchedule.linear(40, 1e-4, 0.2)
    x0 = sample_data(8, 3, M, S)
    oracle = lambda x_t, t: x0  # noqa: E731
    kw = dict(prediction="x0", variance="fixedlarge")
    full = bits_per_dim(oracle, x0, sched, progress=False, **kw)
    est = bits_per_dim_estimate(oracle, x0, sched, num_terms=39, **kw)
    assert est.timesteps == list(range(39, 0, -1))
    torch.testing.assert_close(est.total, full.total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(est.decoder, full.terms[:, 0])
    part = bits_per_dim_estimate(
        oracle, x0, sched, num_terms=5, generator=torch.Generator().manual_seed(0), **kw
    )
    assert len(part.timesteps) == 5 == len(set(part.timesteps)) and all(
        1 <= t <= 39 for t in part.timesteps
    )
    want = full.prior + full.terms[:, 0] + full.terms[:, part.timesteps].sum(1) * 39 / 5
    torch.testing.assert_close(part.total, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[1, 39\]"):
        bits_per_dim_estimate(oracle, x0, sched, num_terms=40, **kw)


def test_bits_per_dim_slices_tensor_conditioning_with_its_batch_chunks():
    """A label-conditioned x0-oracle (deterministic bound): chunks of 3 equal one batch."""
    sched = NoiseSchedule.linear(20, 1e-4, 0.3)
    x0 = sample_data(7, 3, M, S)
    labels = torch.arange(7)

    def model(x_t, t, class_labels):
        return x0[class_labels]

    kw = dict(prediction="x0", variance="fixedlarge", cond={"class_labels": labels})
    full = bits_per_dim(model, x0, sched, progress=False, **kw)
    chunked = bits_per_dim(model, x0, sched, batch_size=3, progress=False, **kw)
    torch.testing.assert_close(chunked.total, full.total)
    shuffled = bits_per_dim(
        model, x0, sched, progress=False, **{**kw, "cond": {"class_labels": labels.roll(1)}}
    )
    assert (shuffled.total > full.total + 1).all()  # the wrong label's x0 costs bits
