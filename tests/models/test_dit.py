"""DiT (Peebles & Xie 2023): shapes, adaLN-Zero identity init, patch locality, the fixed
position embedding, conditioning, batch invariance, checkpointing, configs, LoRA, and a
tiny training run that resumes exactly and samples through ``Pipeline.from_run``."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import ToyData, tiny_config, train_with_a_cut  # noqa: E402

from difflab.data import digits_caption  # noqa: E402
from difflab.finetune import add_lora, lora_layers  # noqa: E402
from difflab.models import (  # noqa: E402
    DiT,
    DiTConfig,
    UNetConfig,
    build_model,
    model_config_from_dict,
)
from difflab.models.dit import sincos_pos_embed_2d  # noqa: E402
from difflab.pipeline import Pipeline  # noqa: E402
from difflab.train import load_checkpoint, load_config, train  # noqa: E402


def tiny(**overrides) -> DiTConfig:
    return DiTConfig.preset("tiny", **overrides)


def perturbed(cfg: DiTConfig, seed: int = 0, scale: float = 0.1) -> DiT:
    """A DiT whose zero-initialised layers are perturbed, so every input matters."""
    model = DiT(cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs(cfg: DiTConfig, batch: int = 2, h: int | None = None, w: int | None = None):
    g = torch.Generator().manual_seed(1)
    h, w = h or cfg.image_size, w or cfg.image_size
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 999
    kw = {}
    if cfg.num_classes is not None:
        kw["class_labels"] = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    if cfg.context_dim is not None:
        kw["context"] = torch.randn(batch, 5, cfg.context_dim, generator=g)
    return x, t, kw


@pytest.mark.parametrize(
    "num_classes,context_dim,learn_sigma", list(itertools.product([None, 4], [None, 12], [0, 1]))
)
def test_output_shape_every_option(num_classes, context_dim, learn_sigma):
    cfg = tiny(num_classes=num_classes, context_dim=context_dim, learn_sigma=bool(learn_sigma))
    model = perturbed(cfg)
    x, t, kw = inputs(cfg, h=8, w=12)  # a non-square grid of another size than training
    out = model(x, t, **kw)
    assert out.shape == (2, cfg.in_channels * (2 if learn_sigma else 1), 8, 12)
    assert torch.isfinite(out).all()


def test_fresh_model_outputs_exactly_zero_and_blocks_are_identity():
    cfg = tiny(num_classes=4, context_dim=12, learn_sigma=True)
    model = DiT(cfg, generator=torch.Generator().manual_seed(0))
    x, t, kw = inputs(cfg)
    assert torch.equal(model(x, t, **kw), torch.zeros(2, 2, 8, 8))
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(tokens, c, kw["context"], None), tokens)


def test_init_depends_only_on_the_generator_and_not_on_global_rng():
    cfg = tiny(num_classes=4, context_dim=12)
    torch.manual_seed(0)
    a = DiT(cfg, generator=torch.Generator().manual_seed(3)).state_dict()
    torch.manual_seed(1)  # nn layers draw their defaults from here; initialize_weights not
    b = DiT(cfg, generator=torch.Generator().manual_seed(3)).state_dict()
    c = DiT(cfg, generator=torch.Generator().manual_seed(4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.to_qkv.weight"], c["blocks.0.attn.to_qkv.weight"])
    # Xavier-uniform bound sqrt(6 / (fan_in + fan_out)) on the qkv projection (32 -> 96)
    assert a["blocks.0.attn.to_qkv.weight"].abs().max() <= (6 / (32 + 96)) ** 0.5
    # the paper's zero-initialised layers (and the cross-attention's output projection)
    zeroed = [
        "blocks.1.adaLN_modulation.weight",
        "blocks.1.cross_attn.to_out.weight",
        "final.adaLN_modulation.bias",
        "final.linear.weight",
        "final.linear.bias",
    ]
    for key in zeroed:
        assert not a[key].any(), key


def test_each_output_patch_depends_only_on_its_input_patch_at_init_of_the_blocks():
    """With identity blocks (adaLN-Zero) the network maps each patch to itself: changing
    one pixel changes exactly the output patch that holds it (patchify/unpatchify agree)."""
    cfg = tiny(patch_size=2)
    model = DiT(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.final.linear.weight.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 1, 8, 12, generator=torch.Generator().manual_seed(2))
    base = model(x, 10.0)
    for r, c in [(0, 0), (3, 10), (7, 5)]:
        y = x.clone()
        y[0, 0, r, c] += 1.0
        changed = (model(y, 10.0) - base).abs()[0, 0] > 0
        expect = torch.zeros(8, 12, dtype=torch.bool)
        expect[r - r % 2 : r - r % 2 + 2, c - c % 2 : c - c % 2 + 2] = True
        assert torch.equal(changed, expect), (r, c)


def test_sincos_position_embedding_known_values_and_translation_invariance():
    d, h, w = 16, 3, 5
    pos = sincos_pos_embed_2d(d, h, w)
    assert pos.shape == (15, 16) and pos.dtype == torch.float64
    omega = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    row, col = 2, 3  # token index row * w + col
    expect = torch.cat([(col * omega).sin(), (col * omega).cos(), (row * omega).sin(),
                        (row * omega).cos()])  # fmt: skip
    torch.testing.assert_close(pos[row * w + col], expect)

    # <e(a), e(b)> = sum_i cos((ca - cb) w_i) + cos((ra - rb) w_i): depends on the offset only
    def dot(a, b):
        return float(pos[a[0] * w + a[1]] @ pos[b[0] * w + b[1]])

    assert dot((0, 0), (1, 2)) == pytest.approx(dot((1, 2), (2, 4)))
    offset = float(torch.cos(2 * omega).sum() + torch.cos(1 * omega).sum())
    assert dot((0, 1), (1, 3)) == pytest.approx(offset)


def test_class_labels_change_the_output_and_none_is_the_null_label():
    cfg = tiny(num_classes=4)
    model = perturbed(cfg)
    assert model.null_class_label == 4
    x, t, _ = inputs(cfg)
    with torch.no_grad():
        a = model(x, t, class_labels=torch.tensor([0, 1]))
        b = model(x, t, class_labels=torch.tensor([2, 3]))
        null = model(x, t, class_labels=torch.tensor([4, 4]))
        default = model(x, t)
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(null, default)
    with pytest.raises(AttributeError, match="null_class_label"):  # getattr(m, ..., None)
        _ = perturbed(tiny()).null_class_label


def test_context_changes_the_output_and_the_mask_equals_dropping_tokens():
    cfg = tiny(context_dim=12)
    model = perturbed(cfg)
    x, t, kw = inputs(cfg)
    ctx = kw["context"]
    keep = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    with torch.no_grad():
        masked = model(x, t, context=ctx, context_mask=keep)
        for i in range(2):
            alone = model(x[i : i + 1], t[i : i + 1], context=ctx[i : i + 1, keep[i]])
            torch.testing.assert_close(masked[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        other = model(x, t, context=torch.randn(2, 5, 12))
    assert not torch.allclose(model(x, t, context=ctx), other, atol=1e-4)


def test_batch_of_four_equals_four_single_runs():
    cfg = tiny(num_classes=4, context_dim=12, learn_sigma=True)
    model = perturbed(cfg)
    x, t, kw = inputs(cfg, batch=4)
    with torch.no_grad():
        batched = model(x, t, **kw)
        for i in range(4):
            single = model(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in kw.items()})
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = tiny(num_classes=4, context_dim=12)
    x, t, kw = inputs(cfg)
    grads = []
    for flag in (False, True):
        model = perturbed(cfg).train()
        model.set_gradient_checkpointing(flag)
        assert model.config.use_checkpoint is flag
        model(x, t, **kw).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7)


def test_input_and_config_errors_are_clear():
    model = perturbed(tiny(num_classes=4))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 1, 7, 8), 1.0)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(torch.randn(1, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="context given"):
        model(torch.randn(1, 1, 8, 8), 1.0, context=torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny(hidden_size=30, num_heads=1)
    with pytest.raises(ValueError, match="patch_size"):
        tiny(image_size=9)
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        DiTConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ValueError, match="did you mean 'S/2'"):
        DiTConfig.preset("S2")


@pytest.mark.parametrize("name", ["tiny", "digits", "cifar10", "S/2", "XL/2"])
def test_config_round_trip_through_the_model_section(name):
    cfg = DiTConfig.preset(name, num_classes=10)
    data = cfg.to_dict()
    assert data["arch"] == "dit"
    assert model_config_from_dict(data) == cfg == DiTConfig.from_dict(data)
    assert model_config_from_dict({"arch": "dit", "preset": name, "num_classes": 10}) == cfg


def test_paper_sizes_match_table_1():
    """DiT-S/B/L/XL: (depth, hidden, heads) = (12, 384, 6), (12, 768, 12), (24, 1024, 16),
    (28, 1152, 16); XL/2 has ~675M parameters (Peebles & Xie 2023, Table 1/4)."""
    shapes = {n: (c.depth, c.hidden_size, c.num_heads)
              for n in ("S/2", "B/2", "L/2", "XL/2") for c in [DiTConfig.preset(n)]}  # fmt: skip
    assert shapes == {"S/2": (12, 384, 6), "B/2": (12, 768, 12), "L/2": (24, 1024, 16),
                      "XL/2": (28, 1152, 16)}  # fmt: skip
    with torch.device("meta"):
        xl = DiT(DiTConfig.preset("XL/2", num_classes=1000, learn_sigma=True))
    n = sum(p.numel() for p in xl.parameters())
    assert 670e6 < n < 680e6  # ours has no qkv biases: 28 * 3 * 1152 fewer than the paper's


def test_build_model_dispatches_on_the_config_and_arch():
    assert type(build_model(tiny())) is DiT
    unet_cfg = model_config_from_dict({"preset": "tiny"})
    assert isinstance(unet_cfg, UNetConfig)
    with pytest.raises(ValueError, match="unknown model.arch 'dt'; did you mean 'dit'"):
        model_config_from_dict({"arch": "dt"})


def test_lora_wraps_the_attention_and_mlp_projections():
    cfg = tiny(num_classes=4, context_dim=12)
    model = perturbed(cfg)
    x, t, kw = inputs(cfg)
    before = model(x, t, **kw)
    names = add_lora(model, rank=2, targets="attention", generator=torch.Generator())
    for sub in ("attn.to_qkv", "attn.to_out", "cross_attn.to_q", "cross_attn.to_kv",
                "mlp.fc1", "mlp.fc2", "adaLN_modulation"):  # fmt: skip
        assert f"blocks.1.{sub}" in names, sub
    assert "x_embed" not in names and "final.linear" not in names
    torch.testing.assert_close(model(x, t, **kw), before)  # lora_up starts at zero
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_up.weight.normal_(generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(model(x, t, **kw), before, atol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


# --- training ---------------------------------------------------------------------------

DIT_RUN = ["model={arch: dit, preset: tiny, num_classes: 4, hidden_size: 16, num_heads: 2}"]


def test_train_resumes_exactly_and_pipeline_samples_it(tmp_path):
    opts = [*DIT_RUN, "train.max_steps=4", "diffusion.cond_drop_prob=0.3"]
    full = train(tiny_config(tmp_path / "full", *opts), dataset=ToyData(24))
    rest = train_with_a_cut(tiny_config(tmp_path / "split", *opts), 2, ToyData(24))
    assert rest.losses == full.losses[2:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    for part in ("model", "ema"):
        for k, v in getattr(a, part).items():
            assert torch.equal(v, getattr(b, part)[k]), (part, k)
    written = load_config(tmp_path / "full" / "config.yaml")
    assert written.model["arch"] == "dit" and "preset" not in written.model
    assert written.model["hidden_size"] == 16 and written.model["image_size"] == 8

    pipe = Pipeline.from_run(tmp_path / "full")
    assert type(pipe.model) is DiT and pipe.num_classes == 4
    assert pipe.downsample_factor == 2
    images = pipe(n=2, class_labels=[1, 3], steps=3, seed=0, guidance_scale=2.0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    again = pipe(n=1, class_labels=[3], steps=3, seed=1, guidance_scale=2.0)
    torch.testing.assert_close(images[1:], again, atol=1e-5, rtol=1e-5)  # seed + i per image


def test_training_a_dit_moves_the_zero_init_layers(tmp_path):
    cfg = tiny_config(tmp_path, *DIT_RUN, "train.max_steps=2", "train.lr=1e-2")
    train(cfg, dataset=ToyData())
    state = load_checkpoint(tmp_path).model
    assert state["final.linear.weight"].abs().sum() > 0
    assert state["blocks.0.adaLN_modulation.weight"].abs().sum() > 0


def test_text_conditioned_dit_trains_resumes_and_samples_from_prompts(tmp_path):
    """``text.encoder: transformer``: the DiT's cross-attention gets the caption tokens."""
    opts = ["model={arch: dit, preset: tiny, hidden_size: 16, num_heads: 2}",
            "text.encoder=transformer", "text.width=16", "text.heads=2", "text.layers=1",
            "text.max_length=8", "data.source=digits", "train.max_steps=3"]  # fmt: skip
    full = train(tiny_config(tmp_path / "full", *opts))
    rest = train_with_a_cut(tiny_config(tmp_path / "split", *opts), 2)
    assert rest.losses == full.losses[2:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert all(torch.equal(v, b.model[k]) for k, v in a.model.items())
    assert "unet.blocks.0.cross_attn.to_kv.weight" in a.model  # the wrapper's DiT
    pipe = Pipeline.from_run(tmp_path / "full")
    assert type(pipe.model.unet) is DiT and pipe.model.config.context_dim == 16
    prompts = [digits_caption(3), digits_caption(7)]
    images = pipe(n=2, prompt=prompts, steps=2, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
