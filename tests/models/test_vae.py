"""The KL autoencoder: same outputs as diffusers' AutoencoderKL with the same weights (both
file directions), the exact Gaussian KL, and the latent scaling."""

from __future__ import annotations

import json
import math
import warnings
from fractions import Fraction

import pytest
import torch

from difflab.models import AutoencoderKL, DiagonalGaussian, VAEConfig
from difflab.models.vae import _tile_starts, blend_tiles

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


# ---------------------------------------------------------------- memory savers, precision
LOCAL = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 8),
    layers_per_block=1,
    latent_channels=2,
    norm_groups=4,
)  # fmt: skip  f = 2, cheap enough for big tiles


def _count_calls(module):
    """Record the input shapes of ``module``'s calls (a forward pre-hook)."""
    shapes = []
    module.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_sliced_encode_and_decode_equal_the_batch():
    vae = AutoencoderKL(VAEConfig(**SMALL), generator=torch.Generator().manual_seed(0)).eval()
    x, z = _images(b=3), torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    calls = _count_calls(vae.decoder)
    with torch.no_grad():
        # oneDNN's convolutions round differently per batch size (measured 3e-6); with
        # them off every kernel is batch-invariant and slicing is bit-identical
        with torch.backends.mkldnn.flags(enabled=False):
            assert torch.equal(vae.decode(z, slicing=True), vae.decode(z))
            assert torch.equal(vae.encode(x, slicing=True).mean, vae.encode(x).mean)
        torch.testing.assert_close(vae.decode(z, slicing=True), vae.decode(z), rtol=0, atol=1e-5)
        calls.clear()
        vae.enable_slicing()
        vae.images(z)  # goes through the setting
    assert calls == [(1, 2, 4, 4)] * 3


def test_blend_tiles_is_exact_for_a_pixel_local_function_and_linear_across_overlaps():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 1)

    def up(t):  # pixel-local (each output pixel sees one input pixel)
        return conv(torch.nn.functional.interpolate(t, scale_factor=2.0, mode="nearest"))

    x = torch.randn(2, 3, 20, 44, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(blend_tiles(up, x, 8, 3, Fraction(2)), up(x), rtol=0, atol=1e-6)
        down = lambda t: torch.nn.functional.avg_pool2d(t, 2)  # noqa: E731
        torch.testing.assert_close(blend_tiles(down, x, 8, 4, Fraction(1, 2)), down(x))
    index = iter(range(100))
    const = lambda t: torch.full_like(t, float(next(index)))  # noqa: E731  tile k -> k
    row = blend_tiles(const, torch.zeros(1, 1, 4, 16), 4, 2, Fraction(1))[0, 0, 0]
    # starts 0, 2, ..., 12: each overlap of 2 goes from tile k to k+1 as k + (j + 0.5) / 2
    expected = torch.tensor([0, 0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75, 4.25, 4.75,
                             5.25, 5.75, 6, 6])  # fmt: skip
    torch.testing.assert_close(row, expected)


def _seam_columns(starts, tile, f):
    return sorted({c * f for s in starts for c in (s, s + tile)})


def test_tiled_decode_agrees_with_untiled_away_from_seams_and_seams_are_smooth():
    vae = AutoencoderKL(VAEConfig(**LOCAL), generator=torch.Generator().manual_seed(0)).eval()
    vae.enable_tiling(tile_size=128, overlap=32)  # 64 latent cells, 16 shared
    z = torch.randn(1, 2, 64, 176, generator=torch.Generator().manual_seed(1))
    calls = _count_calls(vae.decoder)
    with torch.no_grad():
        full = vae.decode(z, tiling=False)[0, 0]
        calls.clear()
        tiled = vae.images(z * vae.config.scaling_factor)[0, 0]
        tiled_calls = list(calls)
        vae.enable_tiling(overlap=0)
        cut = vae.decode(z)[0, 0]  # tiles side by side, no blending
    assert tiled_calls == [(1, 2, 64, 64)] * 4  # starts 0, 48, 96, 112: one tile per call
    err, err_cut = tiled - full, cut - full
    seams = _seam_columns(_tile_starts(176, 64, 16), 64, 2)
    far = torch.ones(full.shape[-1], dtype=torch.bool)
    for c in seams:  # 24 pixels: past the decoder's receptive field (~12 latent cells)
        far[max(c - 24, 0) : c + 24] = False
    far[:24] = far[-24:] = True  # the image's own edges are not seams
    # measured (image std 0.32): away from seams mean |err| 0.010, max 0.13 (each tile's
    # own GroupNorm statistics and middle attention), 0.19 at most inside the overlaps
    assert float(err[:, far].abs().mean()) < 0.015 and float(err[:, far].abs().max()) < 0.2
    assert float(err.abs().max()) < 0.25
    # smooth seams: the error's jump between neighbouring columns stays near the size it has
    # away from seams (measured 0.19 vs 0.12), while tiles cut without overlap jump by 1.46
    jump, jump_cut = (e.diff(dim=1).abs().amax(0) for e in (err, err_cut))
    assert float(jump.max()) < 2 * float(jump[far[1:]].max())
    assert float(jump_cut.max()) > 5 * float(jump.max())


def test_tiled_encode_sees_one_tile_per_call_and_agrees_with_untiled():
    vae = AutoencoderKL(VAEConfig(**LOCAL), generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 1, 128, 352, generator=torch.Generator().manual_seed(1))
    calls = _count_calls(vae.encoder)
    with torch.no_grad():
        full = vae.encode(x).mean
        calls.clear()
        tiled = vae.enable_tiling(tile_size=128, overlap=32).latents(x) / vae.config.scaling_factor
    assert calls == [(1, 1, 128, 128)] * 4 and tiled.shape == full.shape == (1, 2, 64, 176)
    err = (tiled - full).abs()
    # measured (latent std 0.25): mean |err| 0.005, max 0.075, the most inside overlaps
    assert float(err.mean()) < 0.01 and float(err.max()) < 0.15


def test_force_upcast_runs_float16_weights_in_float32():
    assert VAEConfig.from_diffusers({}).force_upcast  # diffusers' default
    assert not VAEConfig.from_diffusers({"force_upcast": False}).force_upcast
    assert VAEConfig(force_upcast=False).to_diffusers()["force_upcast"] is False
    vae = AutoencoderKL(VAEConfig(**SMALL), generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(100.0)  # with z ~ 1000: past float16's 65504
    half = vae.half()
    reference = AutoencoderKL(VAEConfig(**SMALL)).eval()
    reference.load_state_dict(half.float().state_dict())  # float32 copy of the float16 weights
    half.half()
    z = 1000 * torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    x = _images()
    with torch.no_grad():
        out = half.decode(z.half())
        assert out.dtype == torch.float32 and half.decoder.conv_out.weight.dtype == torch.float16
        assert torch.equal(out, reference.decode(z.half().float()))
        assert torch.equal(half.encode(x.half()).mean, reference.encode(x.half().float()).mean)
        half.config.force_upcast = False
        plain = half.decode(z.half())
    assert plain.dtype == torch.float16 and not plain.isfinite().all()  # the overflow


def test_bfloat16_weights_decode_on_cpu():
    vae = AutoencoderKL(VAEConfig(**SMALL), generator=torch.Generator().manual_seed(0)).eval()
    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = vae.decode(z)
        low = vae.to(torch.bfloat16).decode(z.bfloat16())  # bfloat16 is not upcast
    assert low.dtype == torch.bfloat16
    rel = float((low.float() - exact).norm() / exact.norm())
    assert rel < 0.05  # measured 0.028 (bfloat16 keeps 8 bits of mantissa)
