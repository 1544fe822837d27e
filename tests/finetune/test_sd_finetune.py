"""Fine-tuning a Stable Diffusion model: ``difflab finetune SD_FOLDER --out RUN`` imports the
model as a difflab base run and trains on it unchanged; the LoRA's kohya file loads in
diffusers' ``load_lora_weights`` with the same U-Net output as difflab's adapted model, and a
textual-inversion word's file loads in both difflab and diffusers with the same encoding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))

from train_helpers import write_captioned_images  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.cli import main as cli_main  # noqa: E402
from difflab.convert.sd_import import import_stable_diffusion  # noqa: E402

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

FT = ["--steps", "2", "--lr", "0.01", "--set", "train.batch_size=2"]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    return x, torch.tensor([10.0, 600.0]), context


def test_imported_base_run_equals_the_sd_model(sd_folder, tmp_path):
    """The base run's network, schedule and text encoder are the SD model's."""
    run = import_stable_diffusion(sd_folder, tmp_path / "base")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["text"] == {**cfg["text"], "encoder": "clip", "mask_padding": False,
                           "max_length": 77}  # fmt: skip
    ours = dl.Pipeline.from_run(run)
    sd = dl.Pipeline.from_pretrained(sd_folder)
    assert ours.schedule == sd.schedule and ours.prediction == sd.prediction == "eps"
    x, t, context = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            ours.model(x, t, context=context), sd.model(x, t, context=context), atol=0, rtol=0
        )
        mine, _ = ours.text_encoder(["a red cat"])
        theirs = sd.text_encoder.encoder(["a red cat"])["context"]
    torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_lora_kohya_file_gives_difflabs_unet_output_in_diffusers(sd_folder, data, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", str(sd_folder), "--out", str(out), "--rank", "2", *FT,
            "--set", f"data.path={data}"]  # fmt: skip
    assert cli_main(argv) == 0
    kohya = out / "lora_kohya.safetensors"
    assert (out / "lora.safetensors").is_file() and kohya.is_file()

    tuned = dl.Pipeline.from_run(out)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    x, t, context = _inputs(1)
    with torch.no_grad():
        base = pipe.unet(x, t, context).sample
        pipe.load_lora_weights(str(kohya))
        theirs = pipe.unet(x, t, context).sample
        ours = tuned.model(x, t, context=context)
    assert (ours - base).abs().max() > 1e-3  # the adapters moved
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_textual_inversion_word_loads_in_difflab_and_diffusers(sd_folder, captions, tmp_path):
    from difflab.interop.sd import load_stable_diffusion
    from difflab.interop.text import load_embedding

    data = write_captioned_images(tmp_path / "images", [f"a photo of sks {c}" for c in captions])
    out = tmp_path / "ti"
    argv = ["finetune", str(sd_folder), "--out", str(out), "--targets", "none",
            "--new-word", "sks", "--init-word", "cat", *FT,
            "--set", f"data.path={data}"]  # fmt: skip
    assert cli_main(argv) == 0
    embedding = out / "embedding.safetensors"
    assert embedding.is_file() and not (out / "lora_kohya.safetensors").exists()

    encoder = load_stable_diffusion(sd_folder).conditioner.encoder
    assert load_embedding(encoder, embedding) == "sks"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    pipe.load_textual_inversion(str(embedding))
    run_encoder = dl.Pipeline.from_run(out).text_encoder  # the run's own trained word
    prompt = ["a photo of sks in the house"]
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        ours = encoder(prompt)["context"]
        runs, _ = run_encoder(prompt)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(runs, theirs, atol=1e-5, rtol=0)
    cat = encoder(["a photo of cat in the house"])["context"]
    assert (ours - cat).abs().max() > 1e-4  # the word trained away from its init


def test_dreambooth_on_an_sd_model_writes_adapters_that_load_back(sd_folder, tmp_path):
    """DreamBooth (Ruiz et al. 2023) on an imported SD 1.x model: the class prompt's prior
    images come from the imported model, both losses are logged, and the adapter written loads
    back: ``lora.safetensors`` through ``Pipeline.from_run``, the kohya file on the SD model
    in difflab (``Pipeline.load_lora``) and in diffusers, with one U-Net output."""
    import json

    data = write_captioned_images(tmp_path / "images", ["a photo of sks cat"] * 2)
    base = import_stable_diffusion(sd_folder, tmp_path / "base")  # what finetune SD_PATH does
    cfg = yaml.safe_load((base / "config.yaml").read_text())
    cfg["sample"]["steps"] = 3  # the prior images in a few DDIM steps (the SD default is 50)
    (base / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "db"
    argv = ["finetune", str(base), "--out", str(out), "--rank", "2", "--prior", "a cat",
            "--prior-images", "2", "--prior-weight", "0.5", *FT,
            "--set", f"data.path={data}"]  # fmt: skip
    assert cli_main(argv) == 0
    assert cli_main(["export", str(out), "--to", "kohya", str(out / "lora_kohya.safetensors")]) == 0
    assert (out / "lora.safetensors").is_file() and (out / "lora_kohya.safetensors").is_file()
    prior = json.loads((out / "prior" / "prior.json").read_text())
    assert prior["condition"] == "a cat" and prior["count"] == 2
    assert prior["base_run"] == str(base.resolve())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_prior" in r for r in records), records[-1]

    tuned = dl.Pipeline.from_run(out)
    ours_sd = dl.Pipeline.from_pretrained(sd_folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    x, t, context = _inputs(2)
    with torch.no_grad():
        base = pipe.unet(x, t, context).sample
        tuned_out = tuned.model(x, t, context=context)
        ours_sd.load_lora(out / "lora_kohya.safetensors")
        reloaded = ours_sd.model(x, t, context=context)
        pipe.load_lora_weights(str(out / "lora_kohya.safetensors"))
        theirs = pipe.unet(x, t, context).sample
    assert (tuned_out - base).abs().max() > 1e-3  # the adapters moved
    torch.testing.assert_close(reloaded, tuned_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, tuned_out, atol=1e-5, rtol=1e-5)
