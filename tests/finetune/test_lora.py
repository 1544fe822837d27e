"""LoRA adapters: exact maths, scale / fuse / unfuse, targets, and loud, round-tripping files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from difflab.finetune import (
    LORA_FORMAT,
    LoRALayer,
    add_lora,
    fuse_lora,
    load_lora,
    lora_layers,
    remove_lora,
    save_lora,
    set_lora_scale,
    unfuse_lora,
)
from difflab.models import UNet, UNetConfig


def _randomise_up(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.1)


def _unet(**kw):
    cfg = dict(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(4,), num_heads=2, norm_groups=4,
               num_classes=3)  # fmt: skip
    model = UNet(UNetConfig(**{**cfg, **kw}), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # switch off the zero-initialised outputs so every layer matters
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return model.eval()


def _inputs(b=2):
    g = torch.Generator().manual_seed(5)
    return torch.randn(b, 1, 8, 8, generator=g), torch.tensor([100.0, 700.0])[:b]


@pytest.mark.parametrize(
    "base",
    [nn.Linear(12, 10), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Conv2d(6, 8, 1)],
    ids=["linear", "conv3x3-stride2", "conv1x1"],
)
def test_layer_equals_base_with_the_low_rank_update_added(base):
    """Hu et al. eq. 3: h = W0 x + (α/r) B A x, i.e. the base op with W0 + (α/r) B A."""
    layer = LoRALayer(base, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 12) if isinstance(base, nn.Linear) else torch.randn(2, 6, 9, 9)
    assert torch.equal(layer(x), base(x))  # up starts at zero
    _randomise_up(nn.ModuleList([layer]))
    w = base.weight + layer.delta_weight()
    if isinstance(base, nn.Linear):
        expected = F.linear(x, w, base.bias)
    else:
        expected = F.conv2d(x, w, base.bias, base.stride, base.padding)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    up, down = layer.lora_up.weight.flatten(1), layer.lora_down.weight.flatten(1)
    torch.testing.assert_close(layer.delta_weight().flatten(1), 2.0 * up @ down)  # α/r = 2
    assert not base.weight.requires_grad
    assert layer.lora_down.weight.requires_grad and layer.lora_up.weight.requires_grad


def test_rslora_scales_by_alpha_over_root_rank():
    layer = LoRALayer(nn.Linear(16, 16), rank=4, alpha=8.0, rslora=True)
    assert layer.scale == pytest.approx(8.0 / 2.0)
    layer.multiplier = 0.5
    assert layer.scale == pytest.approx(2.0)


def test_scale_zero_is_the_base_network_and_scale_is_linear():
    model = _unet()
    x, t = _inputs()
    labels = torch.tensor([0, 2])
    base = model(x, t, class_labels=labels)
    add_lora(model, rank=2, targets="attention+conv", generator=torch.Generator().manual_seed(0))
    _randomise_up(model)
    full = model(x, t, class_labels=labels)
    assert not torch.allclose(full, base, atol=1e-4)
    set_lora_scale(model, 0.0)
    assert torch.equal(model(x, t, class_labels=labels), base)
    # The multiplier scales each layer's update linearly.
    layer = next(mod for _, mod in lora_layers(model) if isinstance(mod.base, nn.Conv2d))
    h = torch.randn(2, layer.base.in_channels, 4, 4)
    outs = {}
    for m in (0.0, 0.5, 1.0):
        layer.multiplier = m
        outs[m] = layer(h)
    torch.testing.assert_close(outs[0.5] - outs[0.0], 0.5 * (outs[1.0] - outs[0.0]))


def test_fuse_matches_unfused_and_unfuse_restores_base_bit_for_bit():
    model = _unet()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    x, t = _inputs()
    add_lora(model, rank=3, targets="attention+conv")
    _randomise_up(model)
    unfused = model(x, t)
    fuse_lora(model)
    torch.testing.assert_close(model(x, t), unfused, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unfuse_lora"):
        set_lora_scale(model, 0.5)
    unfuse_lora(model)
    torch.testing.assert_close(model(x, t), unfused, rtol=0, atol=0)
    names = remove_lora(model)
    assert names and not list(lora_layers(model))
    after = model.state_dict()
    assert after.keys() == originals.keys()
    assert all(torch.equal(after[k], originals[k]) for k in originals)


def test_targets_select_the_expected_layers():
    model = _unet()
    attention = add_lora(model, rank=2, targets="attention")
    assert attention and all(n.endswith((".qkv", ".proj_out")) for n in attention)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{n}.lora_{part}.weight" for n in attention for part in ("down", "up")
    ]
    conv = add_lora(_unet(), rank=2, targets="conv")
    assert conv and all(n.rsplit(".", 1)[-1] in ("conv1", "conv2", "skip") for n in conv)
    cross = add_lora(_unet(context_dim=8), rank=2, targets="attention")
    assert any(n.endswith("cross_attn.to_kv") for n in cross)
    with pytest.raises(ValueError, match="match no linear or conv layer"):
        add_lora(_unet(), targets=["*.nothing"])
    with pytest.raises(ValueError, match="unknown LoRA target set"):
        add_lora(_unet(), targets="attn")
    with pytest.raises(ValueError, match="rank must be in"):
        add_lora(_unet(), rank=1000)
    twice = _unet()
    add_lora(twice, targets=["*.qkv"])
    with pytest.raises(ValueError, match="already inside a LoRA layer"):
        add_lora(twice, targets=["*.qkv.base"])


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_adapting_a_layer_that_is_not_linear_or_conv2d_is_a_type_error(kind):
    # An embedding has neither in_features nor in_channels: the message names what is
    # allowed (this was an AttributeError on 'in_channels' before the check came first).
    from difflab.finetune import LoHaLayer, LoKrLayer

    cls = {"lora": LoRALayer, "loha": LoHaLayer, "lokr": LoKrLayer}[kind]
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d, not Embedding"):
        cls(nn.Embedding(3, 4), 2)


def test_save_load_save_round_trip_reproduces_the_outputs(tmp_path):
    model = _unet()
    add_lora(model, rank=2, alpha=4.0, targets="attention+conv", rslora=True)
    _randomise_up(model)
    x, t = _inputs()
    expected = model(x, t)
    first = save_lora(model, tmp_path / "a.safetensors", metadata={"base_run": "runs/demo"})

    fresh = _unet()
    report = load_lora(fresh, first)
    assert report.applied == [n for n, _ in lora_layers(model)]
    assert not report.unmatched and not report.mismatched
    torch.testing.assert_close(fresh(x, t), expected, rtol=0, atol=0)
    second = save_lora(fresh, tmp_path / "b.safetensors", metadata={"base_run": "runs/demo"})
    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
        meta = a.metadata()
    assert meta["format"] == LORA_FORMAT and meta["rank"] == "2" and float(meta["alpha"]) == 4.0
    assert json.loads(meta["rslora"]) is True and meta["base_run"] == "runs/demo"
    half = _unet()
    load_lora(half, first, scale=0.0)
    torch.testing.assert_close(half(x, t), _unet()(x, t), rtol=0, atol=0)


def test_loading_is_loud_and_all_or_nothing(tmp_path):
    source = _unet(context_dim=8)
    add_lora(source, rank=2, targets="attention")
    path = save_lora(source, tmp_path / "cross.safetensors")
    target = _unet()  # no cross-attention: the cross_attn layers are not there
    with pytest.raises(ValueError, match="not in this network: .*cross_attn.to_kv"):
        load_lora(target, path)
    assert not list(lora_layers(target))  # nothing was applied
    report = load_lora(target, path, strict=False)
    assert report.applied and any("cross_attn" in n for n in report.unmatched)
    assert "not in this network" in str(report)

    wide = _unet(model_channels=32, norm_groups=8)
    small = _unet()
    add_lora(small, rank=2, targets="attention")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lora(wide, save_lora(small, tmp_path / "small.safetensors"))
    with pytest.raises(FileNotFoundError):
        load_lora(wide, tmp_path / "missing.safetensors")


# --- DoRA (Liu et al. 2024) -------------------------------------------------------------
def _dora(base, seed=0):
    layer = LoRALayer(base, rank=2, alpha=2.0, dora=True,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.3)
        layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude.shape, generator=g))
    return layer


def _expected(base, weight, x):
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding)


@pytest.mark.parametrize(
    "base", [nn.Linear(12, 10), nn.Conv2d(6, 8, 3, stride=2, padding=1)], ids=["linear", "conv"]
)
def test_dora_is_magnitude_times_normalised_direction(base):
    """Liu et al. eq. 5: W' = m · (W0 + ΔW) / ‖W0 + ΔW‖, the norm per output unit."""
    x = torch.randn(4, 12) if isinstance(base, nn.Linear) else torch.randn(2, 6, 9, 9)
    fresh = LoRALayer(base, rank=2, dora=True)
    torch.testing.assert_close(fresh(x), base(x), rtol=1e-6, atol=1e-6)  # starts as identity
    layer = _dora(base)
    v = base.weight + layer.delta_weight()
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    mag = layer.lora_magnitude.view_as(norm)
    torch.testing.assert_close(layer(x), _expected(base, mag * v / norm, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merged_weight(), mag * v / norm)
    # The multiplier scales ΔW and the magnitude change alike; 0 is the base layer exactly.
    layer.multiplier = 0.5
    v_half = base.weight + layer.delta_weight()
    m0 = base.weight.flatten(1).norm(dim=1).view_as(norm)
    mag_half = m0 + 0.5 * (mag - m0)
    norm_half = v_half.flatten(1).norm(dim=1).view_as(norm)
    torch.testing.assert_close(layer(x), _expected(base, mag_half * v_half / norm_half, x),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    layer.multiplier = 0.0
    assert torch.equal(layer(x), base(x))


def test_dora_trains_its_magnitude_fuses_and_round_trips(tmp_path):
    model = _unet()
    x, t = _inputs()
    add_lora(model, rank=2, targets="attention+conv", dora=True)
    layers = [layer for _, layer in lora_layers(model)]
    assert all(layer.dora for layer in layers)
    _randomise_up(model)
    model(x, t).square().mean().backward()
    assert all(layer.lora_magnitude.grad is not None for layer in layers)
    assert any(layer.lora_magnitude.grad.abs().sum() > 0 for layer in layers)
    with torch.no_grad():
        for layer in layers:
            layer.lora_magnitude.mul_(1.1)
    expected = model(x, t).detach()
    originals = [layer.base.weight.detach().clone() for layer in layers]
    fuse_lora(model)
    torch.testing.assert_close(model(x, t), expected, rtol=1e-4, atol=1e-5)
    unfuse_lora(model)
    assert all(torch.equal(layer.base.weight, w) for layer, w in zip(layers, originals))

    path = save_lora(model, tmp_path / "dora.safetensors")
    fresh = _unet()
    load_lora(fresh, path)
    torch.testing.assert_close(fresh(x, t), expected, rtol=0, atol=0)
    with safe_open(str(path), "pt") as fh:
        assert json.loads(fh.metadata()["dora"]) is True
        keys = list(fh.keys())
    assert sum(k.endswith(".lora_magnitude") for k in keys) == len(layers)
