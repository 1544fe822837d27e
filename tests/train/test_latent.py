"""Latent diffusion: the autoencoder trainer fits its latent scale, the U-Net trains on the
scaled latents of a frozen autoencoder, resumes exactly, and the Pipeline decodes."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import eps_mse_by_hand, one_thread, tiny_config, train_with_a_cut  # noqa: F401

import difflab as dl
from difflab.cli import main as cli_main
from difflab.data import DataConfig, build_dataset
from difflab.models import AutoencoderKL, VAEConfig
from difflab.samplers import img2img, sample
from difflab.train import Trainer, load_checkpoint, load_config, train
from difflab.train.autoencoder import train_autoencoder

VAE = dict(in_channels=1, out_channels=1, block_out_channels=(16, 32), latent_channels=2,
           norm_groups=8)  # fmt: skip


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch.set_num_threads(1)
    data = DataConfig(source="digits", image_size=8, channels=1)
    run = train_autoencoder(folder, data, VAEConfig(**VAE), steps=30, batch_size=32, lr=2e-3,
                            progress=False, log_every=10)  # fmt: skip
    return folder, run


def latent_opts(folder):
    return [f"latent.vae={folder}", "model.image_size=4", "model.in_channels=2",
            "model.attention_resolutions=[2]", "model.num_classes=10"]  # fmt: skip


def test_autoencoder_training_fits_a_unit_latent_scale(vae_dir):
    folder, run = vae_dir
    vae = AutoencoderKL.from_pretrained(folder)
    assert vae.config.scaling_factor == pytest.approx(1 / run.latent_std)
    assert (folder / "reconstructions.png").is_file()
    # The scaled posterior samples of the data have unit std (what the scale is for).
    data, _ = build_dataset(DataConfig(source="digits", image_size=8, channels=1))
    x = torch.stack([data[i]["image"] for i in range(2048 if len(data) > 2048 else len(data))])
    with torch.no_grad():
        z = vae.latents(x, generator=torch.Generator().manual_seed(5))
    assert float(z.std()) == pytest.approx(1.0, abs=0.03)
    rows = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
    steps = [r for r in rows if "l1_per_pixel" in r]
    assert steps[-1]["l1_per_pixel"] < steps[0]["l1_per_pixel"]  # it learns
    assert 0 < run.l1 < 1 and run.psnr > 6 and run.held_out_psnr > 6


def test_config_follows_the_latent_and_refuses_contradictions(vae_dir, tmp_path):
    folder, _ = vae_dir
    cfg = load_config(None, [f"latent.vae={folder}", "data.image_size=8",
                             "model.attention_resolutions=[2]"])  # fmt: skip
    assert (cfg.model_config().in_channels, cfg.model_config().image_size) == (2, 4)
    with pytest.raises(ValueError, match=r"contradicts the autoencoder's latent .* --set mod"):
        load_config(None, [f"latent.vae={folder}", "data.image_size=8", "model.in_channels=1"])
    # a config that sets the pixel sizes (configs/image_folder.yaml) is overridden with null
    cleared = load_config(None, [f"latent.vae={folder}", "data.image_size=8",
                                 "model.attention_resolutions=[2]", "model.in_channels=null",
                                 "model.image_size=null"])  # fmt: skip
    assert (cleared.model_config().in_channels, cleared.model_config().image_size) == (2, 4)
    with pytest.raises(ValueError, match="encodes 1-channel images"):
        load_config(None, [f"latent.vae={folder}", "data.channels=3", "data.image_size=8",
                           "model.attention_resolutions=[2]"])  # fmt: skip
    with pytest.raises(ValueError, match="not a multiple of the autoencoder's"):
        load_config(None, [f"latent.vae={folder}", "data.image_size=9",
                           "model.attention_resolutions=[2]"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="holds no autoencoder"):
        load_config(None, [f"latent.vae={tmp_path}"])


def test_the_unet_trains_on_the_scaled_latents(vae_dir, tmp_path):
    folder, _ = vae_dir
    cfg = tiny_config(tmp_path, *latent_opts(folder), "data.source=digits",
                      "latent.sample_posterior=false")  # fmt: skip
    trainer = Trainer.from_config(cfg)
    try:
        batch = trainer.stream.next()
        mb = trainer.loss.draw(batch)
        vae = AutoencoderKL.from_pretrained(folder)
        with torch.no_grad():
            expected = vae.latents(batch["image"].float())
        torch.testing.assert_close(mb.x0, expected, rtol=0, atol=0)
        assert not any(p.requires_grad for p in trainer.conditioning.vae.parameters())
    finally:
        trainer.close()


def test_latent_run_resumes_bit_for_bit_and_the_pipeline_decodes(vae_dir, tmp_path):
    folder, _ = vae_dir
    opts = [*latent_opts(folder), "data.source=digits", "train.max_steps=4",
            "train.sample_every=4"]  # fmt: skip
    full = train(tiny_config(tmp_path / "full", *opts))
    rest = train_with_a_cut(tiny_config(tmp_path / "split", *opts), 2)
    assert rest.losses == full.losses[2:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    for k in a.ema:
        assert torch.equal(a.ema[k], b.ema[k]), k
    assert (tmp_path / "full" / "samples" / "step_000004_ema.png").is_file()

    pipe = dl.Pipeline.from_run(tmp_path / "full")
    images = pipe(n=2, class_labels=[1, 3], sampler="ddim", steps=3, guidance_scale=2.0, seed=0)
    assert images.shape == (2, 1, 8, 8) and pipe.image_shape == (2, 4, 4)
    with torch.no_grad():
        latents = sample(
            pipe.model, (2, 2, 4, 4), schedule=pipe.schedule, sampler="ddim", steps=3,
            guidance_scale=2.0, cond={"class_labels": torch.tensor([1, 3])},
            uncond={"class_labels": torch.tensor([10, 10])},
            generator=[torch.Generator().manual_seed(i) for i in range(2)], progress=False,
        )  # fmt: skip
        expected = AutoencoderKL.from_pretrained(folder).images(latents).clamp(-1, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    params = pipe.resolve_params(n=1)
    assert params["clip_x0"] is False and params["latent"] is True
    with pytest.raises(ValueError, match="samples autoencoder latents"):
        pipe(n=1, steps=2, clip_x0=True)

    # image-to-image noises and denoises the posterior-mean latents, then decodes
    assert pipe.pixel_shape == (1, 8, 8)
    result = pipe.img2img(images, 0.5, class_labels=[1, 3], sampler="ddim", steps=4, seed=3)
    with torch.no_grad():
        vae = AutoencoderKL.from_pretrained(folder)
        direct = img2img(
            pipe.model, vae.latents(images), strength=0.5, schedule=pipe.schedule,
            sampler="ddim", steps=4, guidance_scale=pipe.sample_defaults["guidance_scale"],
            cond={"class_labels": torch.tensor([1, 3])},
            uncond={"class_labels": torch.tensor([10, 10])},
            generator=[torch.Generator().manual_seed(3 + i) for i in range(2)], progress=False,
        )  # fmt: skip
        expected = vae.images(direct.images).clamp(-1, 1)
    torch.testing.assert_close(result.images, expected, rtol=0, atol=1e-6)
    assert result.timesteps == direct.timesteps and len(result.timesteps) == 2
    with pytest.raises(ValueError, match=r"images have 2 channels but this model makes 1-channel"):
        pipe.img2img(torch.zeros(1, 2, 4, 4), 0.5)

    # inpainting a latent run: the latent cells touching the hole are generated (a 2x2 pixel
    # hole at rows/cols 3-4 touches the 4 cells at 1-2 of the 4x4 latent grid), the kept
    # pixels are pasted back exactly
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., 3:5, 3:5] = 1.0
    inpainted = pipe.img2img(images, 1.0, class_labels=[1, 3], sampler="ddim", steps=4, seed=3,
                             mask=hole)  # fmt: skip
    assert torch.equal(inpainted.images * (1 - hole), images * (1 - hole))
    cells = torch.zeros(1, 1, 4, 4)
    cells[..., 1:3, 1:3] = 1.0
    with torch.no_grad():
        latents = vae.latents(images)
        direct = img2img(
            pipe.model, latents, strength=1.0, schedule=pipe.schedule, sampler="ddim", steps=4,
            guidance_scale=pipe.sample_defaults["guidance_scale"],
            cond={"class_labels": torch.tensor([1, 3])},
            uncond={"class_labels": torch.tensor([10, 10])}, inpaint_image=latents,
            inpaint_mask=cells, generator=[torch.Generator().manual_seed(3 + i) for i in range(2)],
            progress=False,
        )  # fmt: skip
        expected = vae.images(direct.images).clamp(-1, 1)
    torch.testing.assert_close(inpainted.images * hole, expected * hole, rtol=0, atol=1e-6)


def test_cli_train_vae(tmp_path, capsys):
    out = tmp_path / "vae"
    args = ["train-vae", "--out", str(out), "--steps", "3", "--batch-size", "16",
            "--widths", "8,16", "--latent-channels", "2"]  # fmt: skip
    assert cli_main(args) == 0
    assert "scaling_factor" in capsys.readouterr().out
    assert AutoencoderKL.from_pretrained(out).config.block_out_channels == (8, 16)
    assert cli_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite", "--set", "train.lr=1"]) == 2
    assert "data.* keys only" in capsys.readouterr().err
    assert cli_main([*args, "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert (out / "checkpoint" / "train_state" / "state.json").is_file()
    assert cli_main([*args[:4], "5", *args[5:], "--resume"]) == 0  # 3 more steps
    assert json.loads((out / "checkpoint" / "train_state" / "state.json").read_text())["step"] == 5
    assert cli_main([*args, "--overwrite"]) == 0  # deletes the checkpoint, starts again
    assert json.loads((out / "checkpoint" / "train_state" / "state.json").read_text())["step"] == 3


def test_autoencoder_resume_is_bit_exact(tmp_path):
    """12 steps in one go equal 6 + resume + 6 (weights, fitted scale, logged losses), with
    random flips and posterior sampling drawing from the checkpointed generators."""
    from safetensors.torch import load_file

    data = DataConfig(source="digits", image_size=8, channels=1, random_flip=True)
    kw = dict(steps=12, batch_size=16, lr=2e-3, progress=False, log_every=1, save_every=4,
              device="cpu")  # fmt: skip
    full = train_autoencoder(tmp_path / "full", data, VAEConfig(**VAE), **kw)
    assert train_autoencoder(tmp_path / "cut", data, VAEConfig(**VAE), stop_at=6, **kw) is None
    assert not (tmp_path / "cut" / "config.json").exists()  # no half-trained autoencoder
    with pytest.raises(ValueError, match="holds a checkpoint of an earlier run"):
        train_autoencoder(tmp_path / "cut", data, VAEConfig(**VAE), **kw)
    with pytest.raises(ValueError, match=r"other settings \(lr differ\)"):
        train_autoencoder(tmp_path / "cut", data, VAEConfig(**VAE), resume=True,
                          **{**kw, "lr": 1e-3})  # fmt: skip
    rest = train_autoencoder(tmp_path / "cut", data, VAEConfig(**VAE), resume=True, **kw)

    a = load_file(tmp_path / "full" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rest.scaling_factor == full.scaling_factor and rest.final_loss == full.final_loss

    def losses(folder):
        rows = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses(tmp_path / "full") == losses(tmp_path / "cut")  # steps 1-12 in both logs


def test_latent_run_validation_scores_posterior_mean_latents(vae_dir, tmp_path):
    from safetensors.torch import load_file

    from difflab.models import UNet
    from difflab.schedules import NoiseSchedule
    from difflab.train.loop import _subseed

    folder, _ = vae_dir
    val = ["train.val_fraction=0.01", "train.val_every=2", "train.val_timesteps=3"]
    cfg = tiny_config(tmp_path, *latent_opts(folder), *val, "data.source=digits",
                      "model.dropout=0", "train.max_steps=2")  # fmt: skip
    train(cfg, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    last = [r for r in map(json.loads, lines) if r.get("event") == "validation"][-1]
    trainer = Trainer.from_config(cfg, progress=False)
    held, data = trainer.val_set.indices, trainer.val_set.dataset
    trainer.close()
    vae = AutoencoderKL.from_pretrained(folder)
    with torch.no_grad():
        images = torch.stack([data[i]["image"] for i in held])
        x0 = vae.encode(images).mean * vae.config.scaling_factor  # shift 0
    net = UNet(cfg.resolve().model_config())
    net.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    net.eval()
    labels = torch.tensor([data[i]["class_label"] for i in held])
    schedule = NoiseSchedule.from_config(cfg.diffusion.schedule)
    want = eps_mse_by_hand(net, schedule, x0, {"class_labels": labels},
                           _subseed(cfg.seed, 51), 3, 8)  # fmt: skip
    assert last["val_loss"] == pytest.approx(want, rel=1e-5)


def test_periodic_eval_of_a_latent_run_scores_decoded_images(vae_dir, tmp_path):
    """eval_every on a latent run equals evaluating the saved run (whose Pipeline decodes)."""
    from difflab.eval import evaluate_pipeline

    folder, _ = vae_dir
    opts = [*latent_opts(folder), "data.source=digits", "train.max_steps=2", "train.eval_every=2",
            "train.eval_n=20", "train.eval_metrics=accuracy", "sample.steps=3"]  # fmt: skip
    result = train(tiny_config(tmp_path, *opts), progress=False)
    logged = result.evals[-1]
    pipe = dl.Pipeline.from_run(tmp_path)
    direct = evaluate_pipeline(pipe, metrics=["accuracy"], n=20, seed=0)
    key = "accuracy[digits-cnn]"
    assert logged[key] == direct[key] and 0.0 <= direct[key] <= 1.0
