"""Guidance wrappers (CFG, rescale, thresholding) and img2img's explicit strength."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from difflab.parametrization import Denoiser, x0_from_v
from difflab.samplers import (
    SAMPLERS,
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClipX0,
    DynamicThresholding,
    InpaintX0,
    dynamic_threshold,
    img2img,
    rescale_cfg,
    sample,
)
from difflab.schedules import NoiseSchedule

SCHED = NoiseSchedule.linear(1000)


class CondModel:
    """A conditional toy model whose output depends nonlinearly on x, t, class and context."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, class_labels=None, context=None):
        self.batches.append(x.shape[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        out = torch.tanh(x) * (1 + t.reshape(shape) / 1000)
        if class_labels is not None:
            out = out + 0.3 * class_labels.float().reshape(shape) * x.pow(2)
        if context is not None:
            out = out + context.mean(dim=(1, 2)).reshape(shape)
        return out


def _x(seed=0, shape=(3, 2, 4, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


COND = {"class_labels": torch.tensor([1, 2, 3])}
UNCOND = {"class_labels": torch.tensor([0, 0, 0])}


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cfg_scale_0_is_exactly_uncond_and_1_exactly_cond(prediction):
    den = Denoiser(CondModel(), SCHED, prediction)
    x, a, s = _x(), SCHED.alpha(500.0), SCHED.sigma(500.0)
    for w, ref_cond in ((0.0, UNCOND), (1.0, COND)):
        got = ClassifierFreeGuidance(den, w, UNCOND).at(x, 500.0, a, s, **COND)
        ref = den.at(x, 500.0, a, s, **ref_cond)
        assert torch.equal(got.x0, ref.x0) and torch.equal(got.eps, ref.eps)


def test_cfg_is_one_batched_call_equal_to_two_separate_calls():
    model = CondModel()
    den = Denoiser(model, SCHED)
    x, a, s = _x(), SCHED.alpha(300.0), SCHED.sigma(300.0)
    cfg = ClassifierFreeGuidance(den, 4.0, UNCOND)
    got = cfg.at(x, 300.0, a, s, **COND)
    assert model.batches == [6] and den.nfe == 1  # one forward over the doubled batch
    c, u = den.at(x, 300.0, a, s, **COND), den.at(x, 300.0, a, s, **UNCOND)
    torch.testing.assert_close(got.eps, u.eps + 4.0 * (c.eps - u.eps), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.x0, u.x0 + 4.0 * (c.x0 - u.x0), rtol=1e-6, atol=1e-6)
    # x̂0 and ε̂ stay consistent: x_t = α x̂0 + σ ε̂
    torch.testing.assert_close(a * got.x0 + s * got.eps, x, rtol=1e-5, atol=1e-5)


def test_cfg_batches_context_tensors_and_broadcasts_a_single_negative_prompt():
    model = CondModel()
    den = Denoiser(model, SCHED)
    x = _x()
    ctx = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(2))
    got = ClassifierFreeGuidance(den, 2.5, {"context": neg})(x, 100.0, context=ctx)
    assert model.batches == [6]
    c, u = den(x, 100.0, context=ctx), den(x, 100.0, context=neg.expand(3, 5, 8))
    torch.testing.assert_close(got.eps, u.eps + 2.5 * (c.eps - u.eps), rtol=1e-6, atol=1e-6)


def test_cfg_with_unbatchable_conds_falls_back_to_two_calls():
    model = CondModel()
    den = Denoiser(model, SCHED)
    x = _x()
    got = ClassifierFreeGuidance(den, 3.0, {})(x, 100.0, **COND)  # uncond: no kwargs at all
    assert model.batches == [3, 3]
    c, u = den(x, 100.0, **COND), den(x, 100.0)
    torch.testing.assert_close(got.eps, u.eps + 3.0 * (c.eps - u.eps), rtol=1e-6, atol=1e-6)


def test_rescale_matches_diffusers_rescale_noise_cfg():
    g = torch.Generator().manual_seed(3)
    cfg, cond = torch.randn(4, 3, 8, 8, generator=g) * 3, torch.randn(4, 3, 8, 8, generator=g)
    for phi in (0.0, 0.7, 1.0):
        torch.testing.assert_close(rescale_cfg(cfg, cond, phi), rescale_noise_cfg(cfg, cond, phi))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cfg_rescale_acts_on_the_model_output_like_diffusers(prediction):
    den = Denoiser(CondModel(), SCHED, prediction)
    x, t = _x(), 700.0
    a, s = SCHED.alpha(t), SCHED.sigma(t)
    got = ClassifierFreeGuidance(den, 7.5, UNCOND, rescale=0.7).at(x, t, a, s, **COND)
    model = CondModel()
    tt = torch.full((3,), t)
    out_c, out_u = model(x, tt, **COND), model(x, tt, **UNCOND)
    guided = rescale_noise_cfg(out_u + 7.5 * (out_c - out_u), out_c, guidance_rescale=0.7)
    if prediction == "eps":
        torch.testing.assert_close(got.eps, guided, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.x0, x0_from_v(x, guided, a, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.9, 0.995])
def test_dynamic_threshold_equals_imagen_formula_and_diffusers(p):
    x0 = _x(4) * 2.0
    x0[0] *= 0.3  # a sample whose percentile is below 1: s = 1, plain clipping
    got = dynamic_threshold(x0, p)
    flat = x0.abs().reshape(3, -1).numpy()
    for i in range(3):
        s_i = max(np.quantile(flat[i], p), 1.0)  # numpy's default is linear interpolation
        ref = np.clip(x0[i].numpy(), -s_i, s_i) / s_i
        np.testing.assert_allclose(got[i].numpy(), ref, rtol=1e-6, atol=1e-6)
    ddpm = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=1e9)
    torch.testing.assert_close(got, ddpm._threshold_sample(x0))


@pytest.mark.parametrize(
    "wrap", [lambda d: DynamicThresholding(d, 0.9), lambda d: ClipX0(d, 1.0)], ids=["dyn", "clip"]
)
def test_thresholding_wrappers_recompute_eps_consistently(wrap):
    den = Denoiser(lambda x, t: -3 * x, SCHED)  # a model whose x̂0 leaves [-1, 1]
    x, a, s = _x(5), SCHED.alpha(200.0), SCHED.sigma(200.0)
    out = wrap(den).at(x, 200.0, a, s)
    assert out.x0.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(a * out.x0 + s * out.eps, x, rtol=1e-5, atol=1e-5)


def test_sample_with_guidance_scale_0_equals_unconditional_sampling():
    noise = _x(6)
    kw = dict(schedule=SCHED, sampler="dpmpp_2m", steps=6, noise=noise)
    guided = sample(CondModel(), cond=COND, uncond=UNCOND, guidance_scale=0.0, **kw)
    plain = sample(CondModel(), cond=UNCOND, **kw)
    assert torch.equal(guided, plain)
    model = CondModel()
    sample(model, cond=COND, uncond=UNCOND, guidance_scale=5.0, guidance_rescale=0.5, **kw)
    assert model.batches == [6] * 6


def test_sample_thresholding_options():
    kw = dict(schedule=SCHED, sampler="ddim", steps=5, noise=_x(7))
    model = lambda x, t: -3 * x  # noqa: E731
    seen = []
    out = sample(model, clip_x0=True, callback=lambda i, t, x, x0: seen.append(x0), **kw)
    assert all(x0.abs().max() <= 1 + 1e-6 for x0 in seen) and out.abs().max() <= 1 + 1e-5
    sample(model, dynamic_threshold=0.995, **kw)
    with pytest.raises(ValueError, match="either dynamic_threshold or clip_x0"):
        sample(model, dynamic_threshold=0.995, clip_x0=True, **kw)


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.5), (10, 0.3), (50, 0.75), (20, 1.0)])
def test_img2img_uses_diffusers_starting_step_and_noises_to_that_level(steps, strength):
    x0 = _x(8).clamp(-1, 1)
    noise = _x(9)
    seen = []
    res = img2img(
        lambda x, t: 0.1 * x,
        x0,
        strength=strength,
        schedule=SCHED,
        sampler="ddim",
        steps=steps,
        spacing="trailing",
        noise=noise,
        callback=lambda i, t, x, x0_: seen.append((t, x)),
    )
    # diffusers' StableDiffusionImg2ImgPipeline.get_timesteps on the same trailing grid
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    init = min(int(steps * strength), steps)
    assert res.timesteps == [float(t) for t in ref.timesteps[steps - init :]]
    assert [t for t, _ in seen] == res.timesteps
    # the start state is q_sample at the first used timestep: same level as the first step
    t0 = res.timesteps[0]
    start = SCHED.alpha(t0) * x0 + SCHED.sigma(t0) * noise
    torch.testing.assert_close(seen[0][1], start, rtol=1e-6, atol=1e-6)
    assert res.images.shape == x0.shape


def test_img2img_rejects_a_strength_without_steps():
    with pytest.raises(ValueError, match="no denoising step"):
        img2img(lambda x, t: x, _x(), strength=0.04, schedule=SCHED, steps=20)
    with pytest.raises(ValueError, match="strength must lie in"):
        img2img(lambda x, t: x, _x(), strength=1.5, schedule=SCHED)


# ---------------------------------------------------------------------- guidance interval
def test_guidance_interval_guides_inside_and_is_the_conditional_call_outside():
    """Kynkäänniemi et al. 2024: CFG only for σ_lo < σ/α <= σ_hi; outside, the conditional
    prediction from one un-batched call (no unconditional forward is spent there)."""
    model = CondModel()
    den = Denoiser(model, SCHED, "eps")
    x = _x()
    plain = ClassifierFreeGuidance(den, 3.0, UNCOND)
    for t in (50.0, 300.0, 900.0):
        a, s = SCHED.alpha(t), SCHED.sigma(t)
        level = s / a
        cases = [(0.0, level, True), (level, 1e9, False), (level / 2, level * 2, True),
                 (level * 2, float("inf"), False), (0.0, level / 2, False)]  # fmt: skip
        for lo, hi, inside in cases:  # σ_lo exclusive, σ_hi inclusive
            model.batches.clear()
            got = ClassifierFreeGuidance(den, 3.0, UNCOND, interval=(lo, hi)).at(x, t, a, s, **COND)
            ref = plain.at(x, t, a, s, **COND) if inside else den.at(x, t, a, s, **COND)
            assert torch.equal(got.x0, ref.x0) and torch.equal(got.eps, ref.eps), (t, lo, hi)
            assert model.batches[0] == (6 if inside else 3)


def test_guidance_interval_with_per_sample_levels_guides_each_sample_by_its_own_level():
    den = Denoiser(CondModel(), SCHED, "eps")
    x = _x()
    t = torch.tensor([20.0, 400.0, 950.0])
    a, s = den.coefficients(t, x)
    interval = (float(s[1] / a[1]) * 0.9, float(s[1] / a[1]) * 1.1)  # only sample 1 inside
    got = ClassifierFreeGuidance(den, 3.0, UNCOND, interval=interval).at(x, t, a, s, **COND)
    guided = ClassifierFreeGuidance(den, 3.0, UNCOND).at(x, t, a, s, **COND)
    cond = den.at(x, t, a, s, **COND)
    for i, want in enumerate((cond, guided, cond)):
        torch.testing.assert_close(got.x0[i], want.x0[i], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.eps[i], want.eps[i], rtol=1e-6, atol=1e-6)


def test_sampling_with_a_guidance_interval_guides_exactly_the_steps_inside_it():
    model = CondModel()
    kw = dict(schedule=SCHED, sampler="euler", steps=10, spacing="karras", guidance_scale=2.5,
              cond=COND, uncond=UNCOND, noise=_x(1), clip_x0=True)  # fmt: skip
    everywhere = sample(model, **kw)
    assert torch.equal(sample(model, guidance_interval=(0.0, float("inf")), **kw), everywhere)
    levels = SCHED.noise_levels(SCHED.timesteps(10, "karras"))
    ve = [math.exp(-lam / 2) for lam in levels.log_snr[:-1]]  # σ/α of each step
    lo, hi = sorted(ve)[3], sorted(ve)[7]
    model.batches.clear()
    limited = sample(model, guidance_interval=(lo, hi), **kw)
    assert model.batches == [6 if lo < v <= hi else 3 for v in ve]  # 4 guided steps of 10
    assert not torch.allclose(limited, everywhere)


@pytest.mark.parametrize(
    "interval, match",
    [((5.0, 1.0), "sigma_lo < sigma_hi"), ((-1.0, 2.0), "0 <= sigma_lo"),
     ((1.0,), "two noise levels"), ("ab", "two noise levels"), ((0.0, float("nan")), "sigma_hi")],
)  # fmt: skip
def test_bad_guidance_intervals_are_refused_with_what_is_allowed(interval, match):
    with pytest.raises(ValueError, match=match):
        sample(CondModel(), schedule=SCHED, steps=2, guidance_scale=2.0, cond=COND,
               uncond=UNCOND, noise=_x(), guidance_interval=interval)  # fmt: skip
    with pytest.raises(ValueError, match=match):  # checked at w = 1 too, not ignored
        sample(CondModel(), schedule=SCHED, steps=2, noise=_x(), guidance_interval=interval)


# ---------------------------------------------------------------------------- inpainting
def _inpaint_case():
    gen = torch.Generator().manual_seed(8)
    image = torch.rand(3, 2, 4, 4, generator=gen) * 2 - 1
    hole = torch.zeros(3, 1, 4, 4)
    hole[:, :, 1:3, 1:3] = 1.0  # generate the centre, keep the border
    return image, hole


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_inpainting_keeps_the_known_pixels_with_every_sampler(name):
    """x̂0 replacement (DDNM, Wang et al. 2023): outside the hole the sample reproduces the
    image, whichever sampler walks the levels; a hole covering everything is plain sampling
    bit for bit, so the network's output is untouched inside the hole."""
    image, hole = _inpaint_case()
    model = CondModel()

    def run(**inpaint):  # fresh generators each time: ancestral noise is drawn from them
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        return sample(model, schedule=SCHED, sampler=name, steps=6, noise=_x(2, (3, 2, 4, 4)),
                      generator=gens, clip_x0=True, **inpaint)  # fmt: skip

    out = run(inpaint_image=image, inpaint_mask=hole)
    torch.testing.assert_close(out * (1 - hole), image * (1 - hole), rtol=0, atol=1e-4)
    assert ((out - image) * hole).abs().amax() > 1e-2  # the hole was generated, not copied
    assert torch.equal(run(inpaint_image=image, inpaint_mask=torch.ones(1, 1, 4, 4)), run())


def test_inpainting_blends_soft_masks_and_refuses_bad_ones():
    image, _ = _inpaint_case()
    den = Denoiser(CondModel(), SCHED, "eps")
    x, a, s = _x(3, (3, 2, 4, 4)), SCHED.alpha(400.0), SCHED.sigma(400.0)
    half = torch.full((1, 1, 4, 4), 0.25)
    got = InpaintX0(den, image, half).at(x, 400.0, a, s)
    plain = den.at(x, 400.0, a, s)
    torch.testing.assert_close(got.x0, 0.25 * plain.x0 + 0.75 * image)
    torch.testing.assert_close(got.eps, (x - a * got.x0) / s)  # still one consistent pair
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        InpaintX0(den, image, half * 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        InpaintX0(den, image, torch.ones(3, 1, 5, 5))
    with pytest.raises(ValueError, match="needs both inpaint_image and inpaint_mask"):
        sample(CondModel(), schedule=SCHED, steps=2, noise=x, inpaint_image=image)


# ---------------------------------------------------------------------------- APG
def _apg_setup():
    den = Denoiser(CondModel(), SCHED, "eps")
    x, a, s = _x(4), SCHED.alpha(300.0), SCHED.sigma(300.0)
    c, u = den.at(x, 300.0, a, s, **COND), den.at(x, 300.0, a, s, **UNCOND)
    return den, x, a, s, c, u


def test_apg_with_eta_1_and_no_momentum_or_cap_is_cfg():
    den, x, a, s, c, u = _apg_setup()
    apg = AdaptiveProjectedGuidance(den, 3.0, UNCOND, eta=1.0, momentum=0.0)
    got = apg.at(x, 300.0, a, s, **COND)
    want = ClassifierFreeGuidance(den, 3.0, UNCOND).at(x, 300.0, a, s, **COND)
    torch.testing.assert_close(got.x0, want.x0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.eps, want.eps, rtol=1e-5, atol=1e-5)
    one = AdaptiveProjectedGuidance(den, 1.0, UNCOND).at(x, 300.0, a, s, **COND)
    assert torch.equal(one.x0, c.x0)  # w = 1: the conditional call alone


def test_apg_drops_the_parallel_part_caps_the_norm_and_carries_momentum():
    """Sadat et al. 2025, Alg. 1, checked against its definitions per sample."""
    den, x, a, s, c, u = _apg_setup()
    diff = (c.x0 - u.x0).double()
    flat = lambda v: v.double().flatten(1)  # noqa: E731
    # η = 0: the update is orthogonal to x̂0(c)
    got = AdaptiveProjectedGuidance(den, 3.0, UNCOND, momentum=0.0).at(x, 300.0, a, s, **COND)
    update = flat(got.x0 - c.x0)
    cosine = (update * flat(c.x0)).sum(1) / (update.norm(dim=1) * flat(c.x0).norm(dim=1))
    assert (cosine.abs() < 1e-5).all()
    torch.testing.assert_close(got.eps, (x - a * got.x0) / s)
    # r: with η = 1 the update is (w - 1)·Δ with |Δ| capped at r
    r = 0.5 * float(flat(diff).norm(dim=1).min())
    capped = AdaptiveProjectedGuidance(den, 3.0, UNCOND, eta=1.0, momentum=0.0, norm_threshold=r)
    norms = flat(capped.at(x, 300.0, a, s, **COND).x0 - c.x0).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 2.0 * r), rtol=1e-5, atol=0)
    # β: the second call guides with Δ2 + β·Δ1
    apg = AdaptiveProjectedGuidance(den, 3.0, UNCOND, eta=1.0, momentum=-0.5)
    apg.at(x, 300.0, a, s, **COND)
    x2, a2, s2 = _x(5), SCHED.alpha(200.0), SCHED.sigma(200.0)
    c2, u2 = den.at(x2, 200.0, a2, s2, **COND), den.at(x2, 200.0, a2, s2, **UNCOND)
    second = apg.at(x2, 200.0, a2, s2, **COND)
    want = c2.x0 + 2.0 * ((c2.x0 - u2.x0) - 0.5 * (c.x0 - u.x0))
    torch.testing.assert_close(second.x0, want, rtol=1e-5, atol=1e-5)


def test_sampling_with_apg_and_its_bad_options():
    kw = dict(schedule=SCHED, sampler="dpmpp_2m", steps=6, guidance_scale=4.0, cond=COND,
              uncond=UNCOND, noise=_x(6), clip_x0=True)  # fmt: skip
    as_cfg = sample(CondModel(), apg={"eta": 1.0, "momentum": 0.0}, **kw)
    torch.testing.assert_close(as_cfg, sample(CondModel(), **kw), rtol=1e-4, atol=1e-4)
    projected = sample(CondModel(), apg={"momentum": -0.5}, **kw)  # the paper's η = 0, β
    assert torch.isfinite(projected).all() and not torch.allclose(projected, as_cfg, atol=1e-3)
    with pytest.raises(ValueError, match=r"unknown APG option\(s\) \['beta'\]"):
        sample(CondModel(), apg={"beta": 0.1}, **kw)
    with pytest.raises(ValueError, match="norm_threshold must be >= 0"):
        sample(CondModel(), apg={"norm_threshold": -1.0}, **kw)
    with pytest.raises(ValueError, match="pass it or apg, not both"):
        sample(CondModel(), apg={}, guidance_rescale=0.7, **kw)
