"""Fine-tuning an SDXL model: ``difflab finetune SDXL_PATH`` imports both text encoders as
``text.encoder: sdxl`` (context = both penultimate layers, ``vector`` = the pooled embedding
plus diffusers' ``add_time_ids`` embeddings); a few steps move the U-Net, and the kohya file
gives difflab's adapted U-Net output in diffusers' ``StableDiffusionXLPipeline`` (LoRA,
LoCon) or through difflab's LyCORIS reader (LoHa, LoKr)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
from sd_helpers import (  # noqa: E402
    TEXT_WIDTH,
    hf_checkpoint_state,
    open_clip_state,
)

import difflab as dl  # noqa: E402
from difflab.cli import main as cli_main  # noqa: E402
from difflab.convert.sd_import import import_stable_diffusion  # noqa: E402
from difflab.finetune import lora_layers  # noqa: E402

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

FT = ["--steps", "2", "--lr", "0.01", "--set", "train.batch_size=2"]
SIZE = 32  # the tiny SDXL's images: 16x16 latents, a 2x autoencoder


def _diffusers_inputs(pipe, prompts, seed=1):
    """Latents, timesteps and diffusers' own SDXL conditioning (``encode_prompt`` and
    ``_get_add_time_ids`` with original = target = the training size, no crop)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 4, SIZE // 2, SIZE // 2, generator=g)
    t = torch.tensor([10.0, 600.0])
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu",
                                                   do_classifier_free_guidance=False)  # fmt: skip
    ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=torch.float32,
                                 text_encoder_projection_dim=TEXT_WIDTH)  # fmt: skip
    added = {"text_embeds": pooled, "time_ids": ids.repeat(len(prompts), 1)}
    return x, t, context, added


def _difflab_keywords(run, prompts):
    """The conditioning difflab's trainer gives the U-Net for ``prompts``."""
    from difflab.interop.sd_text_train import SDXLTrainingText

    cfg = yaml.safe_load((Path(run) / "config.yaml").read_text())
    text = SDXLTrainingText(cfg["text"]["path"], image_size=cfg["data"]["image_size"],
                            vector_dim=cfg["model"]["vector_dim"])  # fmt: skip
    return text.keywords(prompts)


def test_imported_sdxl_run_conditions_the_unet_as_diffusers_does(xl_pipe, xl_folder, tmp_path):
    """The base run's text section, trainer conditioning and U-Net give diffusers' U-Net
    output with diffusers' own prompt embeddings and time ids."""
    run = import_stable_diffusion(xl_folder, tmp_path / "base")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["text"]["encoder"] == "sdxl" and cfg["data"]["image_size"] == SIZE
    prompts = ["a red cat", "the blue house"]
    x, t, context, added = _diffusers_inputs(xl_pipe, prompts)
    keywords = _difflab_keywords(run, prompts)
    torch.testing.assert_close(keywords["context"], context, atol=1e-6, rtol=0)
    ours = dl.Pipeline.from_run(run)
    with torch.no_grad():
        theirs = xl_pipe.unet(x, t, context, added_cond_kwargs=added).sample
        mine = ours.model(x, t, **keywords)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", ["attention", "attention,conv"])
def test_sdxl_lora_kohya_file_gives_difflabs_unet_output_in_diffusers(
    xl_folder, data, tmp_path, targets
):
    """LoRA (attention) and LoCon (attention + ResBlock convolutions) on SDXL: training moves
    the U-Net; ``StableDiffusionXLPipeline.load_lora_weights`` of the kohya file gives the
    tuned U-Net's output, and at scale 0 the base's."""
    out = tmp_path / "ft"
    argv = ["finetune", str(xl_folder), "--out", str(out), "--rank", "2", "--targets", targets,
            *FT, "--set", f"data.path={data}"]  # fmt: skip
    assert cli_main(argv) == 0
    kohya = out / "lora_kohya.safetensors"
    with safe_open(str(kohya), framework="pt") as fh:
        keys = set(fh.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any("resnets" in k for k in keys) == ("conv" in targets)

    prompts = ["a red cat", "the blue house"]
    tuned = dl.Pipeline.from_run(out)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_folder, local_files_only=True)
    x, t, context, added = _diffusers_inputs(pipe, prompts)
    with torch.no_grad():
        base = pipe.unet(x, t, context, added_cond_kwargs=added).sample
        pipe.load_lora_weights(str(kohya))
        theirs = pipe.unet(x, t, context, added_cond_kwargs=added).sample
        pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=0.0)
        zero = pipe.unet(x, t, context, added_cond_kwargs=added).sample
        ours = tuned.model(x, t, **_difflab_keywords(out, prompts))
    assert (ours - base).abs().max() > 1e-3  # the adapters moved
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zero, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_sdxl_lycoris_file_gives_the_tuned_unet_through_adapterset(xl_folder, data, tmp_path, kind):
    """LoHa / LoKr on SDXL: the kohya-layout file holds LyCORIS' tensors, and applied by
    difflab's LyCORIS reader (``Pipeline.load_lora`` of the SDXL model) gives the fine-tuned
    run's U-Net output; scale 0 gives the base."""
    out = tmp_path / "ft"
    argv = ["finetune", str(xl_folder), "--out", str(out), "--adapter", kind, "--rank", "2",
            *FT, "--set", f"data.path={data}"]  # fmt: skip
    assert cli_main(argv) == 0
    kohya = out / "lora_kohya.safetensors"
    with safe_open(str(kohya), framework="pt") as fh:
        keys = set(fh.keys())
    first = "hada_w1_a" if kind == "loha" else "lokr_w1"
    assert any(k.endswith("." + first) for k in keys)

    tuned = dl.Pipeline.from_run(out)
    sd = dl.Pipeline.from_pretrained(xl_folder)
    prompts = ["a red cat", "the blue house"]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 600.0])
    keywords = _difflab_keywords(out, prompts)
    with torch.no_grad():
        base = sd.model(x, t, **keywords)
        report = sd.load_lora(kohya)
        theirs = sd.model(x, t, **keywords)
        ours = tuned.model(x, t, **keywords)
    assert report.kinds == {kind: len(list(lora_layers(tuned.model)))}
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def _single_file(pipe, folder, path):
    """The tiny SDXL's weights in sgm's original single-file layout."""
    from safetensors.torch import save_file

    from difflab.interop.unet import unet_state_to_ldm
    from difflab.interop.vae import vae_state_to_ldm

    ours = dl.Pipeline.from_pretrained(folder)
    state = {"model.diffusion_model." + k: v for k, v in
             unet_state_to_ldm(ours.model.state_dict(), ours.model.config).items()}  # fmt: skip
    vae = vae_state_to_ldm(ours.vae.state_dict())
    state |= {"first_stage_model." + k: v for k, v in vae.items()}
    state |= hf_checkpoint_state(pipe.text_encoder, "conditioner.embedders.0.transformer.")
    state |= open_clip_state(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_sdxl_single_file_imports_as_the_folder_does(xl_pipe, xl_folder, tmp_path):
    """The same SDXL weights as one original-layout file (with the folder for its
    tokenizers) give the same base run: U-Net weights and trainer conditioning."""
    from safetensors.torch import load_file

    path = _single_file(xl_pipe, xl_folder, tmp_path / "xl.safetensors")
    from_file = import_stable_diffusion(path, tmp_path / "file", tokenizer=xl_folder)
    from_folder = import_stable_diffusion(xl_folder, tmp_path / "folder")
    a, b = (load_file(str(run / "ema.safetensors")) for run in (from_file, from_folder))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = ["a red cat", "a dog"]
    one, two = _difflab_keywords(from_file, prompts), _difflab_keywords(from_folder, prompts)
    assert one.keys() == two.keys() == {"context", "context_mask", "vector"}
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=0)


def test_bad_sdxl_inputs_are_one_line_errors(xl_pipe, xl_folder, data, tmp_path, capsys):
    """An SDXL single file without its tokenizer folder, with a folder that lacks
    tokenizer_2/, and an SDXL refiner: each refused with one line naming what is missing;
    textual inversion on SDXL is refused before training."""
    import shutil

    path = _single_file(xl_pipe, xl_folder, tmp_path / "xl.safetensors")
    one_tok = tmp_path / "one_tokenizer"
    shutil.copytree(xl_folder / "tokenizer", one_tok / "tokenizer")
    cases = [
        ([], "single-file sdxl checkpoint: name a local folder with its tokenizer"),
        (["--tokenizer", str(one_tok)], "has no tokenizer_2/; SDXL needs"),
        (["--tokenizer", str(tmp_path / "nowhere")], "does not exist"),
    ]
    for n, (extra, message) in enumerate(cases):
        argv = ["finetune", str(path), "--out", str(tmp_path / f"bad{n}"), *extra, *FT,
                "--set", f"data.path={data}"]  # fmt: skip
        capsys.readouterr()  # transformers' loading bars
        assert cli_main(argv) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
        assert len(errors) == 1 and message in errors[0], errors

    refiner = tmp_path / "refiner"
    shutil.copytree(xl_folder, refiner)
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    with pytest.raises(ValueError, match="refiner"):
        import_stable_diffusion(refiner, tmp_path / "ref_base")

    argv = ["finetune", str(xl_folder), "--out", str(tmp_path / "ti"), "--targets", "none",
            "--new-word", "sks", *FT, "--set", f"data.path={data}"]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "textual inversion (finetune.new_word) is not supported on SDXL" in err


def test_sdxl_run_draws_sample_grids_with_the_vector(xl_folder, data, tmp_path):
    """``train.sample_every=1`` on an SDXL run: each step's raw and EMA grids are drawn with
    the pooled embedding + size ids (``vector``) as the run's ``Pipeline`` builds them (before,
    the grid gave the U-Net no ``vector`` and failed)."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "ft"
    argv = ["finetune", str(xl_folder), "--out", str(out), "--rank", "2", *FT,
            "--set", f"data.path={data}", "--set", "train.sample_every=1",
            "--set", "sample.steps=2", "--set", "sample.num_images=2"]  # fmt: skip
    assert cli_main(argv) == 0
    grids = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert grids == [f"step_00000{s}_{w}.png" for s in (1, 2) for w in ("ema", "raw")]
    grid = np.asarray(Image.open(out / "samples" / "step_000002_ema.png").convert("RGB"))
    assert grid.std() > 1.0  # drawn, not a blank canvas


def test_sdxl_encoder_cache_holds_the_whole_keyword_conditioning(
    xl_folder, data, captions, tmp_path
):
    """``train.encoder_cache`` on ``text.encoder: sdxl``: the cached context, mask and vector
    equal the encoders' own, and a second batch of the same captions is read back."""
    from difflab.train import TrainConfig
    from difflab.train.conditioning import Conditioning

    run = import_stable_diffusion(xl_folder, tmp_path / "base")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["path"] = str(data)
    cfg["train"]["encoder_cache"] = "memory"
    config = TrainConfig.from_dict(cfg).resolve()

    class Captions:
        texts = captions

    cond = Conditioning(config, Captions(), torch.device("cpu"))
    assert cond.text_cache is not None
    prompts = ["a red cat", "the red sky"]
    first = cond.text_inputs(prompts, torch.device("cpu"))
    again = cond.text_inputs(prompts, torch.device("cpu"))
    direct = _difflab_keywords(run, prompts)
    assert first.keys() == direct.keys() == {"context", "context_mask", "vector"}
    for key in direct:
        # one prompt at a time (the cache) against a batch of two: float rounding apart
        torch.testing.assert_close(first[key], direct[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(again[key], first[key], atol=0, rtol=0)
    assert (cond.text_cache.computed, cond.text_cache.hits) == (2, 2)
