"""Tests for difflab.interop.unet: tiny SD1 / SD2 / SDXL-shaped diffusers U-Nets run in
difflab's UNet give diffusers' outputs, and every key mapping round-trips (diffusers' own
ldm converter as the reference for the original layout)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from difflab.interop.unet import (
    diffusers_module_map,
    ldm_module_map,
    ldm_unet_state,
    unet_config_from_diffusers,
    unet_config_from_ldm,
    unet_config_to_diffusers,
    unet_state_from_diffusers,
    unet_state_from_ldm,
    unet_state_to_diffusers,
    unet_state_to_ldm,
)
from difflab.models import UNet, UNetConfig
from difflab.models.unet import sdxl_vector

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

CROSS, PLAIN = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"), ("DownBlock2D", "UpBlock2D")
TIME_DIM = 8  # SDXL's addition_time_embed_dim is 256; tiny here

# diffusers configs shaped like each family, tiny; ldm_kw: what unet_config_from_ldm needs
CASES = {
    "sd1": dict(  # 1x1-conv projections, 8 heads everywhere, no attention at the last level
        config=dict(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=(CROSS[0], PLAIN[0]), up_block_types=(PLAIN[1], CROSS[1]),
            cross_attention_dim=32, attention_head_dim=8,
        ),
        ldm_kw=dict(family="sd1", image_size=16),
    ),
    "sd2": dict(  # linear projections, heads per level (64 channels each), upcast attention
        config=dict(
            sample_size=16, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=(CROSS[0], CROSS[0]), up_block_types=(CROSS[1], CROSS[1]),
            cross_attention_dim=32, attention_head_dim=(1, 2), use_linear_projection=True,
            upcast_attention=True,
        ),
        ldm_kw=dict(family="sd2", image_size=16),
    ),
    "sdxl": dict(  # no attention at the first level, depth per level, pooled + time ids
        config=dict(
            sample_size=16, block_out_channels=(32, 64, 128), layers_per_block=2,
            down_block_types=(PLAIN[0], CROSS[0], CROSS[0]),
            up_block_types=(CROSS[1], CROSS[1], PLAIN[1]),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 2),
            cross_attention_dim=32, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=32 + 6 * TIME_DIM,
        ),
        ldm_kw=dict(family="sdxl", image_size=16),
    ),
}  # fmt: skip


@functools.cache
def reference(name: str):
    """A tiny diffusers UNet2DConditionModel with every parameter made non-trivial (built
    once per family; tests only read it)."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**CASES[name]["config"]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ref


def inputs(name: str, batch: int = 2):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([3.0, 781.5])[:batch]
    context = torch.randn(batch, 7, 32, generator=g)
    added = None
    if name == "sdxl":
        pooled = torch.randn(batch, 32, generator=g)
        time_ids = torch.tensor([[1024.0, 768, 0, 16, 1024, 1024]]).repeat(batch, 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    return x, t, context, added


def run_difflab(model: UNet, x, t, context, added):
    vector = None if added is None else sdxl_vector(**_vector_args(added))
    return model(x, t, context=context, vector=vector)


def _vector_args(added):
    return dict(pooled=added["text_embeds"], time_ids=added["time_ids"], embed_dim=TIME_DIM)


def ported(name: str, **overrides):
    ref = reference(name)
    cfg = unet_config_from_diffusers(ref.config)
    if overrides:
        cfg = UNetConfig.from_dict({**cfg.to_dict(), **overrides})
    model = UNet(cfg).eval()
    model.load_state_dict(unet_state_from_diffusers(ref.state_dict(), cfg), strict=True)
    return ref, cfg, model


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_equal_diffusers(name):
    ref, cfg, model = ported(name)
    x, t, context, added = inputs(name)
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs=added).sample
        out = run_difflab(model, x, t, context, added)
    assert expected.abs().mean() > 0.1  # a non-trivial output
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_config_reads_each_family():
    sd1 = unet_config_from_diffusers(reference("sd1").config)
    assert (sd1.num_heads, sd1.num_head_channels, sd1.transformer_conv_proj) == (8, None, True)
    assert (sd1.attention_resolutions, sd1.transformer_depth, sd1.fuse_qkv) == ((16,), 1, False)
    assert sd1.transformer_norm_eps == 1e-6 and sd1.vector_dim is None
    sd2 = unet_config_from_diffusers(reference("sd2").config)
    assert (sd2.num_head_channels, sd2.transformer_conv_proj) == (64, False)
    xl = unet_config_from_diffusers(reference("sdxl").config)
    assert (xl.transformer_depth, xl.transformer_depth_middle) == ((0, 1, 2), None)
    assert (xl.attention_resolutions, xl.num_head_channels, xl.vector_dim) == ((8, 4), 64, 80)


def test_fused_qkv_holds_the_same_weights():
    ref, cfg, model = ported("sd1", fuse_qkv=True)
    names = [n for n, _ in model.named_modules()]
    assert any(n.endswith("self_attn.to_qkv") for n in names)
    assert any(n.endswith("cross_attn.to_kv") for n in names)
    x, t, context, added = inputs("sd1")
    with torch.no_grad():
        expected = ref(x, t, context).sample
        torch.testing.assert_close(model(x, t, context=context), expected, atol=1e-5, rtol=1e-5)
    back = unet_state_to_diffusers(model.state_dict(), cfg)
    ref_state = ref.state_dict()
    assert back.keys() == ref_state.keys()
    assert all(torch.equal(back[k], ref_state[k]) for k in ref_state)


@pytest.mark.parametrize("name", list(CASES))
def test_diffusers_round_trips(name):
    ref, cfg, model = ported(name)
    ref_state = ref.state_dict()
    # diffusers -> difflab -> diffusers
    back = unet_state_to_diffusers(unet_state_from_diffusers(ref_state, cfg), cfg)
    assert back.keys() == ref_state.keys()
    assert all(torch.equal(back[k], ref_state[k]) for k in ref_state)
    # difflab -> diffusers -> difflab
    ours = model.state_dict()
    again = unet_state_from_diffusers(unet_state_to_diffusers(ours, cfg), cfg)
    assert list(again) == list(ours)
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    # the written config builds a diffusers model that loads the state and agrees
    written = unet_config_to_diffusers(cfg)
    assert unet_config_from_diffusers(written) == cfg
    kwargs = {k: v for k, v in written.items() if not k.startswith("_")}
    if "addition_time_embed_dim" in kwargs:  # written as SDXL's 256; the tiny model has 8
        assert kwargs["addition_time_embed_dim"] == 256
        kwargs["addition_time_embed_dim"] = TIME_DIM
    rebuilt = diffusers.UNet2DConditionModel(**kwargs).eval()
    rebuilt.load_state_dict(unet_state_to_diffusers(ours, cfg), strict=True)
    x, t, context, added = inputs(name)
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs=added).sample
        out = rebuilt(x, t, context, added_cond_kwargs=added).sample
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_scale_shift_resblocks_equal_diffusers_both_ways():
    """ADM's scale-shift ResBlocks (difflab's default) are diffusers'
    ``resnet_time_scale_shift="scale_shift"``: config and weights map both ways, and the
    two networks agree."""
    torch.manual_seed(0)
    config = {**CASES["sd1"]["config"], "resnet_time_scale_shift": "scale_shift"}
    ref = diffusers.UNet2DConditionModel(**config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = unet_config_from_diffusers(ref.config)
    assert cfg.use_scale_shift_norm
    assert unet_config_to_diffusers(cfg)["resnet_time_scale_shift"] == "scale_shift"
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg
    model = UNet(cfg).eval()
    model.load_state_dict(unet_state_from_diffusers(ref.state_dict(), cfg), strict=True)
    x, t, context, _ = inputs("sd1")
    with torch.no_grad():
        expected = ref(x, t, context).sample
        torch.testing.assert_close(model(x, t, context=context), expected, atol=1e-5, rtol=1e-5)
    back = unet_state_to_diffusers(model.state_dict(), cfg)
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("name", list(CASES))
def test_ldm_layout_matches_diffusers_converter(name):
    ref, cfg, model = ported(name)
    ours = model.state_dict()
    ldm = unet_state_to_ldm(ours, cfg)
    assert all(k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.",
                             "label_emb.", "out.")) for k in ldm)  # fmt: skip
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ldm.items()}
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(ref.config))
    ref_state = ref.state_dict()
    assert converted.keys() == ref_state.keys()
    assert all(torch.equal(converted[k], ref_state[k]) for k in ref_state)
    assert (
        ldm_unet_state({**checkpoint, "first_stage_model.x": torch.zeros(1)}).keys() == ldm.keys()
    )
    back = unet_state_from_ldm(ldm, cfg)
    assert all(torch.equal(back[k], ours[k]) for k in ours) and back.keys() == ours.keys()
    assert unet_config_from_ldm(ldm, **CASES[name]["ldm_kw"]) == cfg
    assert unet_config_from_ldm(ldm, image_size=16) == cfg  # the family guess


def test_ldm_config_reads_depth_and_heads_overrides():
    ref, cfg, model = ported("sdxl")
    ldm = unet_state_to_ldm(model.state_dict(), cfg)
    read = unet_config_from_ldm(ldm, num_heads=2, image_size=16)
    assert (read.num_heads, read.num_head_channels) == (2, None)
    assert (read.transformer_depth, read.transformer_depth_middle) == ((0, 1, 2), None)
    assert read.vector_dim == 80 and read.context_dim == 32


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_module_maps_cover_every_linear_and_conv(name):
    ref, cfg, model = ported(name)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    theirs = dict(ref.named_modules())
    mapping = diffusers_module_map(cfg)
    assert sorted(mapping.values()) == sorted(ours)  # one to one (fuse_qkv=False)
    for dname, mine in mapping.items():
        assert isinstance(theirs[dname], (nn.Linear, nn.Conv2d)), dname
        assert theirs[dname].weight.numel() == ours[mine].weight.numel(), dname
    assert mapping["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" if name == "sdxl"
                   else "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].endswith(
        "blocks.0.self_attn.to_q")  # fmt: skip
    ldm_names = ldm_module_map(cfg)
    ldm_keys = unet_state_to_ldm(model.state_dict(), cfg)
    assert sorted(ldm_names.values()) == sorted(ours)
    assert all(f"{n}.weight" in ldm_keys for n in ldm_names)


def test_errors_are_clear():
    config = dict(reference("sd1").config)
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        unet_config_from_diffusers({**config, "down_block_types": ["SimpleCrossAttnDownBlock2D",
                                                                   "DownBlock2D"]})  # fmt: skip
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        unet_config_from_diffusers({**config, "resnet_time_scale_shift": "ada_group"})
    with pytest.raises(ValueError, match="mirror"):
        unet_config_from_diffusers({**config, "up_block_types": [CROSS[1], PLAIN[1]]})
    ref, cfg, model = ported("sd1")
    state = ref.state_dict()
    with pytest.raises(ValueError, match="conv_in.weight"):
        unet_state_from_diffusers({k: v for k, v in state.items() if k != "conv_in.weight"}, cfg)
    with pytest.raises(ValueError, match="no place.*extra.weight"):
        unet_state_from_diffusers({**state, "extra.weight": torch.zeros(1)}, cfg)
    ldm = unet_state_to_ldm(model.state_dict(), cfg)
    with pytest.raises(ValueError, match="prefix"):
        unet_state_from_ldm({f"model.diffusion_model.{k}": v for k, v in ldm.items()}, cfg)
    with pytest.raises(ValueError, match="context_dim"):
        unet_config_to_diffusers(UNetConfig())


# The published config.json values of SD 1.5, SD 2.1 and SDXL base (options at their
# defaults left out) and the published U-Net parameter counts.
SD15 = dict(
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    down_block_types=[CROSS[0]] * 3 + [PLAIN[0]],
    up_block_types=[PLAIN[1]] + [CROSS[1]] * 3,
    sample_size=64,
    layers_per_block=2,
)
SD21 = dict(
    SD15,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
    sample_size=96,
)
SDXL = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048, layers_per_block=2,
    down_block_types=[PLAIN[0], CROSS[0], CROSS[0]], up_block_types=[CROSS[1], CROSS[1], PLAIN[1]],
    projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
)  # fmt: skip


@pytest.mark.parametrize(
    "config,count",
    [(SD15, 859_520_964), (SD21, 865_910_724), (SDXL, 2_567_463_684)],
    ids=["sd1.5", "sd2.1", "sdxl"],
)
def test_real_configs_build_with_published_parameter_counts(config, count):
    cfg = unet_config_from_diffusers(config)
    with torch.device("meta"):  # shapes only
        model = UNet(cfg)
    assert sum(p.numel() for p in model.parameters()) == count
    ldm = unet_state_to_ldm(model.state_dict(), cfg)
    assert unet_config_from_ldm(ldm) == cfg  # the family guessed from the keys
