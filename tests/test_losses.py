"""Tests for difflab.losses: loss weights (finite at SNR = 0 and ∞, min-SNR formula, the
x0-space equivalences), the hybrid objective's stop-gradient, offset noise, input
perturbation and the timestep samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.diffusion import vlb_terms
from difflab.losses import (
    LossSecondMomentSampler,
    UniformSampler,
    loss_weight,
    make_timestep_sampler,
    training_loss,
)
from difflab.parametrization import from_x0_eps
from difflab.schedules import NoiseSchedule

PREDS = ("eps", "x0", "v")
SCHED = NoiseSchedule.linear(100, 1e-4, 0.1)
ZSNR = NoiseSchedule.scaled_linear(100, 0.00085, 0.012).rescale_zero_terminal_snr()


def data(seed: int = 0, shape=(6, 2, 4, 4)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class Net(torch.nn.Module):
    """A tiny conv net honouring model(x_t, t): output channels = out_ch."""

    def __init__(self, ch: int = 2, out_ch: int = 2):
        super().__init__()
        torch.manual_seed(0)  # test-side init only
        self.conv = torch.nn.Conv2d(ch + 1, out_ch, 3, padding=1)

    def forward(self, x, t):
        tt = (t / 100).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:]).to(x.dtype)
        return self.conv(torch.cat([x, tt], 1))


# ---------------------------------------------------------------------------- weights
def test_loss_weights_finite_and_correct_at_snr_zero_and_infinity():
    lam = torch.tensor([-math.inf, math.inf])
    g = 5.0
    want = {  # (weighting, prediction): (at SNR = 0, at SNR = ∞)
        ("none", "eps"): (1, 1),
        ("none", "x0"): (1, 1),
        ("none", "v"): (1, 1),
        ("snr", "eps"): (1, 1),
        ("snr", "v"): (0, 1),
        ("snr", "x0"): (0, math.inf),  # x0-space SNR itself: unbounded, reached by no schedule
        ("min_snr", "eps"): (1, 0),
        ("min_snr", "v"): (0, 0),
        ("min_snr", "x0"): (0, g),
    }
    for (w, p), (at0, atinf) in want.items():
        got = loss_weight(w, p, lam, g).tolist()
        assert got == [at0, atinf], (w, p, got)
        assert not math.isnan(got[0]) and not math.isnan(got[1])


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_equal_hang_et_al_formula(gamma):
    lam = torch.linspace(-12, 12, 97, dtype=torch.float64)
    snr = lam.exp()
    m = torch.minimum(snr, torch.full_like(snr, gamma))
    for pred, want in (("eps", m / snr), ("v", m / (snr + 1)), ("x0", m)):
        got = loss_weight("min_snr", pred, lam.float(), gamma)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        loss_weight("snr", "v", lam.float()).double(), snr / (snr + 1), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        loss_weight("snr", "x0", lam.float()).double(), snr, rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("weighting", ["snr", "min_snr"])
def test_weighted_losses_equal_the_same_x0_space_loss_in_every_parametrization(weighting):
    """A fixed x̂0 scored as eps, x0 or v with a weighting gives one x0-space loss."""
    x0 = data(1)
    t = torch.tensor([0, 5, 20, 50, 80, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    lam = SCHED.log_snr(t.float()).double()
    snr = lam.exp()
    x0_mse = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3)).double()
    want = snr * x0_mse if weighting == "snr" else torch.clamp(snr, max=5.0) * x0_mse
    for pred in PREDS:

        def model(x_t, tt, pred=pred):
            a = SCHED.alpha(tt).view(-1, 1, 1, 1)
            s = SCHED.sigma(tt).view(-1, 1, 1, 1)
            return from_x0_eps(pred, x0_hat, (x_t - a * x0_hat) / s, a, s)

        out = training_loss(
            model, SCHED, x0, prediction=pred, weighting=weighting, t=t, noise=noise
        )
        torch.testing.assert_close(out.per_sample.double(), want, rtol=2e-3, atol=1e-7)


def test_training_loss_matches_manual_targets():
    x0 = data(4)
    t = torch.tensor([0, 10, 30, 60, 90, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    net = Net()
    ab = SCHED.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out = net(x_t, t.float())
    for pred, tgt in (("eps", noise), ("x0", x0), ("v", ab.sqrt() * noise - (1 - ab).sqrt() * x0)):
        res = training_loss(net, SCHED, x0, prediction=pred, t=t, noise=noise)
        want = ((out - tgt) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(res.mse, want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res.loss, want.mean(), rtol=1e-4, atol=1e-6)
        assert res.vlb is None and torch.equal(res.weights, torch.ones(6)) and torch.equal(res.t, t)


@pytest.mark.parametrize("variance", ["fixedsmall", "learned", "learned_range"])
@pytest.mark.parametrize("pred", PREDS)
def test_training_loss_is_finite_for_every_t_on_zero_terminal_snr(variance, pred):
    out_ch = 4 if variance.startswith("learned") else 2
    net = Net(out_ch=out_ch)
    x0 = data(6, (100, 2, 4, 4))
    t = torch.arange(100)
    for weighting in ("none", "snr", "min_snr"):
        res = training_loss(
            net,
            ZSNR,
            x0,
            prediction=pred,
            variance=variance,
            weighting=weighting,
            t=t,
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.isfinite(res.per_sample).all() and torch.isfinite(res.weights).all()
        res.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        net.zero_grad()


def test_training_loss_samples_t_in_range_reproducibly_and_runs_float32_for_bf16_models():
    x0 = data(7, (64, 2, 4, 4))
    net = Net()
    a = training_loss(net, SCHED, x0, generator=torch.Generator().manual_seed(9))
    b = training_loss(net, SCHED, x0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.t, b.t) and torch.equal(a.loss, b.loss)
    assert a.t.dtype == torch.long and 0 <= int(a.t.min()) and int(a.t.max()) <= 99
    bf16 = Net().to(torch.bfloat16)
    res = training_loss(
        bf16, SCHED, x0.to(torch.bfloat16), generator=torch.Generator().manual_seed(9)
    )
    assert res.loss.dtype == torch.float32 and res.mse.dtype == torch.float32
    # per-sample generators: sample i's noise and t equal the same seed alone
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    batch = training_loss(net, SCHED, x0[:3], generator=gens)
    alone = training_loss(net, SCHED, x0[1:2], generator=[torch.Generator().manual_seed(101)])
    assert batch.t[1] == alone.t[0]
    torch.testing.assert_close(batch.per_sample[1:2], alone.per_sample, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- hybrid loss
@pytest.mark.parametrize("variance", ["learned", "learned_range"])
@pytest.mark.parametrize("pred", PREDS)
def test_hybrid_vlb_gradient_is_stopped_through_the_mean(variance, pred):
    x0 = data(8)
    t = torch.tensor([0, 1, 10, 40, 70, 99])
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(6, 4, 4, 4, generator=g) * 0.5
    raw[:, 2:] = raw[:, 2:].clamp(-0.9, 0.9) if variance == "learned_range" else raw[:, 2:] - 5
    out = raw.clone().requires_grad_(True)
    res = training_loss(
        lambda x, tt: out, SCHED, x0, prediction=pred, variance=variance, t=t, generator=g
    )
    (grad_vlb,) = torch.autograd.grad(res.vlb.sum(), out, retain_graph=True)
    assert torch.count_nonzero(grad_vlb[:, :2]) == 0  # mean: stop-gradient
    assert (grad_vlb[:, 2:].abs().sum(dim=(1, 2, 3)) > 0).all()  # variance: trained by L_vlb
    # the total loss's gradient on the mean is the MSE's alone
    (grad_tot,) = torch.autograd.grad(res.loss, out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad((res.weights * res.mse).mean(), out)
    torch.testing.assert_close(grad_tot[:, :2], grad_mse[:, :2])
    # hybrid = L_simple + λ·T·L_t, with L_t the same VLB term diffusion.vlb_terms gives
    torch.testing.assert_close(res.per_sample, res.mse + 0.001 * 100 * res.vlb)


def test_hybrid_vlb_equals_vlb_terms_for_the_same_noise():
    x0 = (data(9) * 127.5).round() / 127.5
    t = torch.tensor([0, 3, 20, 50, 75, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    net = Net(out_ch=4)
    res = training_loss(net, SCHED, x0, variance="learned_range", t=t, noise=noise)
    want = vlb_terms(net, SCHED, x0, t, variance="learned_range", noise=noise)
    torch.testing.assert_close(res.vlb.detach(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- noise tricks
def test_offset_noise_adds_one_constant_per_sample_and_channel_to_the_target():
    x0 = torch.zeros(8, 3, 5, 5)
    seen = {}

    def model(x_t, t):
        seen["x"] = x_t
        return torch.zeros_like(x_t)

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 40)
    res = training_loss(
        model,
        SCHED,
        x0,
        t=t,
        noise=noise,
        offset_noise=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    sigma = float(SCHED.alphas_cumprod[40].neg().add(1).sqrt())
    offset = seen["x"] / sigma - noise  # [B, C, H, W], constant over H, W
    per_bc = offset[:, :, :1, :1]
    torch.testing.assert_close(offset, per_bc.expand_as(offset), atol=1e-5, rtol=0)
    assert per_bc.flatten().std() > 0.2  # differs between samples and channels
    # the eps target carries the offset: a zero model's MSE is E[(ε + offset)²]
    torch.testing.assert_close(
        res.mse, ((noise + per_bc) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5
    )


def test_input_perturbation_perturbs_the_input_not_the_target():
    """A model returning the noise it sees in x_t scores exactly γ²·E[ξ²] ≈ γ²."""
    x0 = data(10, (32, 2, 8, 8))
    t = torch.full((32,), 30)
    ab = float(SCHED.alphas_cumprod[30])

    def oracle(x_t, tt):  # the noise actually in x_t (perturbed)
        return (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)

    g = torch.Generator().manual_seed(0)
    clean = training_loss(oracle, SCHED, x0, t=t, generator=g)
    assert float(clean.loss) < 1e-8
    gamma = 0.1
    res = training_loss(oracle, SCHED, x0, t=t, input_perturbation=gamma, generator=g)
    n = x0.numel()
    assert float(res.loss) == pytest.approx(gamma**2, abs=5 * gamma**2 * math.sqrt(2 / n))


# ---------------------------------------------------------------------------- timestep samplers
def test_uniform_sampler_weights_are_one_and_draws_cover_t():
    s = UniformSampler(50, rng=0)
    t, w = s.sample(5000)
    assert torch.equal(w, torch.ones(5000)) and t.dtype == torch.long
    assert int(t.min()) == 0 and int(t.max()) == 49


def test_loss_second_moment_sampler_probabilities_weights_and_history():
    T = 20
    s = LossSecondMomentSampler(T, rng=np.random.default_rng(0))
    np.testing.assert_allclose(s.probabilities(), np.full(T, 1 / T))  # not warmed up
    c = np.arange(1, T + 1, dtype=np.float64)  # a loss of c_t at every visit (plus junk first)
    for _ in range(5):  # five junk visits that the 10-long history must forget
        s.update(torch.arange(T), torch.full((T,), 1000.0))
    assert not s.warmed_up
    for _ in range(10):
        s.update(torch.arange(T), torch.tensor(c))
    assert s.warmed_up and (s.loss_counts == 10).all()
    p = s.probabilities()
    want = 0.999 * c / c.sum() + 0.001 / T  # √E[L²] = c_t
    np.testing.assert_allclose(p, want, rtol=1e-12)
    t, w = s.sample(20000)
    np.testing.assert_allclose(w.numpy(), 1 / (T * want[t.numpy()]), rtol=1e-6)
    # unbiased: E_p[w_t·L_t] = mean_t L_t exactly
    assert float((p * (1 / (T * p)) * c).sum()) == pytest.approx(c.mean())
    freq = np.bincount(t.numpy(), minlength=T) / 20000
    assert np.abs(freq - want).max() < 5 * np.sqrt(want.max() / 20000)
    # state round trip: identical subsequent draws
    state = s.state_dict()
    a = s.sample(7)[0]
    assert isinstance(make_timestep_sampler("importance", T), LossSecondMomentSampler)
    s2 = make_timestep_sampler("loss_second_moment", T, rng=123)
    s2.load_state_dict(state)
    assert torch.equal(s2.sample(7)[0], a)


def test_training_loss_with_importance_sampler_updates_it_and_weights_the_loss():
    x0 = data(11, (16, 2, 4, 4))
    sampler = LossSecondMomentSampler(100, rng=0)
    res = training_loss(
        Net(), SCHED, x0, timestep_sampler=sampler, generator=torch.Generator().manual_seed(0)
    )
    assert int(sampler.loss_counts.sum()) == 16
    torch.testing.assert_close(res.loss, (res.importance_weights * res.per_sample).mean())


# ---------------------------------------------------------------------------- bad arguments
def test_bad_loss_arguments_raise_value_errors_naming_allowed_values():
    x0 = data(12)
    net = Net()
    with pytest.raises(ValueError, match="choices: min_snr, none, snr"):
        training_loss(net, SCHED, x0, weighting="min-snr")
    with pytest.raises(ValueError, match="choices: eps, v, x0"):
        training_loss(net, SCHED, x0, prediction="epsilon")
    with pytest.raises(ValueError, match="choices: fixedlarge, fixedsmall, learned, learned_range"):
        training_loss(net, SCHED, x0, variance="learned-range")
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        training_loss(net, SCHED, x0, t=torch.full((6,), 100))
    with pytest.raises(ValueError, match="noise shape"):
        training_loss(net, SCHED, x0, noise=torch.zeros(6, 2, 4))
    with pytest.raises(ValueError, match="learned"):
        training_loss(net, SCHED, x0, variance="learned")  # model has C, not 2C, outputs
    with pytest.raises(ValueError, match="snr_gamma"):
        loss_weight("min_snr", "eps", torch.zeros(2), snr_gamma=0.0)
    with pytest.raises(ValueError, match="choices: importance, loss_second_moment, uniform"):
        make_timestep_sampler("importance_sampling", 10)
    with pytest.raises(ValueError, match="T=50"):
        training_loss(net, SCHED, x0, timestep_sampler=UniformSampler(50))


# ---------------------------------------------------------------------- no host reads
@pytest.mark.parametrize("variance", ["fixedsmall", "learned_range"])
@pytest.mark.parametrize("prediction,weighting", [("eps", "none"), ("v", "min_snr"), ("x0", "snr")])
def test_training_loss_never_reads_a_tensor_value_on_the_host(prediction, weighting, variance):
    """One training loss per step must not synchronise with the device (USER_NEEDS 10): on the
    ``meta`` device any value read (``.item()``, ``bool(t)``, ``.any()`` in an ``if``) raises,
    so a whole loss there, hybrid variational-bound term included, proves the loss reads none.
    Timesteps the caller passes are checked on the host (a read by design), so t is drawn."""
    from _tiny_run import tiny_unet

    model = tiny_unet(num_classes=10, learn_sigma=variance != "fixedsmall").to("meta")
    res = training_loss(
        model, NoiseSchedule.cosine(1000), torch.zeros(2, 1, 8, 8, device="meta"),
        prediction=prediction, weighting=weighting, variance=variance,
        cond={"class_labels": torch.tensor([1, 2], device="meta")},
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert res.loss.device.type == "meta" and res.loss.shape == ()
    with pytest.raises((RuntimeError, NotImplementedError)):  # the meta device does refuse reads
        bool((res.per_sample > 0).any())
