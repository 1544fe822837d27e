"""Adapters on Stable Diffusion's text encoder(s) (``difflab finetune SD --text-encoder``,
``finetune.text_encoder``): training moves the CLIP encoder's output; the kohya file's
``lora_te_`` (SDXL: ``lora_te1_`` / ``lora_te2_``) keys load in diffusers'
``load_lora_weights`` and give difflab's adapted prompt embeddings (``encode_prompt``), and
LoHa / LoKr files applied by difflab's LyCORIS reader give the trained run's encoder; scale 0
gives the base."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
sys.path.insert(0, str(Path(__file__).parent))
from test_lycoris_train import _peft_twin  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.cli import main as cli_main  # noqa: E402
from difflab.finetune import lora_layers  # noqa: E402

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

FT = ["--steps", "2", "--lr", "0.01", "--set", "train.batch_size=2", "--text-encoder"]
PROMPTS = ["a red cat", "the blue house in the tree"]


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys())


def _finetune(folder: Path, out: Path, data: Path, *extra: str) -> Path:
    argv = ["finetune", str(folder), "--out", str(out), "--rank", "2", *FT, *extra,
            "--set", f"data.path={data}"]  # fmt: skip
    assert cli_main(argv) == 0
    return out / "lora_kohya.safetensors"


def _sd1_unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 600.0])


def test_sd1_text_encoder_lora_loads_in_diffusers_with_the_same_prompt_embeddings(
    sd_folder, data, tmp_path
):
    """SD 1.x LoRA on the U-Net and the CLIP encoder: the run's encoder moved away from the
    base; diffusers' ``encode_prompt`` after ``load_lora_weights`` of the kohya file equals
    the run's adapted encoder, and its U-Net the run's U-Net; at scale 0, the base's."""
    kohya = _finetune(sd_folder, tmp_path / "ft", data)
    keys = _keys(kohya)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_mlp_fc2.") for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys)

    tuned = dl.Pipeline.from_run(tmp_path / "ft")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    x, t = _sd1_unet_inputs()
    with torch.no_grad():
        base = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        ours, _ = tuned.text_encoder(PROMPTS)
        pipe.load_lora_weights(str(kohya))
        theirs = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        unet_theirs = pipe.unet(x, t, theirs).sample
        unet_ours = tuned.model(x, t, context=ours)
        pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=0.0)
        zero = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert (ours - base).abs().max() > 1e-3  # the text encoder's adapters trained
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unet_theirs, unet_ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zero, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_sd1_text_encoder_lycoris_file_gives_the_runs_encoder(sd_folder, data, tmp_path, kind):
    """LoHa / LoKr on the CLIP encoder: the kohya-layout file's ``lora_te_`` LyCORIS tensors,
    applied to the SD model by difflab's reader, give the run's adapted prompt embeddings
    (and U-Net); scale 0 gives the base."""
    kohya = _finetune(sd_folder, tmp_path / "ft", data, "--adapter", kind)
    first = "hada_w1_a" if kind == "loha" else "lokr_w1"
    assert any(k.startswith("lora_te_") and k.endswith("." + first) for k in _keys(kohya))

    tuned = dl.Pipeline.from_run(tmp_path / "ft")
    sd = dl.Pipeline.from_pretrained(sd_folder)
    encode = sd.text_encoder.encoder  # the SD model's own CLIP (an SDTextEncoder)
    x, t = _sd1_unet_inputs()
    with torch.no_grad():
        base = encode(PROMPTS)["context"]
        report = sd.load_lora(kohya)
        theirs = encode(PROMPTS)["context"]
        ours, _ = tuned.text_encoder(PROMPTS)
        unet_theirs, unet_ours = sd.model(x, t, context=ours), tuned.model(x, t, context=ours)
        sd._adapters.set_scale(report.name, 0.0)
        zero = encode(PROMPTS)["context"]
    trained = len(list(lora_layers(tuned.model.text_encoders)))  # 6 per CLIP layer
    assert sum(a.startswith("text_encoder:") for a in report.applied) == trained == 3 * 6
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unet_theirs, unet_ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zero, base, atol=1e-6, rtol=0)
    # The math reference: each trained text layer is peft's LoHa / LoKr with its tensors.
    g = torch.Generator().manual_seed(2)
    for _, layer in lora_layers(tuned.model.text_encoders):
        h = torch.randn(3, layer.base.in_features, generator=g)
        whole = "lokr_w2" in layer.factors()  # LyCORIS ignores alpha then (scale 1)
        twin = _peft_twin(layer, kind, layer.rank, float(layer.rank) if whole else layer.alpha)
        with torch.no_grad():
            torch.testing.assert_close(layer(h), twin(h), atol=1e-5, rtol=1e-5)


def test_text_encoder_lr_zero_keeps_the_encoder_and_trains_the_unet(
    sd_folder, data, tmp_path, capsys
):
    """``finetune.text_encoder_lr`` is the text adapters' own rate: at 0 the encoder stays
    the base exactly (LoRA's up factor starts at zero) while the U-Net's adapters train.
    ``train.encoder_cache`` then caches latents only, and says so."""
    _finetune(sd_folder, tmp_path / "ft", data, "--text-encoder-lr", "0",
              "--set", "train.encoder_cache=memory")  # fmt: skip
    assert "caches the autoencoder's latents only" in capsys.readouterr().err
    tuned = dl.Pipeline.from_run(tmp_path / "ft")
    sd = dl.Pipeline.from_pretrained(sd_folder)
    x, t = _sd1_unet_inputs()
    with torch.no_grad():
        ours, _ = tuned.text_encoder(PROMPTS)
        base = sd.text_encoder.encoder(PROMPTS)["context"]
        moved = (tuned.model(x, t, context=base) - sd.model(x, t, context=base)).abs().max()
    torch.testing.assert_close(ours, base, atol=0, rtol=0)
    assert moved > 1e-3


def test_sdxl_text_encoders_lora_loads_in_diffusers_with_the_same_prompt_embeddings(
    xl_folder, data, tmp_path
):
    """SDXL: both encoders adapted (``lora_te1_`` / ``lora_te2_``); diffusers'
    ``encode_prompt`` after ``load_lora_weights`` gives the run's context and pooled
    embedding; at scale 0 the base's."""
    kohya = _finetune(xl_folder, tmp_path / "ft", data)
    keys = _keys(kohya)
    assert {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")} == {
        "lora_te1", "lora_te2"
    }  # fmt: skip
    tuned = dl.Pipeline.from_run(tmp_path / "ft")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_folder, local_files_only=True)

    def encode():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu",
                                                   do_classifier_free_guidance=False)  # fmt: skip
        return context, pooled

    with torch.no_grad():
        base = encode()
        ours = tuned.text_encoder.encoder(PROMPTS)  # the run's adapted encoders
        pipe.load_lora_weights(str(kohya))
        theirs = encode()
        pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=0.0)
        zero = encode()
    assert (ours["context"] - base[0]).abs().max() > 1e-3
    assert (ours["pooled"] - base[1]).abs().max() > 1e-3
    torch.testing.assert_close(theirs[0], ours["context"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs[1], ours["pooled"], atol=1e-4, rtol=1e-4)
    for a, b in zip(zero, base):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bad_text_encoder_settings_are_one_line_errors():
    """A text encoder that is not CLIP, a rate without the option, the option without a
    base run: each a one-line ValueError naming the setting."""
    from types import SimpleNamespace

    from torch import nn

    from difflab.train import TrainConfig
    from difflab.train.finetune_setup import FinetuneSetup

    cfg = TrainConfig.from_dict({"finetune": {"base_run": "x", "text_encoder": True},
                                 "text": {"encoder": "transformer"}})  # fmt: skip
    with pytest.raises(ValueError, match=r"adapts a CLIP text encoder .*text.encoder: transformer"):
        FinetuneSetup(cfg)._adapt_text(nn.Linear(1, 1), SimpleNamespace(frozen_text=None))
    with pytest.raises(ValueError, match="text_encoder_lr needs finetune.text_encoder: true"):
        TrainConfig.from_dict({"finetune": {"text_encoder_lr": 0.1}})
    with pytest.raises(ValueError, match="text_encoder needs finetune.base_run"):
        TrainConfig.from_dict({"finetune": {"text_encoder": True}})


def test_text_encoder_run_resumes_exactly(sd_folder, data, tmp_path):
    """The text adapters live in the checkpoint, the optimizer and the EMA: 1 step, then a
    resume to 2, writes the weights of 2 uninterrupted steps bit for bit."""
    from safetensors.torch import load_file

    common = ["--rank", "2", "--lr", "0.01", "--text-encoder", "--set", "train.batch_size=2",
              "--set", f"data.path={data}", "--set", "train.lr_schedule=constant",
              "--set", "train.save_every=1"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli_main(["finetune", str(sd_folder), "--out", str(one), "--steps", "2", *common]) == 0
    assert cli_main(["finetune", str(sd_folder), "--out", str(two), "--steps", "1", *common]) == 0
    argv = ["finetune", str(sd_folder), "--out", str(two), "--steps", "2", "--resume", *common]
    assert cli_main(argv) == 0
    for name in ("model.safetensors", "ema.safetensors", "lora.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert any(k.startswith("text_encoders.") and "lora_" in k for k in a), name
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
