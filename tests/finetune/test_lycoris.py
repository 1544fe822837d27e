"""Adapter files from other tools: kohya LoRA / LoCon, LyCORIS LoHa / LoKr, diffusers / PEFT.

References, run side by side on the same tiny random diffusers U-Net and transformers CLIP
text model: diffusers' ``load_lora_weights`` (kohya files), peft's LoRA / LoHa / LoKr layers.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from difflab.finetune import add_lora, lora_layers
from difflab.finetune.lycoris import (
    AdapterLayer,
    AdapterSet,
    AdapterTarget,
    adapter_delta,
    clip_text_name_map,
    save_kohya,
)

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
UNET_LAYERS = [
    f"{ATTN}.attn1.to_q",
    f"{ATTN}.attn1.to_out.0",
    f"{ATTN}.attn2.to_k",  # cross-attention: 16 -> 8
    f"{ATTN}.ff.net.0.proj",
    "mid_block.attentions.0.proj_in",  # 1x1 conv
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv (LoCon)
    "down_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.1.resnets.0.time_emb_proj",
]
TE_LAYERS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]


def _unet() -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
            out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
            norm_num_groups=4, attention_head_dim=4,
        ).eval()  # fmt: skip


def _clip() -> transformers.CLIPTextModel:
    cfg = transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return transformers.CLIPTextModel(cfg).eval()


_G = torch.Generator().manual_seed(5)
X, T, CTX = torch.randn(2, 4, 8, 8, generator=_G), torch.tensor([10, 500]), torch.randn(2, 5, 16)
IDS = torch.tensor([[0, 5, 6, 7, 1]])


@torch.no_grad()
def _out(unet: nn.Module) -> torch.Tensor:
    return unet(X, T, CTX).sample


@torch.no_grad()
def _text(te: nn.Module) -> torch.Tensor:
    return te(IDS).last_hidden_state


def _kohya_lora(unet, te=None, *, seed=1, rank=2, alpha=3.0) -> dict[str, torch.Tensor]:
    """Random kohya LoRA / LoCon tensors for UNET_LAYERS (and TE_LAYERS)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    pairs = [("lora_unet_", unet, name) for name in UNET_LAYERS]
    if te is not None:
        pairs += [("lora_te_text_model_", te, name) for name in TE_LAYERS]
    for prefix, model, name in pairs:
        w = model.get_submodule(name).weight
        key = prefix + name.replace(".", "_")
        up_tail = [1, 1] if w.dim() == 4 else []
        out[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        out[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *up_tail, generator=g) * 0.3
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


class _Pipe(StableDiffusionLoraLoaderMixin):
    """The two networks diffusers' SD1 LoRA loader reads into (no VAE or tokenizer needed)."""

    hf_device_map = None

    def __init__(self, unet, text_encoder):
        self.unet, self.text_encoder = unet, text_encoder
        self.components = {"unet": unet, "text_encoder": text_encoder}


def _peft_text_lora(te, state, rank=2, alpha=3.0):
    """peft LoRA on the CLIP model with the kohya file's text-encoder tensors."""
    ref = copy.deepcopy(te)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TE_LAYERS, init_lora_weights=False)
    inject_adapter_in_model(cfg, ref)
    with torch.no_grad():
        for name in TE_LAYERS:
            key = "lora_te_text_model_" + name.replace(".", "_")
            layer = ref.get_submodule(name)
            layer.lora_A["default"].weight.copy_(state[f"{key}.lora_down.weight"])
            layer.lora_B["default"].weight.copy_(state[f"{key}.lora_up.weight"])
    return ref


def test_kohya_lora_equals_diffusers_and_peft(tmp_path):
    """A kohya LoRA/LoCon file: U-Net as diffusers' load_lora_weights, CLIP as peft's LoRA."""
    unet, te = _unet(), _clip()
    base_out, base_text = _out(unet), _text(te)
    state = _kohya_lora(unet, te)
    path = tmp_path / "style.safetensors"
    save_file(state, str(path))
    ref_unet = copy.deepcopy(unet)
    _Pipe(ref_unet, copy.deepcopy(te)).load_lora_weights(str(path))
    ref_te = _peft_text_lora(te, state)

    adapters = AdapterSet({"unet": unet, "text_encoder": te})
    report = adapters.load(path)
    assert report.name == "style" and report.kinds == {"lora": len(UNET_LAYERS) + len(TE_LAYERS)}
    assert sorted(report.applied) == sorted(
        [f"unet:{n}" for n in UNET_LAYERS] + [f"text_encoder:{n}" for n in TE_LAYERS]
    )
    assert (_out(ref_unet) - base_out).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(_out(unet), _out(ref_unet), atol=1e-5, rtol=0)
    torch.testing.assert_close(_text(te), _text(ref_te), atol=1e-5, rtol=0)
    assert (_text(te) - base_text).abs().max() > 1e-2


def _lycoris_state(peft_model, names, kind):
    """peft LoHa / LoKr tensors written in LyCORIS' kohya-style key layout."""
    out = {}
    for name in names:
        layer = peft_model.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        params = [p for p in vars(layer)["_modules"] if p.startswith(("hada_", "lokr_"))]
        tensors = {p: getattr(layer, p)["default"] for p in params if getattr(layer, p)}
        alpha = float(layer.alpha["default"])
        if kind == "lokr" and "lokr_w1" in tensors and "lokr_w2" in tensors:
            # LyCORIS ignores alpha when both factors are whole; peft still scales by α/r.
            tensors["lokr_w1"] = tensors["lokr_w1"] * layer.scaling["default"]
        for p, v in tensors.items():
            out[f"{key}.{p}"] = v.detach().clone()
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_file_equals_peft(kind):
    """LoHa / LoKr (whole, decomposed and Tucker factors) as peft computes them."""
    unet = _unet()
    names = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn1.to_k", "down_blocks.0.resnets.0.conv1",
             "down_blocks.1.resnets.0.time_emb_proj", "mid_block.attentions.0.proj_in"]  # fmt: skip
    opts = dict(r=1, alpha=3, target_modules=names, init_weights=False, use_effective_conv2d=True,
                rank_pattern={"attn1.to_k": 8, "time_emb_proj": 2})  # fmt: skip
    cfg = LoHaConfig(**opts) if kind == "loha" else LoKrConfig(**opts, decompose_both=True)
    ref = copy.deepcopy(unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        inject_adapter_in_model(cfg, ref)
    state = _lycoris_state(ref, names, kind)
    if kind == "lokr":  # each LyCORIS form is exercised
        for part in ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a", "lokr_t2"):
            assert any(k.endswith("." + part) for k in state), part
    else:
        assert any(k.endswith(".hada_t1") for k in state)
    adapters = AdapterSet({"unet": unet})
    report = adapters.load(state, name=kind)
    assert report.kinds == {kind: len(names)}
    assert (_out(ref) - _out(_unet())).abs().max() > 1e-3
    torch.testing.assert_close(_out(unet), _out(ref), atol=1e-5, rtol=0)


def test_lokr_alpha_applies_only_with_a_decomposed_factor():
    """LyCORIS: kron(w1, w2) as is when both are whole; α/r when w2 = a @ b (r = 2)."""
    w1, w2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    whole = adapter_delta("lokr", {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(4.0)})
    assert torch.equal(whole, torch.tensor([[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 2.0, 0.0]]))
    a, b = torch.eye(2), w2
    split = adapter_delta("lokr", {"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b,
                                   "alpha": torch.tensor(4.0)})  # fmt: skip
    torch.testing.assert_close(split, 2.0 * whole)


def test_tucker_locon_equals_its_three_convolutions():
    """LoCon with lora_mid: ΔW applied as one conv == 1x1 down, 3x3 mid, 1x1 up in turn."""
    g = torch.Generator().manual_seed(0)
    down, mid = torch.randn(2, 6, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    up = torch.randn(5, 2, 1, 1, generator=g)
    delta = adapter_delta("lora", {"lora_down.weight": down, "lora_mid.weight": mid,
                                   "lora_up.weight": up, "alpha": torch.tensor(1.0)})  # fmt: skip
    x = torch.randn(1, 6, 7, 7, generator=g)
    conv = torch.nn.functional.conv2d
    seq = conv(conv(conv(x, down), mid, padding=1), up) / 2  # α / r = 1/2
    torch.testing.assert_close(conv(x, delta, padding=1), seq, atol=1e-5, rtol=0)


def test_diffusers_peft_file_with_metadata_alphas_equals_peft(tmp_path):
    """A diffusers-saved PEFT LoRA (lora_A / lora_B, alpha in lora_adapter_metadata)."""
    unet = _unet()
    ref = copy.deepcopy(unet)
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "to_v", "conv1"],
                     alpha_pattern={"conv1": 1}, init_lora_weights=False)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        ref.add_adapter(cfg)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(ref),
        unet_lora_adapter_metadata=cfg.to_dict(),
    )  # fmt: skip
    adapters = AdapterSet({"unet": unet})
    report = adapters.load(tmp_path / "pytorch_lora_weights.safetensors")
    assert report.kinds["lora"] == len(report.applied) > 0
    torch.testing.assert_close(_out(unet), _out(ref), atol=1e-5, rtol=0)


def test_scale_fuse_unfuse_and_two_adapters_add_up():
    """scale 0 == base; fused == unfused; unfuse is bit-exact; two adapters' updates add."""
    unet = _unet()
    base_out = _out(unet)
    weights0 = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters = AdapterSet({"unet": unet})
    adapters.load(_kohya_lora(unet, seed=1), name="a")
    adapters.load(_kohya_lora(unet, seed=2, rank=3, alpha=1.0), name="b", scale=0.5)
    layer = unet.get_submodule(f"{ATTN}.attn1.to_q")
    assert isinstance(layer, AdapterLayer) and set(layer.multipliers) == {"a", "b"}
    expected = 0.7 * layer.adapter_weight("a") - 2.0 * layer.adapter_weight("b")
    adapters.set_scale("a", 0.7)
    adapters.set_scale("b", -2.0)
    torch.testing.assert_close(layer.delta_weight(), expected)
    both = _out(unet)
    adapters.fuse()
    torch.testing.assert_close(_out(unet), both, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base.weight, weights0[f"{ATTN}.attn1.to_q.weight"] + expected)
    adapters.set_scale("b", 0.0)  # a fused weight follows its scales
    fused_a = _out(unet)
    adapters.unfuse()
    torch.testing.assert_close(_out(unet), fused_a, atol=1e-5, rtol=0)
    adapters.set_scale("a", 0.0)
    torch.testing.assert_close(_out(unet), base_out, atol=0, rtol=0)
    adapters.set_scale("a", 1.0)
    adapters.fuse()
    adapters.unfuse()
    adapters.remove("a")
    adapters.remove("b")
    assert adapters.names == [] and not any(isinstance(m, AdapterLayer) for m in unet.modules())
    after = unet.state_dict()
    assert set(after) == set(weights0)
    assert all(torch.equal(after[k], v) for k, v in weights0.items())
    assert torch.equal(_out(unet), base_out)


def test_a_file_for_another_model_raises_listing_its_keys():
    """Unknown modules and shape mismatches are listed; nothing is applied unless strict=False."""
    unet = _unet()
    state = _kohya_lora(unet)
    state["lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight"] = torch.zeros(2, 8, 3, 3)
    state["lora_unet_down_blocks_9_resnets_0_conv1.lora_up.weight"] = torch.zeros(8, 2, 1, 1)
    q = f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q"
    state[f"{q}.lora_down.weight"] = torch.zeros(2, 320)  # an SD1-sized layer
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 16)
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(32, 2)
    adapters = AdapterSet({"unet": unet})
    with pytest.raises(ValueError) as err:
        adapters.load(state, name="other")
    msg = str(err.value)
    assert "down_blocks_9_resnets_0_conv1.lora_down.weight" in msg
    assert f"{q}.lora_down.weight" in msg and "(8, 320)" in msg and "(8, 8)" in msg
    assert "no text_encoder given" in msg
    assert not any(isinstance(m, AdapterLayer) for m in unet.modules()) and adapters.names == []
    report = adapters.load(state, name="other", strict=False)
    assert len(report.applied) == len(UNET_LAYERS) - 1 and len(report.unmatched) == 2
    assert len(report.mismatched) == 1


def test_kohya_names_resolve_through_the_known_module_names():
    """'_' is ambiguous: names are matched by converting each known one; clashes are reported."""
    model = nn.Module()
    model.add_module("to_out", nn.ModuleList([nn.Linear(3, 3)]))
    model.add_module("a_b", nn.Module())
    model.a_b.add_module("c", nn.Linear(3, 3))
    model.add_module("a", nn.Module())
    model.a.add_module("b_c", nn.Linear(3, 3))
    lora = {"lora_down.weight": torch.ones(1, 3), "lora_up.weight": torch.ones(3, 1)}
    state = {f"lora_unet_to_out_0.{k}": v for k, v in lora.items()}
    state |= {f"lora_unet_a_b_c.{k}": v for k, v in lora.items()}
    report = AdapterSet({"unet": model}).load(state, strict=False)
    assert report.applied == ["unet:to_out.0"]
    assert any("ambiguous" in u and "a_b_c" in u for u in report.unmatched)
    # through a name map: external (diffusers) names -> the network's own
    mapped = AdapterTarget(model, {"x.to_out.0": "to_out.0"})
    state = {f"lora_unet_x_to_out_0.{k}": v for k, v in lora.items()}
    assert AdapterSet({"unet": mapped}).load(state).applied == ["unet:to_out.0"]


def test_save_kohya_loads_in_diffusers_with_the_same_output(tmp_path):
    """difflab LoRALayer adapters written in kohya layout: diffusers and difflab read them back."""
    unet, te = _unet(), _clip()
    add_lora(unet, rank=2, alpha=3.0, targets=["*attn1.to_q", "*attn2.to_k", "*resnets.0.conv1"],
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    add_lora(te, rank=2, alpha=1.0, targets=["*q_proj"], rslora=True,
             generator=torch.Generator().manual_seed(1))  # fmt: skip
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in [*lora_layers(unet), *lora_layers(te)]:
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g))
    path = save_kohya(tmp_path / "mine.safetensors", {"unet": unet, "text_encoder": te})
    with safe_open(str(path), framework="pt") as fh:
        meta, keys = fh.metadata(), set(fh.keys())
    assert meta["ss_network_dim"] == "2" and meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    assert f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q.alpha" in keys
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight" in keys

    fresh_unet, fresh_te = _unet(), _clip()
    ref_unet = copy.deepcopy(fresh_unet)
    # diffusers reads kohya text-encoder attention keys into transformers 4 names only: U-Net
    unet_only = save_kohya(tmp_path / "unet.safetensors", {"unet": unet})
    _Pipe(ref_unet, copy.deepcopy(fresh_te)).load_lora_weights(str(unet_only))
    torch.testing.assert_close(_out(ref_unet), _out(unet), atol=1e-5, rtol=0)
    report = AdapterSet({"unet": fresh_unet, "text_encoder": fresh_te}).load(path)
    assert report.kinds == {"lora": len([*lora_layers(unet), *lora_layers(te)])} == {"lora": 15}
    torch.testing.assert_close(_out(fresh_unet), _out(unet), atol=1e-5, rtol=0)
    torch.testing.assert_close(_text(fresh_te), _text(te), atol=1e-5, rtol=0)


def test_clip_name_map_gives_the_adapter_files_text_model_names():
    te = _clip()
    name_map = clip_text_name_map(te)
    assert name_map["text_model.encoder.layers.0.self_attn.q_proj"] == TE_LAYERS[0]
    with_projection = transformers.CLIPTextModelWithProjection(te.config)
    name_map = clip_text_name_map(with_projection)
    assert name_map["text_model.encoder.layers.0.self_attn.q_proj"].startswith("text_model.")
    assert name_map["text_projection"] == "text_projection"
