"""The LDM (CompVis) autoencoder layout: diffusers' own converter reads what
vae_state_to_ldm writes back into the original weights, the two mappings invert each other,
and the config inferred from the keys builds a network with the same outputs."""

from __future__ import annotations

import pytest
import torch

from difflab.interop.vae import vae_config_from_ldm, vae_state_from_ldm, vae_state_to_ldm
from difflab.models import AutoencoderKL, VAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

# three levels (a width change, so a shortcut conv, in both encoder and decoder)
SMALL = dict(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=2,
             latent_channels=2, norm_groups=8)  # fmt: skip


def _diffusers_vae(**overrides):
    torch.manual_seed(0)
    cfg = VAEConfig(**{**SMALL, **overrides}).to_diffusers()
    cfg.pop("_class_name")
    model = diffusers.AutoencoderKL(**cfg).eval()
    with torch.no_grad():  # move off the default init (zero biases etc.)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg


def _same_state(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mid_attention", [True, False])
def test_diffusers_converter_reads_our_ldm_state_back_to_the_original(mid_attention):
    ref, cfg = _diffusers_vae(mid_attention=mid_attention)
    state = ref.state_dict()
    ldm = vae_state_to_ldm(state)
    assert "encoder.down.1.block.0.nin_shortcut.weight" in ldm  # LDM's names
    assert "decoder.up.2.upsample.conv.weight" in ldm  # LDM counts up levels from the finest
    assert not any(k.startswith("decoder.up.0.upsample") for k in ldm)
    if mid_attention:
        assert ldm["decoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)  # 1x1 conv
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, cfg)
    _same_state(back, state)
    _same_state(vae_state_from_ldm(ldm), state)


def test_inferred_config_builds_a_vae_with_diffusers_outputs():
    ref, _ = _diffusers_vae()
    ldm = vae_state_to_ldm(ref.state_dict())
    ldm["loss.logvar"] = torch.zeros(())  # LDM's training loss rides along; dropped
    config = vae_config_from_ldm(ldm, norm_groups=8)
    assert config == VAEConfig(**SMALL, scaling_factor=0.18215)
    assert vae_config_from_ldm(ldm, scaling_factor=0.13025, norm_groups=8).scaling_factor == 0.13025
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(vae_state_from_ldm(ldm))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rec, posterior = ours(x)
        torch.testing.assert_close(rec, ref(x).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(posterior.mean, ref.encode(x).latent_dist.mean)


def test_foreign_keys_are_named_in_the_error():
    ref, _ = _diffusers_vae()
    ldm = vae_state_to_ldm(ref.state_dict())
    with pytest.raises(ValueError, match="unexpected key 'encoder.extra.weight' in a LDM"):
        vae_state_from_ldm({**ldm, "encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="strip the 'first_stage_model.' prefix"):
        vae_state_from_ldm({"first_stage_model." + k: v for k, v in ldm.items()})
    with pytest.raises(ValueError, match="unexpected key 'encoder.down.0.block.0.norm1.weight'"):
        vae_state_to_ldm({**ref.state_dict(), **ldm})  # an LDM key in a difflab state
    del ldm["post_quant_conv.weight"]
    with pytest.raises(ValueError, match="lacks 'post_quant_conv.weight'"):
        vae_config_from_ldm(ldm, norm_groups=8)
