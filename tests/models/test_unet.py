"""Tests for difflab.models.unet: shapes, invariances, initialisation, config round trips."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from difflab.models import UNet, UNetConfig
from difflab.models.layers import (
    attention,
    group_norm,
    timestep_embedding,
    upsample_conv3x3,
    upsample_then_conv,
)
from difflab.models.unet import PRESETS, ResBlock, sdxl_vector


def tiny_config(**overrides) -> UNetConfig:
    base = dict(
        image_size=8,
        in_channels=3,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_head_channels=8,
        norm_groups=8,
    )
    return UNetConfig(**{**base, **overrides})


def randomized(model: UNet, seed: int = 0, std: float = 0.05) -> UNet:
    """Give the zero-initialised output layers random values so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, std, generator=g)
    return model


def build(cfg: UNetConfig, seed: int = 0) -> UNet:
    return randomized(UNet(cfg, generator=torch.Generator().manual_seed(seed)), seed)


def inputs(cfg: UNetConfig, batch: int = 2, size: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = size or cfg.image_size
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    kw = {}
    if cfg.num_classes is not None:
        kw["class_labels"] = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    if cfg.context_dim is not None:
        kw["context"] = torch.randn(batch, 5, cfg.context_dim, generator=g)
    return x, t, kw


# --- shapes -------------------------------------------------------------------------------

SHAPE_CASES = list(
    itertools.product(
        [None, 10],  # num_classes
        [None, 12],  # context_dim
        [False, True],  # learn_sigma
        [False, True],  # resblock_updown
    )
)


@pytest.mark.parametrize("num_classes,context_dim,learn_sigma,updown", SHAPE_CASES)
@pytest.mark.parametrize(
    "image_size,channel_mult,attn",
    [(8, (1,), ()), (8, (1, 2), (8, 4)), (16, (1, 2, 2), (8,))],
)
def test_output_shape_every_option(
    num_classes, context_dim, learn_sigma, updown, image_size, channel_mult, attn
):
    cfg = tiny_config(
        image_size=image_size,
        channel_mult=channel_mult,
        attention_resolutions=attn,
        num_classes=num_classes,
        context_dim=context_dim,
        learn_sigma=learn_sigma,
        resblock_updown=updown,
    )
    model = build(cfg).eval()
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        out = model(x, t, **kw)
    assert out.shape == (2, 6 if learn_sigma else 3, image_size, image_size)
    assert out.dtype == x.dtype and torch.isfinite(out).all()


def test_out_channels_and_larger_nonsquare_input():
    cfg = tiny_config(in_channels=4, out_channels=2, use_scale_shift_norm=False)
    model = build(cfg).eval()
    x = torch.randn(1, 4, 8, 24)
    assert model(x, torch.tensor([3.5])).shape == (1, 2, 8, 24)
    assert model(x, 7.0).shape == (1, 2, 8, 24)  # scalar t broadcast


def test_attention_placed_at_requested_resolutions():
    cfg = tiny_config(image_size=16, channel_mult=(1, 2, 2), attention_resolutions=(8,))
    model = UNet(cfg)
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
        for m in model.modules()
        if type(m).__name__ == "AttentionBlock"
    ]
    model(torch.randn(1, 3, 16, 16), 1.0)
    for h in hooks:
        h.remove()
    # 1 down block + 2 up blocks at 8x8, and the middle block at 4x4
    assert sorted(seen) == [4, 8, 8, 8]


# --- errors -------------------------------------------------------------------------------


def test_input_errors_are_clear():
    model = UNet(tiny_config(num_classes=None))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 4, 8, 8), 1.0)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 3, 8, 9), 1.0)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 3, 8, 8), 1.0, class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 3, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="context_dim=None"):
        model(torch.randn(1, 3, 8, 8), 1.0, context=torch.randn(1, 2, 4))
    ctx_model = UNet(tiny_config(context_dim=4))
    with pytest.raises(ValueError, match="needs context"):
        ctx_model(torch.randn(1, 3, 8, 8), 1.0)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match=r"levels have resolutions \(8, 4\)"):
        tiny_config(attention_resolutions=(16,))
    with pytest.raises(ValueError, match="not divisible by 4"):
        tiny_config(image_size=6, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="48 channels cannot use 32 groups.*norm_groups=16"):
        UNet(tiny_config(norm_groups=32))  # 16 + 32 = 48 channels in the decoder
    with pytest.raises(ValueError, match="unknown U-Net preset 'cifar'; did you mean 'cifar10'"):
        UNetConfig.preset("cifar")


def test_stable_diffusion_options_errors_are_clear():
    with pytest.raises(ValueError, match=r"num_heads must be an int or 2 ints >= 1"):
        tiny_config(num_heads=(1, 2, 4))
    with pytest.raises(ValueError, match=r"is 0 at attention level\(s\) \[1\]"):
        tiny_config(context_dim=4, transformer_depth=(1, 0))
    with pytest.raises(ValueError, match="transformer_depth_middle >= 1"):
        tiny_config(context_dim=4, attention_resolutions=(8,), transformer_depth=(1, 0))
    with pytest.raises(ValueError, match="transformer_norm_eps must be > 0"):
        tiny_config(transformer_norm_eps=0.0)
    model = UNet(tiny_config(context_dim=4, vector_dim=6))
    x, ctx = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"needs vector of shape \[2, 6\], got None"):
        model(x, 1.0, context=ctx)
    with pytest.raises(ValueError, match=r"got \(2, 5\)"):
        model(x, 1.0, context=ctx, vector=torch.randn(2, 5))
    with pytest.raises(ValueError, match="vector_dim=None"):
        UNet(tiny_config())(x, 1.0, vector=torch.randn(2, 6))


def test_per_level_heads_depth_and_separate_qkv_build_as_configured():
    cfg = tiny_config(
        image_size=16, channel_mult=(1, 2, 2), attention_resolutions=(8, 4), context_dim=4,
        num_head_channels=None, num_heads=(1, 2, 4), transformer_depth=(0, 1, 3),
        transformer_depth_middle=2, transformer_norm_eps=1e-6, fuse_qkv=False,
    )  # fmt: skip
    model = UNet(cfg)
    sites = {n: m for n, m in model.named_modules() if type(m).__name__ == "SpatialTransformer"}
    found = {n: (len(m.blocks), m.blocks[0].self_attn.num_heads) for n, m in sites.items()}
    # one res block per level: level 1 (8 px) is down.2, up.2-3; level 2 (4 px) down.4, up.0-1
    assert found == {
        "down.2.1": (1, 2), "down.4.1": (3, 4), "middle.1": (2, 4),
        "up.0.1": (3, 4), "up.1.1": (3, 4), "up.2.1": (1, 2), "up.3.1": (1, 2),
    }  # fmt: skip
    assert all(m.norm.eps == 1e-6 for m in sites.values())
    attn = sites["middle.1"].blocks[0].cross_attn
    assert [n for n, _ in attn.named_children()] == ["to_q", "to_k", "to_v", "to_out"]
    assert attn.to_k.in_features == 4 and attn.to_k.bias is None
    data = cfg.to_dict()
    assert data["num_heads"] == [1, 2, 4] and UNetConfig.from_dict(data) == cfg


def test_separate_qkv_equals_fused_with_the_same_weights():
    fused = build(tiny_config(context_dim=4, transformer_depth=2))
    cfg = dataclasses.replace(fused.config, fuse_qkv=False)
    separate = UNet(cfg).eval()
    state = {}
    for key, value in fused.state_dict().items():
        if key.endswith((".to_qkv.weight", ".to_kv.weight")):
            stem, names = key.rsplit(".", 2)[0], "qkv" if ".to_qkv." in key else "kv"
            state.update(zip([f"{stem}.to_{c}.weight" for c in names], value.chunk(len(names))))
        else:
            state[key] = value
    separate.load_state_dict(state, strict=True)
    x, t, kw = inputs(cfg)
    torch.testing.assert_close(separate(x, t, **kw), fused.eval()(x, t, **kw))


def test_sdxl_vector_layout():
    pooled, time_ids = torch.randn(2, 3), torch.tensor([[512.0, 256, 0, 8, 64, 32]] * 2)
    vector = sdxl_vector(pooled, time_ids, embed_dim=4)
    assert vector.shape == (2, 3 + 6 * 4)
    assert torch.equal(vector[:, :3], pooled)
    expected = timestep_embedding(torch.tensor([0.0, 8.0]), 4)  # crop ids (0, 8)
    torch.testing.assert_close(vector[0, 3 + 2 * 4 : 3 + 4 * 4], expected.flatten())
    with pytest.raises(ValueError, match="pooled"):
        sdxl_vector(pooled, time_ids[:1])


def test_group_norm_clamps_tiny_widths():
    assert group_norm(8, 32).num_groups == 8
    assert group_norm(64, 32).num_groups == 32


# --- fast paths equal the textbook form -----------------------------------------------------


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_upsample_conv3x3_equals_nearest_upsample_then_conv(memory_format):
    """The folded stride-2 transposed conv is the same linear map as DDPM's upsample + conv,
    forward and backward (input, weight and bias gradients)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, 9, generator=g).contiguous(memory_format=memory_format)
    w, b = torch.randn(7, 5, 3, 3, generator=g), torch.randn(7, generator=g)
    grad_out = torch.randn(2, 7, 16, 18, generator=g)
    results = []
    for fast in (False, True):
        xi, wi, bi = (v.clone().requires_grad_() for v in (x, w, b))
        if fast:
            y = upsample_conv3x3(xi, wi, bi)
        else:
            y = F.conv2d(F.interpolate(xi, scale_factor=2.0, mode="nearest"), wi, bi, padding=1)
        y.backward(grad_out)
        results.append((y.detach(), xi.grad, wi.grad, bi.grad))
    for fast, ref in zip(results[1], results[0]):
        assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5), (fast - ref).abs().max()
    # known answer: a one-hot pixel becomes a 2x2 block; an all-ones 3x3 kernel counts overlaps
    # (an input of 16x16 >= 128 pixels: the folded path; smaller ones take the plain form)
    onehot = torch.zeros(1, 1, 16, 16)
    onehot[0, 0, 1, 1] = 1.0
    ones = upsample_conv3x3(onehot, torch.ones(1, 1, 3, 3), None)[0, 0]
    expected = torch.zeros(32, 32)
    expected[1:5, 1:5] = torch.tensor([[1.0, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]])
    assert torch.equal(ones, expected)


def test_upsample_conv3x3_small_inputs_take_the_plain_form():
    """Below 128 input pixels (batch x height x width) no kernel is folded: the result is
    the upsample-then-conv one, bit for bit."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 6, 4, 4, generator=g), torch.randn(6, 6, 3, 3, generator=g), None
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    assert torch.equal(upsample_conv3x3(x, w, b), ref)


def test_upsample_then_conv_respects_hooks_and_wrappers():
    """A hooked (or wrapped, e.g. LoRA) conv still sees the upsampled input; a plain one is
    folded; both give conv(upsample(x))."""
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 4, 4, generator=g)
    ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    seen = []
    assert torch.allclose(upsample_then_conv(conv, x), ref, atol=1e-6)
    conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    assert torch.allclose(upsample_then_conv(conv, x), ref, atol=1e-6)
    assert seen == [(2, 3, 8, 8)]

    class Doubled(torch.nn.Conv2d):  # stands in for a LoRA-style replacement module
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(inp)

    doubled = Doubled(3, 4, 3, padding=1)
    doubled.load_state_dict(conv.state_dict())
    assert torch.allclose(upsample_then_conv(doubled, x), 2 * ref, atol=1e-6)


def test_upsample_conv3x3_reduced_precision_path_matches():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 4, 4, 4, generator=g), torch.randn(4, 4, 3, 3, generator=g), None
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    out = upsample_conv3x3(x.bfloat16(), w.bfloat16(), b)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.03 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_channels_last_equals_contiguous(dtype):
    """The channels_last detour through the contiguous layout changes nothing but speed."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 16, 5, 3, generator=g) + 1).to(dtype)
    grad_out = torch.randn(2, 16, 5, 3, generator=g).to(dtype)
    norm = group_norm(16, 4)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        norm.zero_grad()
        xi = x.clone(memory_format=fmt).requires_grad_()
        y = norm(xi)
        assert y.is_contiguous(memory_format=fmt)
        y.backward(grad_out)
        results.append([y.float(), xi.grad.float(), norm.weight.grad.clone()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    ref = torch.nn.functional.group_norm(x.float(), 4, norm.weight, norm.bias)
    assert torch.allclose(results[0][0], ref, atol=0.05 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize(
    "tokens, width, float32", [(20, 8, True), (256, 32, True), (256, 64, False)]
)
def test_attention_precision_under_autocast(tokens, width, float32):
    """Short or narrow heads run SDPA in float32 under bf16 autocast (SDPA is on autocast's
    list, so it must be switched off); long, wide ones in bf16, whose kernel keeps a float32
    softmax. Either way the result is the exact attention to the compute precision."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, tokens, width, generator=g)
    ref = torch.softmax(q @ k.transpose(-1, -2) / width**0.5, dim=-1) @ v
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.float32
    err = (out - ref).abs().max().item()
    if float32:
        assert err < 1e-5  # bf16 inputs alone give ~1e-2
    else:
        bf16 = [t.bfloat16().float() for t in (q, k, v)]
        ref16 = torch.softmax(bf16[0] @ bf16[1].transpose(-1, -2) / width**0.5, -1) @ bf16[2]
        assert 1e-4 < err < 0.05 and (out - ref16).abs().max() < 0.02


# --- initialisation -----------------------------------------------------------------------


def test_fresh_model_outputs_exactly_zero_and_resblocks_are_identity():
    cfg = tiny_config(num_classes=3, context_dim=6, learn_sigma=True)
    model = UNet(cfg, generator=torch.Generator().manual_seed(0))
    x, t, kw = inputs(cfg)
    assert torch.equal(model(x, t, **kw), torch.zeros(2, 6, 8, 8))
    block = model.down[0][0]
    assert isinstance(block, ResBlock) and block.conv1.in_channels == block.conv1.out_channels
    h = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(h, torch.randn(2, 64)), h)


def test_generator_init_is_reproducible():
    a = UNet(tiny_config(), generator=torch.Generator().manual_seed(3))
    b = UNet(tiny_config(), generator=torch.Generator().manual_seed(3))
    c = UNet(tiny_config(), generator=torch.Generator().manual_seed(4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv_in.weight"], sc["conv_in.weight"])


def test_timestep_embedding_known_values():
    emb = timestep_embedding(torch.tensor([0.0, 2.5]), 6)
    freqs = 10000.0 ** (-torch.arange(3) / 3)
    assert torch.allclose(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert torch.allclose(emb[1], torch.cat([torch.cos(2.5 * freqs), torch.sin(2.5 * freqs)]))


# --- conditioning -------------------------------------------------------------------------


def test_null_label_is_default_for_conditional_model():
    cfg = tiny_config(num_classes=10)
    model = build(cfg).eval()
    assert model.null_class_label == 10
    x, t, _ = inputs(cfg)
    with torch.no_grad():
        implicit = model(x, t)
        explicit = model(x, t, class_labels=torch.full((2,), model.null_class_label))
        other = model(x, t, class_labels=torch.tensor([1, 2]))
    assert torch.equal(implicit, explicit)
    assert not torch.allclose(implicit, other)


def test_context_mask_equals_dropping_tokens():
    cfg = tiny_config(context_dim=12, num_heads=2, num_head_channels=None)
    model = build(cfg).eval()
    x, t, kw = inputs(cfg, batch=2)
    ctx = kw["context"]  # (2, 5, 12)
    keep = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    with torch.no_grad():
        masked = model(x, t, context=ctx, context_mask=keep)
        for i in range(2):
            alone = model(x[i : i + 1], t[i : i + 1], context=ctx[i : i + 1, keep[i]])
            assert torch.allclose(masked[i : i + 1], alone, atol=1e-5)
        unmasked = model(x, t, context=ctx)
    assert not torch.allclose(masked, unmasked, atol=1e-4)


def test_fully_masked_context_is_finite():
    cfg = tiny_config(context_dim=12)
    model = build(cfg).eval()
    x, t, kw = inputs(cfg)
    out = model(x, t, context=kw["context"], context_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert torch.isfinite(out).all()


# --- invariances --------------------------------------------------------------------------


def test_batch_of_four_equals_four_single_runs():
    cfg = tiny_config(num_classes=5, context_dim=12, dropout=0.1)
    model = build(cfg).eval()
    x, t, kw = inputs(cfg, batch=4)
    with torch.no_grad():
        batched = model(x, t, **kw)
        for i in range(4):
            single = model(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in kw.items()})
            assert torch.allclose(batched[i : i + 1], single, atol=1e-5)


def test_channels_last_equals_contiguous():
    for context_dim in (None, 12):
        cfg = tiny_config(image_size=16, channel_mult=(1, 2, 2), attention_resolutions=(16, 4),
                          context_dim=context_dim, resblock_updown=True)  # fmt: skip
        model = build(cfg).eval()
        x, t, kw = inputs(cfg)
        with torch.no_grad():
            ref = model(x, t, **kw)
            model = model.to(memory_format=torch.channels_last)
            out = model(x.to(memory_format=torch.channels_last), t, **kw)
        assert torch.allclose(out, ref, atol=1e-5)


def test_bf16_autocast_close_to_fp32():
    cfg = tiny_config(num_classes=3, context_dim=12)
    model = build(cfg).eval()
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, **kw)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = model(x, t, **kw)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_bf16_weights_run_and_return_input_dtype():
    cfg = tiny_config(num_classes=3, context_dim=12)
    model = build(cfg).eval()
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, **kw)
        out = model.to(torch.bfloat16)(x, t, **kw)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


# --- gradient checkpointing -----------------------------------------------------------------


def _loss_and_grads(cfg: UNetConfig, x, t, kw):
    model = build(cfg).train()
    torch.manual_seed(0)  # dropout is active; checkpointing must replay the same masks
    out = model(x, t, **kw)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_checkpointing_keeps_outputs_and_gradients():
    cfg = tiny_config(num_classes=3, context_dim=12, dropout=0.1, resblock_updown=True)
    x, t, kw = inputs(cfg)
    out_ref, grads_ref = _loss_and_grads(cfg, x, t, kw)
    out, grads = _loss_and_grads(UNetConfig(**{**cfg.to_dict(), "use_checkpoint": True}), x, t, kw)
    assert torch.allclose(out, out_ref, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ref[name], atol=1e-6), name


def _bytes_saved_for_backward(use_checkpoint: bool) -> int:
    """Bytes of the distinct storages autograd keeps from the forward pass for backward.

    Non-reentrant checkpointing replaces what a checkpointed stage would save by
    recomputation, so those tensors are never packed here.
    """
    cfg = tiny_config(image_size=16, num_res_blocks=2, attention_resolutions=(8,),
                      use_checkpoint=use_checkpoint)  # fmt: skip
    model = build(cfg).train()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(torch.randn(8, 3, 16, 16), torch.ones(8)).square().mean()
    loss.backward()
    return sum(storages.values())


def test_set_gradient_checkpointing_updates_config():
    model = UNet(tiny_config())
    model.set_gradient_checkpointing(True)
    assert model.config.use_checkpoint and UNet(model.config).config.use_checkpoint
    model.set_gradient_checkpointing(False)
    assert not model.config.use_checkpoint


def test_checkpointing_saves_fewer_bytes_for_backward():
    plain, checkpointed = _bytes_saved_for_backward(False), _bytes_saved_for_backward(True)
    assert checkpointed < 0.25 * plain


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trip(name):
    cfg = UNetConfig.preset(name, num_classes=10, context_dim=None)
    data = cfg.to_dict()
    assert all(type(v) in (int, float, bool, list, type(None)) for v in data.values())
    assert UNetConfig.from_dict(data) == cfg


def test_from_dict_suggests_close_key():
    with pytest.raises(ValueError, match="'num_res_block' \\(did you mean 'num_res_blocks'\\?\\)"):
        UNetConfig.from_dict({"num_res_block": 2})
    with pytest.raises(ValueError, match="did you mean 'dropout'"):
        UNetConfig.preset("tiny", drop_out=0.1)


def test_cifar10_preset_is_ddpm_architecture():
    cfg = UNetConfig.preset("cifar10")
    assert (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert (cfg.attention_resolutions, cfg.dropout, cfg.image_size) == ((16,), 0.1, 32)
    # DDPM's 35.7M parameters plus ADM's scale-shift projections (one extra 512 x C_out
    # linear per residual block)
    cfg_ddpm = UNetConfig.preset("cifar10", use_scale_shift_norm=False)
    n = sum(p.numel() for p in UNet(cfg_ddpm).parameters())
    assert abs(n - 35.7e6) < 0.05e6


# --- side by side with diffusers' UNet2DModel ---------------------------------------------------


def _port_from_diffusers(model: UNet, ref) -> dict[str, list[str]]:
    """Copy a ``UNet2DModel``'s weights into ``model`` (same architecture); return which
    diffusers parameters (concatenated) make up each difflab parameter."""
    src = ref.state_dict()
    res_keys = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb_proj", "norm2": "norm2",
                "conv2": "conv2", "conv_shortcut": "skip"}  # fmt: skip
    pairs: list[tuple[str, str, str]] = []  # (difflab prefix, diffusers prefix, kind)

    def stage(mine: str, blk: str, j: int, attn: bool) -> None:
        pairs.append((f"{mine}.0", f"{blk}.resnets.{j}", "res"))
        if attn:
            pairs.append((f"{mine}.1", f"{blk}.attentions.{j}", "attn"))

    cfg, levels, i = model.config, len(model.config.channel_mult), 0
    attn = [r in cfg.attention_resolutions for r in cfg.level_resolutions]
    for lvl in range(levels):
        for j in range(cfg.num_res_blocks):
            stage(f"down.{i}", f"down_blocks.{lvl}", j, attn[lvl])
            i += 1
        if lvl < levels - 1:
            kind = "res" if cfg.resblock_updown else "conv"
            pairs.append((f"down.{i}.0", f"down_blocks.{lvl}.downsamplers.0", kind))
            i += 1
    pairs += [
        ("middle.0", "mid_block.resnets.0", "res"),
        ("middle.1", "mid_block.attentions.0", "attn"),
        ("middle.2", "mid_block.resnets.1", "res"),
    ]
    for i, lvl in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            idx = i * (cfg.num_res_blocks + 1) + j
            stage(f"up.{idx}", f"up_blocks.{i}", j, attn[lvl])
        if lvl > 0:
            kind = "res" if cfg.resblock_updown else "conv"
            pairs.append((f"up.{idx}.{1 + attn[lvl]}", f"up_blocks.{i}.upsamplers.0", kind))
    renamed = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out",
               "time_embed.0": "time_embedding.linear_1",
               "time_embed.2": "time_embedding.linear_2"}  # fmt: skip
    keys = {f"{k}.{p}": [f"{v}.{p}"] for k, v in renamed.items() for p in ("weight", "bias")}
    for mine, theirs, kind in pairs:
        for p in ("weight", "bias"):
            if kind == "conv":
                keys[f"{mine}.conv.{p}"] = [f"{theirs}.conv.{p}"]
            elif kind == "res":
                for a, b in res_keys.items():
                    if f"{theirs}.{a}.{p}" in src:
                        keys[f"{mine}.{b}.{p}"] = [f"{theirs}.{a}.{p}"]
            else:
                keys[f"{mine}.norm.{p}"] = [f"{theirs}.group_norm.{p}"]
                keys[f"{mine}.qkv.{p}"] = [f"{theirs}.to_{c}.{p}" for c in "qkv"]
                keys[f"{mine}.proj_out.{p}"] = [f"{theirs}.to_out.0.{p}"]
    model.load_state_dict({k: torch.cat([src[n] for n in v]) for k, v in keys.items()}, strict=True)
    return keys


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(use_scale_shift_norm=False, num_res_blocks=2, learn_sigma=True),
        dict(
            image_size=16,
            channel_mult=(1, 2, 2),
            attention_resolutions=(16, 8, 4),
            resblock_updown=True,
        ),  # fmt: skip
    ],
)
def test_matches_diffusers_unet2d_with_same_weights(overrides):
    diffusers = pytest.importorskip("diffusers")
    bench = Path(__file__).parents[2] / "bench" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the benchmark's config mapping is what is tested here
    diffusers_kwargs = module.diffusers_kwargs

    cfg = tiny_config(dropout=0.0, **overrides)
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**diffusers_kwargs(cfg)).eval()
    with torch.no_grad():  # diffusers zero-inits nothing; make every layer non-trivial anyway
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = UNet(cfg).eval()
    keys = _port_from_diffusers(model, ref)
    x, t, _ = inputs(cfg, batch=3)
    x_ref, x_mine = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = ref(x_ref, t).sample
    out = model(x_mine, t)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), (out - expected).abs().max()
    # the backward passes agree too (difflab's fused/folded fast paths included)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (expected * weight).sum().backward()
    (out * weight).sum().backward()
    assert torch.allclose(x_mine.grad, x_ref.grad, atol=1e-4, rtol=1e-3)
    ref_params = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        grad = torch.cat([ref_params[n].grad for n in keys[name]])
        assert torch.allclose(param.grad, grad, atol=1e-4, rtol=1e-3), name
