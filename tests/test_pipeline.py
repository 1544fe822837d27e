"""Pipeline.from_run: rebuild, load, sample; seeds per image; clear errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from _tiny_run import make_tiny_run

from difflab.pipeline import Pipeline
from difflab.samplers import img2img


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("cond") / "run", num_classes=10)


@pytest.fixture(scope="module")
def pipe(cond_run):
    return Pipeline.from_run(cond_run)


def test_output_shape_range_and_defaults(pipe):
    x = pipe(n=3, class_labels=[0, 5, 9], seed=0)
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    p = pipe.resolve_params(3, [0, 5, 9])
    assert (p["sampler"], p["steps"], p["guidance_scale"]) == ("ddim", 4, 2.0)  # from the run


def test_same_seed_same_image_and_other_seed_differs(pipe):
    a = pipe(n=2, class_labels=3, seed=7)
    b = pipe(n=2, class_labels=3, seed=7)
    c = pipe(n=2, class_labels=3, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.allclose(a[1], c[0], atol=1e-5)  # image 1 of seed 7 is seed 8 alone


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])  # deterministic and ancestral noise
def test_image_i_of_a_batch_equals_its_seed_alone(pipe, sampler):
    batch = pipe(n=3, class_labels=[1, 2, 4], sampler=sampler, steps=3, seed=10)
    alone = pipe(n=1, class_labels=[4], sampler=sampler, steps=3, seed=12)
    torch.testing.assert_close(batch[2], alone[0], atol=1e-5, rtol=0)


def test_guidance_zero_is_the_unconditional_sample(pipe):
    """CFG w=0 gives exactly the null-label (unconditional) prediction at every step."""
    guided = pipe(n=2, class_labels=[3, 3], guidance_scale=0.0, seed=1)
    uncond = pipe(n=2, class_labels=None, seed=1)
    torch.testing.assert_close(guided, uncond, atol=1e-5, rtol=0)
    labelled = pipe(n=2, class_labels=[3, 3], guidance_scale=1.0, seed=1)
    assert not torch.allclose(labelled, uncond, atol=1e-4)


def test_negative_class_replaces_the_null_label_in_guidance(pipe):
    """CFG with a negative class c' is eps(c') + w (eps(c) - eps(c')): the same sample as
    dl.sample with c' as the unconditional side; w = 0 gives the negative class's sample."""
    from difflab.samplers import sample

    kw = dict(n=2, class_labels=[3, 4], guidance_scale=2.5, seed=5, sampler="ddim", steps=4)
    got = pipe(**kw, negative_class=[8, 1])
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    expected = sample(
        pipe.model, (2, 1, 8, 8), schedule=pipe.schedule, sampler="ddim", steps=4,
        guidance_scale=2.5, cond={"class_labels": torch.tensor([3, 4])},
        uncond={"class_labels": torch.tensor([8, 1])}, generator=gens,
        prediction=pipe.prediction, variance=pipe.variance, clip_x0=True, progress=False,
    )  # fmt: skip
    torch.testing.assert_close(got, expected.clamp(-1, 1), rtol=0, atol=1e-5)
    zero = pipe(**{**kw, "guidance_scale": 0.0}, negative_class=8)
    torch.testing.assert_close(zero, pipe(**{**kw, "class_labels": 8, "guidance_scale": 1.0}))
    assert pipe.resolve_params(2, [3, 4], negative_class=8)["negative_class"] == [8, 8]
    with pytest.raises(ValueError, match="class labels must lie in 0..9"):
        pipe(**kw, negative_class=10)
    with pytest.raises(ValueError, match="negative_class needs class_labels"):
        pipe(n=2, negative_class=1, steps=2)


def test_noise_and_size_arguments(pipe):
    """noise= equal to the seeded draw reproduces the seeded images; other noise differs;
    height/width sample another size (the U-Net is convolutional) and are recorded."""
    from difflab.samplers.common import randn

    gens = [torch.Generator().manual_seed(9 + i) for i in range(2)]
    noise = randn((2, 1, 8, 8), gens)
    seeded = pipe(n=2, class_labels=[1, 2], seed=9)
    torch.testing.assert_close(pipe(n=2, class_labels=[1, 2], seed=9, noise=noise), seeded)
    other = pipe(n=2, class_labels=[1, 2], seed=9, noise=torch.zeros(2, 1, 8, 8))
    assert not torch.allclose(other, seeded, atol=1e-4)
    assert pipe.resolve_params(2, [1, 2], custom_noise=True)["noise"] == "custom"
    with pytest.raises(ValueError, match=r"noise must be a tensor of shape \(2, 1, 8, 8\)"):
        pipe(n=2, class_labels=[1, 2], noise=torch.zeros(2, 1, 4, 4))
    wide = pipe(n=1, class_labels=3, height=8, width=16, seed=0)
    assert wide.shape == (1, 1, 8, 16)
    assert pipe.resolve_params(1, 3, size=(8, 16))["size"] == [8, 16]
    assert pipe.resolve_params(1, 3)["size"] == [8, 8]
    with pytest.raises(ValueError, match="width must be a positive multiple of 2"):
        pipe(n=1, class_labels=3, width=9)


def test_guidance_refinements_reach_the_sampler_and_are_recorded(pipe):
    """An interval holding no step is the conditional sample (w acts nowhere), one holding
    every step is plain CFG; rescale and eta change the images; all land in the params."""
    kw = dict(n=2, class_labels=[3, 5], guidance_scale=3.0, seed=2)
    guided, conditional = pipe(**kw), pipe(**{**kw, "guidance_scale": 1.0})
    assert torch.equal(pipe(**kw, guidance_interval=(0.0, float("inf"))), guided)
    assert torch.equal(pipe(**kw, guidance_interval=(1e6, 1e7)), conditional)
    assert not torch.allclose(guided, conditional, atol=1e-4)
    rescaled = pipe(**kw, guidance_rescale=0.7)
    assert not torch.allclose(rescaled, guided, atol=1e-4)
    assert not torch.allclose(pipe(**kw, eta=1.0), guided, atol=1e-4)  # DDIM: eta is its noise
    p = pipe.resolve_params(**kw, guidance_rescale=0.7, guidance_interval=(0.3, 5), eta=0.5)
    assert (p["guidance_rescale"], p["guidance_interval"], p["eta"]) == (0.7, [0.3, 5.0], 0.5)
    assert pipe.resolve_params(**kw, s_noise=1.0)["sampler_options"] == {"s_noise": 1.0}
    as_cfg = pipe(**kw, apg={"eta": 1.0, "momentum": 0.0})  # APG's CFG special case
    torch.testing.assert_close(as_cfg, guided, rtol=0, atol=1e-4)
    assert not torch.allclose(pipe(**kw, apg={}), guided, atol=1e-3)
    assert pipe.resolve_params(**kw, apg={"momentum": 0.0})["apg"] == {
        "eta": 0.0, "momentum": 0.0, "norm_threshold": 0.0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="sigma_lo < sigma_hi"):
        pipe(**kw, guidance_interval=(5, 1))


def test_img2img_equals_dl_img2img_per_image_seeds_and_returns_its_timesteps(pipe):
    init = pipe(n=3, class_labels=[1, 4, 7], seed=0)
    kw = dict(class_labels=[1, 4, 7], sampler="ddim", steps=10, guidance_scale=2.0, seed=5)
    result = pipe.img2img(init, 0.4, **kw)
    direct = img2img(
        pipe.model, init, strength=0.4, schedule=pipe.schedule, sampler="ddim", steps=10,
        guidance_scale=2.0, cond={"class_labels": torch.tensor([1, 4, 7])},
        uncond={"class_labels": torch.tensor([10, 10, 10])}, clip_x0=True,
        generator=[torch.Generator().manual_seed(5 + i) for i in range(3)], progress=False,
    )  # fmt: skip
    assert torch.equal(result.images, direct.images.clamp(-1, 1))
    full = pipe.schedule.timesteps(10, pipe.resolve_params(3, **kw)["spacing"])
    assert result.timesteps == direct.timesteps == list(full[-4:])  # int(10 · 0.4) steps
    alone = pipe.img2img(init[2:], 0.4, **{**kw, "class_labels": [7], "seed": 7})
    torch.testing.assert_close(alone.images[0], result.images[2], rtol=0, atol=1e-5)
    assert pipe.resolve_params(3, [1, 4, 7], strength=0.4)["strength"] == 0.4
    with pytest.raises(ValueError, match=r"images have 3 channels but this model makes 1-channel"):
        pipe.img2img(torch.zeros(1, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 2"):
        pipe.img2img(torch.zeros(1, 1, 7, 8), 0.5)
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        pipe.img2img(init, 0.0)


def test_inpainting_keeps_the_unmasked_pixels_and_is_dl_img2img_with_a_mask(pipe):
    init = pipe(n=2, class_labels=[2, 8], seed=4)
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., 2:6, 3:7] = 1.0
    kw = dict(class_labels=[2, 8], sampler="euler_ancestral", steps=6, guidance_scale=2.0, seed=1)
    result = pipe.img2img(init, 1.0, mask=hole, **kw)
    assert torch.equal(result.images * (1 - hole), init * (1 - hole))
    direct = img2img(
        pipe.model, init, strength=1.0, schedule=pipe.schedule, sampler="euler_ancestral",
        steps=6, guidance_scale=2.0, cond={"class_labels": torch.tensor([2, 8])},
        uncond={"class_labels": torch.tensor([10, 10])}, clip_x0=True, inpaint_image=init,
        inpaint_mask=hole, generator=[torch.Generator().manual_seed(1 + i) for i in range(2)],
        progress=False,
    )  # fmt: skip
    assert torch.equal(result.images * hole, direct.images.clamp(-1, 1) * hole)
    assert pipe.resolve_params(2, [2, 8], strength=1.0, inpaint=True)["inpaint"] is True
    with pytest.raises(ValueError, match="does not fit images"):
        pipe.img2img(init, 1.0, mask=torch.ones(1, 1, 4, 4), **kw)


def test_raw_and_ema_weights_are_distinct_files(cond_run, pipe):
    raw = Pipeline.from_run(cond_run, weights="raw")
    assert raw.weights == "raw"
    a, b = pipe(n=1, class_labels=0, seed=0), raw(n=1, class_labels=0, seed=0)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="unknown weights 'best'"):
        Pipeline.from_run(cond_run, weights="best")


def test_checkpoint_from_another_architecture_is_named(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["model_channels"] = 16  # the weights were saved with 32
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="checkpoint from another architecture.*shape"):
        Pipeline.from_run(run)
    cfg["model"]["model_channels"] = 32
    cfg["model"]["num_res_blocks"] = 2  # extra blocks: keys missing from the file
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="another architecture.*missing key"):
        Pipeline.from_run(run)


def test_cfg_on_unconditional_model_raises(tmp_path):
    pipe = Pipeline.from_run(make_tiny_run(tmp_path / "u", num_classes=None))
    assert pipe(n=1, seed=0).shape == (1, 1, 8, 8)  # the run's default CFG 2.0 is not applied
    with pytest.raises(ValueError, match="unconditional"):
        pipe(n=1, guidance_scale=3.0)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(n=1, class_labels=[1])


def test_bad_conditioning_raises(pipe):
    with pytest.raises(ValueError, match="no text conditioning"):
        pipe(n=1, class_labels=[1], prompt="a seven")
    with pytest.raises(ValueError, match=r"0\.\.9"):
        pipe(n=1, class_labels=[10])
    with pytest.raises(ValueError, match="2 class labels for n=3"):
        pipe(n=3, class_labels=[1, 2])
    with pytest.raises(ValueError, match="needs a condition"):
        pipe(n=1, guidance_scale=3.0)


def test_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Pipeline.from_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        Pipeline.from_run(tmp_path / "empty")


def test_half_precision_runs_the_network_in_that_dtype(cond_run):
    """``Pipeline.to(dtype="bf16")`` equals ``dl.sample`` with a bf16 copy of the network
    (``model_dtype``), stays near the float32 samples, and is recorded in the parameters."""
    from difflab.samplers import sample
    from difflab.samplers.common import randn

    full = Pipeline.from_run(cond_run)
    half = Pipeline.from_run(cond_run).to(dtype="bf16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    labels = [1, 2, 3]
    x_half = half(n=3, class_labels=labels, seed=4, guidance_scale=1.0)
    x_full = full(n=3, class_labels=labels, seed=4, guidance_scale=1.0)

    gens = [torch.Generator().manual_seed(4 + i) for i in range(3)]
    by_hand = sample(
        full.model.to(torch.bfloat16),
        schedule=full.schedule,
        sampler="ddim",
        steps=4,
        cond={"class_labels": torch.tensor(labels)},
        noise=randn((3, 1, 8, 8), gens),
        clip_x0=True,
        model_dtype=torch.bfloat16,
    ).clamp(-1, 1)
    assert torch.equal(x_half, by_hand)
    assert x_half.dtype == torch.float32
    # bf16 rounding, not another image (the random tiny net saturates: a few pixels flip)
    assert 0 < (x_half - x_full).abs().mean() < 0.05
    assert half.resolve_params(3, labels)["dtype"] == "bf16"
    assert "dtype" not in full.resolve_params(3, labels)
    with pytest.raises(ValueError, match="unknown dtype 'half'; choices: fp32, bf16, fp16"):
        half.to(dtype="half")
