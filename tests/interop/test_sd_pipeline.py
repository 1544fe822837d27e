"""Stable Diffusion checkpoints in difflab: images equal diffusers' pipelines side by side.

Tiny random-weight SD 1.x (eps), SD 2.x (v) and SDXL pipelines are built with diffusers
(``sd_helpers``), saved as diffusers folders (and as original single files), loaded with
``dl.Pipeline.from_pretrained`` and sampled with the same prompts, negative prompts,
scheduler and initial latents as diffusers' own pipeline.
"""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sd_helpers import (
    TEXT_HEADS,
    hf_checkpoint_state,
    open_clip_state,
    tiny_sd1_pipeline,
    tiny_sd2_pipeline,
    tiny_sdxl_pipeline,
)

import difflab as dl
from difflab.interop.sd import detect_family, path_kind
from difflab.interop.unet import unet_state_to_ldm
from difflab.interop.vae import vae_state_to_ldm

BUILDERS = {"sd1": tiny_sd1_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}
PROMPTS = ["a red house", "a photo of a cat with the blue sky"]
NEGATIVE = ["blurry", "low quality"]
STEPS = 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny diffusers pipeline and its saved folder."""
    out = {}
    for family, build in BUILDERS.items():
        folder = tmp_path_factory.mktemp(family) / "sd"
        built = build(seed=0)
        built.save_pretrained(folder)
        # The reference is the folder as diffusers loads it (a scheduler built in memory
        # lets another class's defaults replace its defaulted keys; a loaded one does not).
        pipe = type(built).from_pretrained(folder, local_files_only=True)
        out[family] = (pipe, folder)
    return out


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _reference(pipe, scheduler: str, latents: torch.Tensor, **kwargs) -> torch.Tensor:
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(
            prompt=PROMPTS, num_inference_steps=STEPS, latents=latents.clone(),
            output_type="pt", **kwargs,
        ).images  # fmt: skip
    return out * 2 - 1  # diffusers returns [0, 1]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize(
    "scheduler, sampler", [("DDIMScheduler", "ddim"), ("EulerDiscreteScheduler", "euler")]
)
def test_images_equal_diffusers_pipeline(folders, family, scheduler, sampler):
    """Same scheduler, prompts, negative prompts and initial latents: the same images to
    1e-3, with classifier-free guidance w = 6."""
    ref_pipe, folder = folders[family]
    ours = dl.Pipeline.from_pretrained(folder)
    latents = _latents()
    ref = _reference(ref_pipe, scheduler, latents, negative_prompt=NEGATIVE, guidance_scale=6.0)
    got = ours(n=2, prompt=PROMPTS, negative_prompt=NEGATIVE, noise=latents, sampler=sampler,
               steps=STEPS, guidance_scale=6.0, progress=False)  # fmt: skip
    assert got.shape == ref.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)


def test_sdxl_without_negative_prompt_guides_from_zeros(folders):
    """SDXL's force_zeros_for_empty_prompt: no negative prompt means zero embeddings."""
    ref_pipe, folder = folders["sdxl"]
    ours = dl.Pipeline.from_pretrained(folder)
    latents = _latents(1)
    ref = _reference(ref_pipe, "DDIMScheduler", latents, guidance_scale=4.0)
    got = ours(n=2, prompt=PROMPTS, noise=latents, sampler="ddim", steps=STEPS,
               guidance_scale=4.0, progress=False)  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)


def test_defaults_come_from_the_folder(folders):
    """The folder's scheduler decides the default sampler, its prediction type the
    parametrization; the family its guidance default; the U-Net and VAE the image size."""
    for family, (_, folder) in folders.items():
        pipe = dl.Pipeline.from_pretrained(folder)
        assert pipe.prediction == ("v" if family == "sd2" else "eps")
        assert pipe.pixel_shape == (3, 32, 32) and pipe.image_shape == (4, 16, 16)
        params = pipe.resolve_params(1, prompt="a cat")
        assert params["sampler"] == "ddim"  # the saved DDIMScheduler
        assert params["guidance_scale"] == (5.0 if family == "sdxl" else 7.5)
        assert params["steps"] == 50
        assert isinstance(pipe.model, dl.models.UNet)  # difflab's own network


def _single_file(pipe, family: str, folder) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original CompVis / sgm single-file layout."""
    ours = dl.Pipeline.from_pretrained(folder)
    state = {"model.diffusion_model." + k: v for k, v in
             unet_state_to_ldm(ours.model.state_dict(), ours.model.config).items()}  # fmt: skip
    vae = vae_state_to_ldm(ours.vae.state_dict())
    state |= {"first_stage_model." + k: v for k, v in vae.items()}
    if family == "sd1":
        state |= hf_checkpoint_state(pipe.text_encoder, "cond_stage_model.transformer.")
    else:
        state |= hf_checkpoint_state(pipe.text_encoder, "conditioner.embedders.0.transformer.")
        state |= open_clip_state(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    return state


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_gives_the_same_images_as_the_folder(folders, family, tmp_path):
    """The same weights as a diffusers folder and as one original-layout .safetensors file
    (the folder named for its tokenizer) give identical difflab images."""
    ref_pipe, folder = folders[family]
    path = tmp_path / "model.safetensors"
    state = _single_file(ref_pipe, family, folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert path_kind(path) == "single_file" and detect_family(state, path) == family
    from_folder = dl.Pipeline.from_pretrained(folder)
    from_file = dl.Pipeline.from_pretrained(path, tokenizer=folder)
    kw = dict(n=2, prompt=PROMPTS, negative_prompt=NEGATIVE, sampler="ddim", steps=3,
              guidance_scale=3.0, seed=4, progress=False)  # fmt: skip
    torch.testing.assert_close(from_file(**kw), from_folder(**kw), rtol=0, atol=1e-6)
    encoder = from_file.text_encoder.encoder.models[0]  # heads from the folder's config
    assert encoder.config.num_attention_heads == TEXT_HEADS != 32 // 64


def test_bad_inputs_are_one_line_errors(folders, tmp_path):
    ref_pipe, folder = folders["sd1"]
    truncated = tmp_path / "cut.safetensors"
    data = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.safetensors' is not a readable .safetensors file"):
        dl.Pipeline.from_pretrained(truncated, tokenizer=folder)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint: no model.diffusion"):
        dl.Pipeline.from_pretrained(foreign, tokenizer=folder)
    whole = tmp_path / "sd1.safetensors"
    state = _single_file(ref_pipe, "sd1", folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(whole))
    with pytest.raises(ValueError, match="name a local folder with its tokenizer"):
        dl.Pipeline.from_pretrained(whole)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        dl.Pipeline.from_pretrained(whole, tokenizer=tmp_path / "nowhere")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle file, which can carry code"):
        dl.Pipeline.from_pretrained(pickle)
    odd = tmp_path / "odd"
    odd.mkdir()
    with pytest.raises(FileNotFoundError, match="neither a difflab run"):
        dl.Pipeline.from_pretrained(odd)


def test_unknown_family_names_what_it_found(tmp_path):
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
            torch.zeros(8, 512),
        "cond_stage_model.foo.weight": torch.zeros(1),
    }  # fmt: skip
    with pytest.raises(ValueError, match="cannot tell the Stable Diffusion family.*width 512"):
        detect_family(state, "x.safetensors")


def test_the_cli_samples_a_diffusers_folder_with_a_negative_prompt(folders, tmp_path):
    """difflab sample FOLDER --prompt --negative-prompt writes the pipeline's grid, with
    both metadata chunks."""
    from PIL import Image

    from difflab.cli import main
    from difflab.images import make_grid, read_png_params

    _, folder = folders["sd1"]
    out = tmp_path / "sd.png"
    argv = ["sample", str(folder), "--prompt", "a red house", "--negative-prompt", "blurry",
            "--n", "2", "--steps", "3", "--sampler", "Euler a", "--cfg", "5", "-o", str(out)]
    assert main(argv) == 0
    params = read_png_params(out)
    assert params["negative_prompt"] == "blurry" and params["sampler"] == "Euler a"
    with Image.open(out) as img:
        assert "Negative prompt: blurry" in img.text["parameters"]
        pipe = dl.Pipeline.from_pretrained(folder)
        want = pipe(2, prompt="a red house", negative_prompt="blurry", steps=3,
                    sampler="Euler a", guidance_scale=5.0, progress=False)  # fmt: skip
        assert np.array_equal(np.asarray(img), np.asarray(make_grid(want)))
    assert json.loads(Image.open(out).text["difflab"])["run"] == str(folder)


def test_bf16_weights_run_the_networks_in_bf16_and_stay_close(folders):
    """dtype="bf16": the U-Net, VAE and text encoder weights in bf16, the sampler in fp32;
    the images stay near the fp32 ones (random tiny weights: a loose bound)."""
    _, folder = folders["sd1"]
    full = dl.Pipeline.from_pretrained(folder)
    half = dl.Pipeline.from_pretrained(folder, dtype="bf16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert next(half.vae.parameters()).dtype == torch.bfloat16
    kw = dict(n=1, prompt="a red house", sampler="ddim", steps=4, guidance_scale=4.0, seed=1,
              progress=False)  # fmt: skip
    a, b = full(**kw), half(**kw)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().mean() < 0.05
    assert half.resolve_params(1, prompt="x")["dtype"] == "bf16"
