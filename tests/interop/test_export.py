"""``difflab export``: a difflab text-to-image latent run written as a diffusers Stable
Diffusion folder (and an original single file) gives the run's own images in diffusers'
``StableDiffusionPipeline`` and back in ``difflab.Pipeline.from_pretrained``.

The run is written directly (no training): a tiny random difflab U-Net (ADM scale-shift
ResBlocks, fused q/k/v, every weight perturbed so no layer is zero), a tiny KL autoencoder
and a tiny CLIP folder, with ``text.mask_padding: false``.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import save_tiny_clip  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.cli import main as cli_main  # noqa: E402
from difflab.convert.export import (  # noqa: E402
    check_exportable,
    export_diffusers,
    export_single_file,
)
from difflab.interop.sd import detect_family, read_safetensors  # noqa: E402

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red cat", "the dog in a house"]
STEPS = 5  # divides T = 1000: diffusers' trailing DDIM grid is difflab's


def write_sd_run(run: Path, assets: Path, *overrides: str) -> Path:
    """A run directory (config.yaml, ema/model.safetensors) of a random tiny text-to-image
    latent U-Net over a tiny autoencoder and CLIP."""
    from safetensors.torch import save_file

    from difflab.models import build_model
    from difflab.models.vae import AutoencoderKL, VAEConfig
    from difflab.train import load_config, save_config

    clip, vae_dir = assets / "clip", assets / "vae"
    if not clip.is_dir():
        save_tiny_clip(clip)
        gen = torch.Generator().manual_seed(3)
        vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_groups=4,
                                      layers_per_block=1), generator=gen)  # fmt: skip
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        vae.save_pretrained(vae_dir)
    cfg = load_config(None, [
        f"run_dir={run}", "data.image_size=16", "data.channels=3", f"latent.vae={vae_dir}",
        "text.encoder=clip", f"text.path={clip}", "text.max_length=16",
        "text.mask_padding=false", "model.model_channels=32", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attention_resolutions=[8,4]", "model.num_heads=2",
        "model.norm_groups=8", "model.num_classes=null", "model.transformer_norm_eps=1.0e-6",
        "model.dropout=0.0", *overrides,
    ]).resolve()  # fmt: skip
    model = build_model(cfg.model_config(), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no zero-initialised layer: every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run / "ema.safetensors"))
    save_file(state, str(run / "model.safetensors"))
    return run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tmp_path_factory.mktemp("assets")


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _ours(pipe: dl.Pipeline, latents: torch.Tensor) -> torch.Tensor:
    return pipe(n=2, prompt=PROMPTS, noise=latents, sampler="ddim", steps=STEPS,
                guidance_scale=3.0, progress=False)  # fmt: skip


def _diffusers_images(folder: Path, latents: torch.Tensor) -> torch.Tensor:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0,
                   latents=latents.clone(), output_type="pt").images  # fmt: skip
    return out * 2 - 1  # diffusers returns [0, 1]


@pytest.mark.parametrize(
    "prediction, extra",
    [("eps", []), ("v", ["model.num_classes=3", "model.use_scale_shift_norm=false"])],
    ids=["eps-scale-shift", "v-classes-additive"],
)
def test_diffusers_pipeline_gives_the_runs_images(tmp_path, assets, prediction, extra):
    """Same prompts, initial latents, DDIM and CFG w = 3: diffusers' StableDiffusionPipeline
    on the exported folder draws the run's images (to 1e-3), and difflab reads the folder
    back to the same images."""
    run = write_sd_run(tmp_path / "run", assets, f"diffusion.prediction={prediction}", *extra)
    with pytest.warns(UserWarning, match="null label") if extra else nullcontext():
        out = export_diffusers(run, tmp_path / "sd")
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    unet_cfg = json.loads((out / "unet" / "config.json").read_text())
    assert unet_cfg["resnet_time_scale_shift"] == ("default" if extra else "scale_shift")
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    schedule = dl.Pipeline.from_run(run).schedule
    assert sched["trained_betas"] == schedule.betas.tolist()
    assert sched["prediction_type"] == {"eps": "epsilon", "v": "v_prediction"}[prediction]

    latents = _latents()
    ours = _ours(dl.Pipeline.from_run(run), latents)
    assert ours.std() > 0.05  # non-trivial images
    theirs = _diffusers_images(out, latents)
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=0)
    back = _ours(dl.Pipeline.from_pretrained(out), latents)
    torch.testing.assert_close(back, ours, atol=1e-4, rtol=0)


def test_single_file_reads_back_to_the_runs_images(tmp_path, assets):
    run = write_sd_run(tmp_path / "run", assets)
    folder = export_diffusers(run, tmp_path / "sd")
    single = export_single_file(run, tmp_path / "model.safetensors")
    state = read_safetensors(single)
    assert detect_family(state, single) == "sd1"
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in state)
    latents = _latents(1)
    ours = _ours(dl.Pipeline.from_run(run), latents)
    back = _ours(dl.Pipeline.from_pretrained(single, tokenizer=folder), latents)
    torch.testing.assert_close(back, ours, atol=1e-4, rtol=0)


def test_cli_export_and_warnings(tmp_path, assets, capsys):
    run = write_sd_run(tmp_path / "run", assets, "model.transformer_norm_eps=1.0e-5")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["text"]["mask_padding"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["export", str(run), "--to", "diffusers", str(tmp_path / "sd")]) == 0
    err = capsys.readouterr().err
    assert "mask_padding" in err and "eps" in err
    assert (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert cli_main(["export", str(run), "--to", "diffusers", str(tmp_path / "sd")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["export", str(run), "--to", "single-file", str(tmp_path / "m.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert cli_main(["export", str(run), "--to", "kohya", str(tmp_path / "k.safetensors")]) == 2
    assert "not a LoRA fine-tuning run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"latent": {"vae": None}}, "pixel-space run"),
        ({"text": {"encoder": "transformer"}}, "word-tokenizer"),
        ({"text": {"encoder": "none"}}, "CLIP"),
        ({"diffusion": {"variance": "learned_range"}}, "variances"),
        ({"model": {"resblock_updown": True}}, "resblock_updown"),
    ],
)
def test_runs_without_a_stable_diffusion_form_are_refused(tmp_path, change, message):
    cfg = {"model": {"arch": "unet"}, "latent": {"vae": "vae"},
           "text": {"encoder": "clip"}, "diffusion": {}}  # fmt: skip
    for section, values in change.items():
        cfg[section] = {**cfg[section], **values}
    with pytest.raises(ValueError, match=message):
        check_exportable(cfg, "RUN")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=message):
        export_diffusers(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
