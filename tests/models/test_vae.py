"""The KL autoencoder: same outputs as diffusers' AutoencoderKL with the same weights (both
file directions), the exact Gaussian KL, and the latent scaling."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from difflab.models import AutoencoderKL, DiagonalGaussian, VAEConfig

diffusers = pytest.importorskip("diffusers")

SMALL = dict(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=2,
             latent_channels=2, norm_groups=8)  # fmt: skip


def _diffusers_vae(seed=0):
    torch.manual_seed(seed)
    cfg = VAEConfig(**SMALL).to_diffusers()
    cfg.pop("_class_name")
    model = diffusers.AutoencoderKL(**cfg).eval()
    with torch.no_grad():  # move off the default init (zero biases etc.)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _images(b=2, side=16, channels=1):
    return torch.randn(b, channels, side, side, generator=torch.Generator().manual_seed(3))


def test_loads_a_diffusers_folder_and_matches_its_outputs(tmp_path):
    ref = _diffusers_vae()
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    x = _images()
    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist
        mine = ours.encode(x)
        torch.testing.assert_close(mine.mean, theirs.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.logvar, theirs.logvar, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=1e-5, atol=1e-5)
    assert ours.config.scaling_factor == ref.config.scaling_factor


def test_its_own_folder_opens_in_diffusers_with_the_same_outputs(tmp_path):
    ours = AutoencoderKL(VAEConfig(**SMALL, scaling_factor=0.5),
                         generator=torch.Generator().manual_seed(0)).eval()  # fmt: skip
    ours.save_pretrained(tmp_path)
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    x = _images()
    with torch.no_grad():
        rec, _ = ours(x)
        torch.testing.assert_close(rec, ref(x).sample, rtol=1e-5, atol=1e-5)
    assert ref.config.scaling_factor == 0.5
    assert json.loads((tmp_path / "config.json").read_text())["latent_channels"] == 2
    again = AutoencoderKL.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                  ours.state_dict().values()))  # fmt: skip


def test_kl_is_the_closed_form_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 4, 2, 2, generator=g)
    post = DiagonalGaussian(moments)
    q = torch.distributions.Normal(post.mean, post.std)
    p = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(post.sample(None), post.mean)
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.mean + post.std * torch.randn(
        post.mean.shape, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    zero = DiagonalGaussian(torch.zeros(1, 4, 2, 2))  # q = N(0, I): no divergence
    assert float(zero.kl()) == 0.0


def test_latents_and_images_invert_the_scaling():
    vae = AutoencoderKL(VAEConfig(**SMALL, scaling_factor=0.25, shift_factor=0.1),
                        generator=torch.Generator().manual_seed(0)).eval()  # fmt: skip
    x = _images()
    with torch.no_grad():
        z = vae.latents(x)
        torch.testing.assert_close(z, (vae.encode(x).mean - 0.1) * 0.25)
        torch.testing.assert_close(vae.images(z), vae.decode(vae.encode(x).mean), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    assert z.shape == (2, 2, 4, 4) and vae.config.downsample_factor == 4
    unit = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="far from 1"):
        std = vae.check_latent_scale(unit * 5)
    assert math.isclose(std, float((unit * 5).std()), rel_tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vae.check_latent_scale(unit)  # std ~1: silent


def test_bad_inputs_and_configs_are_refused(tmp_path):
    vae = AutoencoderKL(VAEConfig(**SMALL))
    with pytest.raises(ValueError, match=r"expected images \[B, 1, H, W\]"):
        vae.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 1, 10, 10))
    with pytest.raises(ValueError, match="not divisible by norm_groups"):
        VAEConfig(block_out_channels=(12,), norm_groups=8)
    with pytest.raises(FileNotFoundError, match="holds no autoencoder"):
        AutoencoderKL.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported autoencoder blocks"):
        VAEConfig.from_diffusers({"down_block_types": ["AttnDownEncoderBlock2D"]})
