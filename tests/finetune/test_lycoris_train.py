"""Trainable LoHa / LoKr adapters (``difflab finetune --adapter loha|lokr``): a fresh adapter
is the identity, the update is peft's LoHa / LoKr with the same tensors, the split is
LyCORIS' factorization, a run trains, resumes bit for bit and reloads from its file, and an
SD run's LyCORIS-layout file gives the fine-tuned U-Net's output through ``AdapterSet``."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft.tuners.lokr.layer import factorization as peft_factorization
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
from sd_helpers import tiny_sd1_pipeline  # noqa: E402
from train_helpers import ToyData, tiny_config, train_with_a_cut, write_captioned_images  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.cli import main as cli_main  # noqa: E402
from difflab.cli.finetune import finetune_config  # noqa: E402
from difflab.finetune import (  # noqa: E402
    LORA_FILE,
    LoHaLayer,
    LoKrLayer,
    adapter_layer,
    add_lora,
    fuse_lora,
    load_lora,
    lokr_factorization,
    lora_layers,
    save_lora,
    set_lora_scale,
    unfuse_lora,
)
from difflab.models import UNet, UNetConfig  # noqa: E402
from difflab.train import load_checkpoint, train  # noqa: E402
from difflab.train.config import FinetuneConfig  # noqa: E402

KINDS = ["loha", "lokr"]


def _unet() -> UNet:
    cfg = UNetConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
                     num_res_blocks=1, attention_resolutions=(4,), num_heads=2, norm_groups=4,
                     num_classes=3)  # fmt: skip
    model = UNet(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # switch off the zero-initialised outputs so every layer matters
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return model.eval()


@torch.no_grad()
def _out(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 8, 8, generator=g)
    return model(x, torch.tensor([100.0, 700.0]), class_labels=torch.tensor([0, 2]))


def _randomise(model: nn.Module, seed: int = 1) -> None:
    """Non-zero values in every factor (a fresh adapter's zero factor hides the others)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in layer.factors().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_adapter_is_the_identity(kind):
    model = _unet()
    base = _out(model)
    names = add_lora(model, rank=2, alpha=3.0, targets="attention+conv", kind=kind,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    layers = dict(lora_layers(model))
    assert set(layers) == set(names) and all(layer.kind == kind for layer in layers.values())
    assert any(isinstance(layer.base, nn.Conv2d) for layer in layers.values())  # LoCon
    if kind == "lokr":  # both of LyCORIS' forms of w2 occur: whole and w2_a @ w2_b
        forms = {"lokr_w2" in layer.factors() for layer in layers.values()}
        assert forms == {True, False}
    assert torch.equal(_out(model), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = "hada_" if kind == "loha" else "lokr_"
    assert trainable and all(n.rpartition(".")[2].startswith(prefix) for n in trainable)


def _peft_twin(layer, kind: str, rank: int, alpha: float) -> nn.Module:
    """peft's LoHa / LoKr on a copy of the layer's base, holding the layer's tensors."""
    holder = nn.ModuleDict({"layer": copy.deepcopy(layer.base)})
    opts = dict(r=rank, alpha=alpha, target_modules=["layer"], init_weights=False)
    cfg = LoHaConfig(**opts) if kind == "loha" else LoKrConfig(**opts)
    with torch.random.fork_rng(devices=[]):
        inject_adapter_in_model(cfg, holder)
    twin = holder["layer"]
    with torch.no_grad():
        for name, value in layer.factors().items():
            target = getattr(twin, name)["default"]
            assert target.shape == value.shape, name  # peft's shapes are LyCORIS' too
            target.copy_(value)
        for name in ("hada_t1", "hada_t2", "lokr_w1_a", "lokr_t2"):
            assert not getattr(twin, name, {}), name  # no other factor of peft's is in use
    return twin


@pytest.mark.parametrize("rank", [1, 6], ids=["r1", "r6"])
@pytest.mark.parametrize(
    "base",
    [nn.Linear(12, 16), nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.Conv2d(8, 6, 1)],
    ids=["linear", "conv3x3", "conv1x1"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_update_equals_peft_with_the_same_tensors(kind, base, rank):
    """ΔW and the layer's output as peft's LoHa / LoKr compute them. LoKr with both factors
    whole ignores α (LyCORIS), so its peft twin gets α = r (scale 1) and ours α = 7."""
    whole = kind == "lokr" and rank == 6
    layer = adapter_layer(kind, base, rank, 7.0 if whole else 3.0,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert ("lokr_w2" in layer.factors()) == whole or kind == "loha"
    model = nn.ModuleDict({"layer": layer})
    _randomise(model)
    twin = _peft_twin(layer, kind, rank, float(rank) if whole else 3.0)
    g = torch.Generator().manual_seed(3)
    x = (
        torch.randn(3, 12, generator=g)
        if isinstance(base, nn.Linear)
        else torch.randn(2, 8, 7, 7, generator=g)
    )
    with torch.no_grad():
        ours = layer.delta_weight()
        theirs = twin.get_delta_weight("default")
        assert ours.abs().max() > 1e-2
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x), twin(x), atol=1e-5, rtol=1e-5)


def test_lokr_factorization_is_lycoris():
    """LyCORIS' documented splits, and peft's copy of the rule (peft leaves a dividing
    factor's pair unsorted: (32, 4) for (128, 32); LyCORIS sorts it)."""
    known = {(128, -1): (8, 16), (127, -1): (1, 127), (128, 4): (4, 32), (250, -1): (10, 25),
             (512, 8): (8, 64), (1024, -1): (32, 32), (128, 32): (4, 32), (250, 8): (5, 50),
             (1, -1): (1, 1)}  # fmt: skip
    for (dim, factor), pair in known.items():
        assert lokr_factorization(dim, factor) == pair, (dim, factor)
    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 32):
            ref = tuple(sorted(peft_factorization(dim, factor)))
            assert lokr_factorization(dim, factor) == ref, (dim, factor)
    layer = adapter_layer("lokr", nn.Linear(128, 64), 2, factor=4)
    assert {k: tuple(v.shape) for k, v in layer.factors().items()} == {
        "lokr_w1": (4, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 32)}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_scale_fuse_unfuse_and_the_file_round_trip(kind, tmp_path):
    model = _unet()
    base, weights0 = _out(model), copy.deepcopy(model.state_dict())
    add_lora(model, rank=2, alpha=3.0, targets="attention+conv", kind=kind, factor=2,
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    _randomise(model)
    tuned = _out(model)
    assert (tuned - base).abs().max() > 1e-2
    set_lora_scale(model, 0.0)
    assert torch.equal(_out(model), base)
    set_lora_scale(model, 1.0)
    fuse_lora(model)
    torch.testing.assert_close(_out(model), tuned, atol=1e-5, rtol=0)
    unfuse_lora(model)
    restored = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    assert all(torch.equal(restored[k], v) for k, v in weights0.items())

    path = save_lora(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["kind"] == kind and meta.get("lokr_factor") == ("2" if kind == "lokr" else None)
    fresh = _unet()
    report = load_lora(fresh, path)
    assert len(report.applied) == len(list(lora_layers(model)))
    cls = LoHaLayer if kind == "loha" else LoKrLayer
    assert all(isinstance(layer, cls) for _, layer in lora_layers(fresh))
    assert torch.equal(_out(fresh), tuned)
    state = load_file(path)  # a file missing one tensor is refused, naming it
    first = "hada_w1_b" if kind == "loha" else "lokr_w1"
    missing = next(k for k in state if k.endswith("." + first))
    save_file({k: v for k, v in state.items() if k != missing}, str(tmp_path / "b.safetensors"),
              metadata=meta)  # fmt: skip
    with pytest.raises(ValueError, match=f"{first}: file none"):
        load_lora(_unet(), tmp_path / "b.safetensors")


def test_lora_only_options_are_refused_for_loha_and_lokr():
    with pytest.raises(ValueError, match="dora is a LoRA option"):
        FinetuneConfig(base_run="x", adapter="loha", dora=True)
    with pytest.raises(ValueError, match="rslora is a LoRA option"):
        adapter_layer("lokr", nn.Linear(4, 4), 2, rslora=True)
    with pytest.raises(ValueError, match="finetune.adapter"):
        FinetuneConfig(base_run="x", adapter="lycoris")
    with pytest.raises(ValueError, match="lokr_factor"):
        FinetuneConfig(base_run="x", adapter="lokr", lokr_factor=0)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    cfg = tiny_config(run, "train.max_steps=3", "model.num_classes=10")
    train(cfg, dataset=ToyData(), progress=False)
    return run


def _prediction(pipe: dl.Pipeline) -> torch.Tensor:
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return pipe.model(x, torch.tensor([100.0, 500.0, 900.0]), class_labels=torch.arange(3))


@pytest.mark.parametrize("kind", KINDS)
def test_run_trains_resumes_exactly_and_samples_from_run(base_run, tmp_path, kind):
    ft = ["train.max_steps=4", "train.log_every=1", "train.lr=1e-2"]
    cfgs = {
        name: finetune_config(
            base_run, tmp_path / name, rank=2, targets="attention+conv", adapter=kind, overrides=ft
        )  # fmt: skip
        for name in ("full", "split")
    }
    full = train(cfgs["full"], dataset=ToyData(seed=1), progress=False)
    rest = train_with_a_cut(cfgs["split"], 2, ToyData(seed=1))
    assert rest.losses == full.losses[2:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert a.ema.keys() == b.ema.keys() and all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
    files = [load_file(tmp_path / run / LORA_FILE) for run in ("full", "split")]
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])

    tuned = dl.Pipeline.from_run(tmp_path / "full")
    assert {layer.kind for _, layer in lora_layers(tuned.model)} == {kind}
    pipe = dl.Pipeline.from_run(base_run)
    base = _prediction(pipe)
    assert (_prediction(tuned) - base).abs().mean() > 1e-2 * base.abs().mean()  # it trained
    pipe.load_lora(tmp_path / "full" / LORA_FILE)
    assert torch.equal(_prediction(pipe), _prediction(tuned))


# ----------------------------------------------------------------------------- SD runs


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "sd"
    tiny_sd1_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_sd_runs_lycoris_file_gives_the_tuned_unet_through_adapterset(sd_folder, tmp_path, kind):
    """``--adapter loha|lokr --targets attention,conv`` on an SD model: the kohya-layout file
    holds LyCORIS' tensors, and applied by AdapterSet (``Pipeline.load_lora`` of the SD
    model) it gives the fine-tuned run's U-Net output. LoKr at rank 8 with factor 4 keeps w2
    whole on the 64-channel layers (SD 1.x's proj_in: a 1x1 conv's (16, 16, 1, 1) in the file)
    and decomposes it on wider ones."""
    data = write_captioned_images(tmp_path / "images", ["a red cat", "a blue house"])
    out = tmp_path / "ft"
    rank = "2" if kind == "loha" else "8"
    argv = ["finetune", str(sd_folder), "--out", str(out), "--adapter", kind, "--rank", rank,
            "--alpha", "3", "--targets", "attention,conv", "--steps", "2", "--lr", "0.01",
            "--set", "train.batch_size=2", "--set", f"data.path={data}"]  # fmt: skip
    if kind == "lokr":
        argv += ["--lokr-factor", "4"]
    assert cli_main(argv) == 0
    kohya = out / "lora_kohya.safetensors"
    with safe_open(str(kohya), framework="pt") as fh:
        meta, keys = fh.metadata(), set(fh.keys())
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == kind
    first = "hada_w1_a" if kind == "loha" else "lokr_w1"
    modules = {k.rpartition(".")[0] for k in keys if k.endswith("." + first)}
    assert modules and all(f"{m}.alpha" in keys for m in modules)
    assert any("resnets" in m and m.endswith("conv1") for m in modules)  # LoCon
    if kind == "lokr":
        assert shapes["lora_unet_mid_block_attentions_0_proj_in.lokr_w2"] == (16, 16, 1, 1)
        assert any(k.endswith(".lokr_w2_b") for k in keys)

    tuned = dl.Pipeline.from_run(out)
    n_layers = len(list(lora_layers(tuned.model)))
    assert n_layers == len(modules)
    sd = dl.Pipeline.from_pretrained(sd_folder)
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 600.0]), None
    context = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        base = sd.model(x, t, context=context)
        report = sd.load_lora(kohya)
        theirs = sd.model(x, t, context=context)
        ours = tuned.model(x, t, context=context)
    assert report.kinds == {kind: n_layers}
    assert (ours - base).abs().max() > 1e-4  # the adapters moved
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
