"""AUTOMATIC1111's ``parameters`` text: real web-UI strings parsed, difflab's written and read
back, and the PNG chunk beside difflab's JSON."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, PngImagePlugin

from difflab.images import read_png_parameters, read_png_params, save_grid, save_image
from difflab.interop.a1111 import A1111_SAMPLERS, format_parameters, parse_parameters
from difflab.samplers import SAMPLERS

# SD 1.5, A1111 1.6: Hires fix, clip skip, a LoRA and embeddings (their hashes quoted), the
# old combined sampler name.
SD15_HIRES = """\
masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, <lora:add_detail:0.8>
Negative prompt: (worst quality, low quality:1.4), EasyNegative, bad-hands-5
Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 2891650731, Size: 512x768, \
Model hash: 7f96a1a9ca, Model: AnythingV5_v5PrtRE, Denoising strength: 0.5, Clip skip: 2, \
ENSD: 31337, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, \
Lora hashes: "add_detail: 7c6bad76eb54", \
TI hashes: "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c", Version: v1.6.0"""

# SDXL, A1111 1.10: the schedule in its own field, a refiner, a multi-line negative prompt.
SDXL = """\
cinematic photo of a red fox in a snowy forest, shallow depth of field
Negative prompt: cartoon, painting
illustration, (blurry:1.2)
Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 1234567890, \
Size: 1024x1024, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, \
VAE: sdxl_vae.safetensors, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, \
Version: v1.10.1"""

# SD 1.5 with ADetailer (a quoted prompt with a comma and an escaped quote), Euler a.
ADETAILER = """\
portrait of a woman,
soft light
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, \
Model: v1-5-pruned-emaonly, ADetailer model: face_yolov8n.pt, \
ADetailer prompt: "detailed face, \\"smiling\\"", ADetailer confidence: 0.3, \
ADetailer denoising strength: 0.4, ADetailer inpaint only masked: True, \
ADetailer version: 23.11.1, Version: v1.7.0"""

# img2img with DDIM and its eta; no negative prompt.
IMG2IMG = """\
a watercolor landscape
Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 512x512, Model hash: cc6cb27103, \
Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Eta DDIM: 0.3, Mask blur: 4, \
Version: v1.5.1"""


def test_sd15_hires_fix_with_lora_hashes():
    p = parse_parameters(SD15_HIRES)
    assert p["prompt"].endswith("smile, <lora:add_detail:0.8>")
    assert p["negative_prompt"] == "(worst quality, low quality:1.4), EasyNegative, bad-hands-5"
    assert (p["sampler"], p["spacing"], p["steps"]) == ("dpmpp_2m", "karras", 25)
    assert (p["guidance_scale"], p["seed"], p["width"], p["height"]) == (7.0, 2891650731, 512, 768)
    assert (p["model"], p["model_hash"], p["clip_skip"], p["n"]) == (
        "AnythingV5_v5PrtRE", "7f96a1a9ca", 2, 1,
    )  # fmt: skip
    assert "strength" not in p  # with Hires fix it is the upscaling pass's strength
    assert p["extra"] == {
        "Denoising strength": "0.5",
        "ENSD": "31337",
        "Hires upscale": "2",
        "Hires steps": "15",
        "Hires upscaler": "R-ESRGAN 4x+ Anime6B",
        "Lora hashes": "add_detail: 7c6bad76eb54",
        "TI hashes": "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c",
        "Version": "v1.6.0",
    }


def test_sdxl_schedule_type_and_multiline_negative_prompt():
    p = parse_parameters(SDXL)
    assert p["prompt"] == "cinematic photo of a red fox in a snowy forest, shallow depth of field"
    assert p["negative_prompt"] == "cartoon, painting\nillustration, (blurry:1.2)"
    assert (p["sampler"], p["spacing"], p["guidance_scale"]) == ("dpmpp_2m", "karras", 5.5)
    assert (p["seed"], p["width"], p["height"], p["model"]) == (1234567890, 1024, 1024,
                                                                "sd_xl_base_1.0")  # fmt: skip
    assert p["extra"]["Refiner"] == "sd_xl_refiner_1.0 [7440042bbd]"
    assert p["extra"]["VAE"] == "sdxl_vae.safetensors" and p["extra"]["Refiner switch at"] == "0.8"


def test_adetailer_quoted_values_and_multiline_prompt():
    p = parse_parameters(ADETAILER)
    assert p["prompt"] == "portrait of a woman,\nsoft light" and "negative_prompt" not in p
    assert (p["sampler"], p["steps"], p["seed"]) == ("euler_ancestral", 20, 42)
    assert "spacing" not in p  # the sampler's own default
    assert p["extra"]["ADetailer prompt"] == 'detailed face, "smiling"'
    assert p["extra"]["ADetailer denoising strength"] == "0.4"
    assert p["extra"]["ADetailer inpaint only masked"] == "True"
    assert "strength" not in p  # ADetailer's strength is not img2img's


def test_img2img_denoising_strength_and_ddim_eta():
    p = parse_parameters(IMG2IMG)
    assert (p["sampler"], p["strength"], p["eta"], p["guidance_scale"]) == ("ddim", 0.75, 0.3, 7.5)
    assert p["extra"] == {"Mask blur": "4", "Version": "v1.5.1"}


def test_old_and_new_schedule_spellings_agree():
    old = parse_parameters("a\nSteps: 9, Sampler: DPM++ 2M SDE Exponential, Seed: 1")
    new = parse_parameters(
        "a\nSteps: 9, Sampler: DPM++ 2M SDE, Schedule type: Exponential, Seed: 1"
    )
    assert old == new and (old["sampler"], old["spacing"]) == ("dpmpp_2m_sde", "exponential")
    auto = parse_parameters("a\nSteps: 9, Sampler: Euler, Schedule type: Automatic, Seed: 1")
    assert auto["sampler"] == "euler" and "spacing" not in auto
    sgm = parse_parameters("a\nSteps: 9, Sampler: Euler, Schedule type: SGM Uniform, Seed: 1")
    assert sgm["spacing"] == "trailing"


def test_a1111_sampler_names_resolve_through_the_registry():
    for name, a1111 in A1111_SAMPLERS.items():
        text = f"x\nSteps: 4, Sampler: {a1111}, CFG scale: 1, Seed: 0"
        assert parse_parameters(text)["sampler"] == name
    for suffixed, (name, spacing) in {
        "Euler a Karras": ("euler_ancestral", "karras"),
        "LMS Karras": ("lms", "karras"),
        "Heun Karras": ("heun", "karras"),
        "DPM2 a Karras": ("dpm_2_ancestral", "karras"),
        "DPM++ 2S a Karras": ("dpmpp_2s_ancestral", "karras"),
        "DPM++ SDE Karras": ("dpmpp_sde", "karras"),
    }.items():
        p = parse_parameters(f"x\nSteps: 4, Sampler: {suffixed}, Seed: 0")
        assert (p["sampler"], p["spacing"]) == (name, spacing)


def test_unknown_sampler_or_schedule_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown A1111 sampler 'Restart' .*DPM\+\+ 2M, "):
        parse_parameters("a\nSteps: 20, Sampler: Restart, CFG scale: 7, Seed: 1")
    with pytest.raises(ValueError, match=r"schedule type 'Align Your Steps'.*SGM Uniform"):
        parse_parameters("a\nSteps: 20, Sampler: Euler, Schedule type: Align Your Steps, Seed: 1")
    with pytest.raises(ValueError, match=r"'Steps' must be an integer, got 'many'"):
        parse_parameters("a\nSteps: many, Sampler: Euler, Seed: 1")
    with pytest.raises(ValueError, match=r"'Size' must be WIDTHxHEIGHT"):
        parse_parameters("a\nSteps: 2, Sampler: Euler, Seed: 1, Size: big")


def test_prompt_only_and_parameters_only_texts():
    p = parse_parameters("just a prompt, with a comma\nand a second line")
    assert p == {"prompt": "just a prompt, with a comma\nand a second line", "n": 1, "extra": {}}
    p = parse_parameters("Steps: 5, Sampler: UniPC, CFG scale: 3, Seed: 7, Size: 8x8")
    assert p["prompt"] is None and (p["sampler"], p["steps"]) == ("unipc", 5)


def test_format_writes_a1111s_layout():
    params = {
        "run": "runs/cats", "sampler": "dpmpp_2m", "spacing": "karras", "steps": 20,
        "guidance_scale": 7.0, "seed": 1234, "prompt": ["a cat, on a mat", "a dog"],
        "negative_prompt": "blurry", "width": 512, "height": 512, "eta": None,
        "guidance_rescale": 0.0, "difflab_version": "0.1.0", "n": 2,
    }  # fmt: skip
    assert format_parameters(params) == (
        "a cat, on a mat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, "
        "CFG scale: 7, Seed: 1234, Size: 512x512, Model: cats, Version: difflab 0.1.0"
    )
    labels = {"sampler": "DDIM", "spacing": "trailing", "steps": 3, "guidance_scale": 1.5,
              "seed": 5, "class_labels": [2, 2, 7, 7], "prompt": None, "eta": 0.25,
              "guidance_rescale": 0.7, "strength": 0.5}  # fmt: skip
    assert format_parameters(labels) == (
        "class 2\nSteps: 3, Sampler: DDIM, CFG scale: 1.5, Seed: 5, Denoising strength: 0.5, "
        "Eta: 0.25, CFG Rescale: 0.7"
    )
    with pytest.raises(ValueError, match="need steps, seed"):
        format_parameters({"sampler": "ddim"})


@pytest.mark.parametrize("spacing", ["karras", "exponential", "leading", "linspace", "logsnr"])
def test_every_sampler_and_spacing_round_trips(spacing):
    for name, spec in SAMPLERS.items():
        params = {"sampler": name, "spacing": spacing, "steps": 7, "seed": 11,
                  "guidance_scale": 0.1 + 0.2, "class_labels": [3], "width": 8, "height": 8,
                  "guidance_rescale": 1 / 3, "eta": 0.0}  # fmt: skip
        back = parse_parameters(format_parameters(params))
        assert (back["sampler"], back.get("spacing", spec.default_spacing)) == (name, spacing)
        assert back["guidance_scale"] == 0.1 + 0.2 and back["guidance_rescale"] == 1 / 3
        assert (back["class_labels"], back["prompt"], back["steps"], back["seed"]) == (
            [3], None, 7, 11,
        )  # fmt: skip
        assert (back["width"], back["height"], back["eta"], back["extra"]) == (8, 8, 0.0, {})


def test_custom_timestep_list_and_awkward_prompts_round_trip():
    params = {"sampler": "ddim", "spacing": [999.0, 500.0, 20.0], "steps": 3, "seed": 0,
              "prompt": 'line one: "quoted", ok\nNegative-ish line two',
              "negative_prompt": "a, b\nc"}  # fmt: skip
    back = parse_parameters(format_parameters(params))
    assert back["spacing"] == [999.0, 500.0, 20.0]
    assert (back["prompt"], back["negative_prompt"]) == (params["prompt"], "a, b\nc")


def test_png_carries_both_chunks_and_reader_prefers_difflabs_json(tmp_path):
    params = {"run": "runs/d", "sampler": "dpmpp_2m", "spacing": "trailing", "steps": 20,
              "guidance_scale": 2.0, "seed": 3, "n": 4, "class_labels": [1, 1, 2, 2],
              "prompt": None}  # fmt: skip
    path = save_grid(torch.zeros(4, 1, 8, 6), tmp_path / "g.png", nrow=2, params=params)
    with Image.open(path) as img:
        text = img.text["parameters"]
    assert text == (
        "class 1\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 2, Seed: 3, Size: 6x8, Model: d"
    )
    assert read_png_parameters(path) == params == read_png_params(path)
    one = save_image(torch.zeros(1, 5, 4), tmp_path / "one.png", {**params, "n": 1})
    with Image.open(one) as img:
        assert "Size: 4x5" in img.text["parameters"]
    for bare in ({"seed": 1}, {"sampler": "mine", "steps": 2, "seed": 1}):
        path = save_image(torch.zeros(1, 2, 2), tmp_path / "bare.png", bare)
        with Image.open(path) as img:  # too little for A1111's line: JSON only
            assert "parameters" not in img.text and json.loads(img.text["difflab"]) == bare


def test_reader_parses_an_a1111_only_png_and_rejects_a_png_with_neither(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", SDXL)
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png", pnginfo=info)
    assert read_png_parameters(tmp_path / "a.png") == parse_parameters(SDXL)
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match=r"plain.png holds no generation parameters: neither"):
        read_png_parameters(tmp_path / "plain.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_png_parameters(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        read_png_parameters(tmp_path / "text.png")
