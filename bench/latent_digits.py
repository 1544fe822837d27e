"""Latent diffusion on the digits, measured: an autoencoder, then the demo's U-Net on its latents.

1. ``train_autoencoder``: 8x8 digits -> latents ``[L, 4, 4]`` (one halving), L1 + KL, latent
   scale fitted to unit std.
2. A class-conditional U-Net (the demo's, sized for 4x4 inputs) trained on the scaled
   latents of the frozen autoencoder (``latent.vae``), as in Rombach et al. 2022, with
   Stable Diffusion's scaled-linear schedule.
3. 100 class-conditional samples decoded to pixels and scored by the demo's SVM, next to
   the SVM's accuracy on the autoencoder's reconstructions of real digits (the ceiling the
   autoencoder sets).

Usage::

    python bench/latent_digits.py              # ~3 min on one CPU thread
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from difflab import Pipeline
from difflab.cli import DEMO_CONFIG, _deep_copy
from difflab.data import DataConfig, build_dataset, digits_accuracy
from difflab.images import save_grid
from difflab.models import AutoencoderKL, VAEConfig
from difflab.train import TrainConfig, apply_overrides, train
from difflab.train.autoencoder import train_autoencoder

RESULTS = Path(__file__).parent / "results" / "latent_digits.md"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--steps", type=int, default=800, help="diffusion training steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="latent_digits_"))
    data = DataConfig(source="digits", image_size=8, channels=1)

    vae_cfg = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(32, 64),
                        latent_channels=args.latent_channels, norm_groups=8)  # fmt: skip
    ae = train_autoencoder(work / "vae", data, vae_cfg, steps=args.vae_steps, batch_size=64,
                           lr=2e-3, progress=False)  # fmt: skip
    vae = AutoencoderKL.from_pretrained(work / "vae")
    dataset, _ = build_dataset(data)
    real = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels_real = torch.tensor([dataset[i]["class_label"] for i in range(len(dataset))])
    with torch.no_grad():
        recon = vae.decode(vae.encode(real).mean).clamp(-1, 1)
    recon_acc = digits_accuracy(recon, labels_real)

    cfg = _deep_copy(DEMO_CONFIG)
    cfg["run_dir"] = str(work / "ldm")
    cfg["latent"] = {"vae": str(work / "vae")}
    # Stable Diffusion's schedule. The demo's cosine schedule has alpha ~ 5e-5 at t = T-1,
    # so the first trailing step multiplies the eps error by ~2e4; pixel models clip x0-hat
    # to [-1, 1], latents have no range to clip to (measured: cosine 60%, linear 83%,
    # scaled_linear 99% at CFG 2, same autoencoder and U-Net).
    cfg["diffusion"]["schedule"] = {"name": "scaled_linear", "T": 1000, "beta_start": 0.00085,
                                    "beta_end": 0.012}  # fmt: skip
    cfg = apply_overrides(cfg, [f"train.max_steps={args.steps}"])
    start = time.perf_counter()
    train(TrainConfig.from_dict(cfg), progress=False)
    ldm_s = time.perf_counter() - start

    pipe = Pipeline.from_run(work / "ldm")
    labels = torch.arange(10).repeat_interleave(10)
    rows = []
    for w in (1.0, 2.0, 3.0):
        images = pipe(n=100, class_labels=labels, guidance_scale=w, seed=0)
        save_grid(images, work / f"cfg{w:g}.png", nrow=10)
        rows.append((w, digits_accuracy(images, labels)))
    best = max(rows, key=lambda r: r[1])
    picture = args.out.with_suffix(".png")
    grid = pipe(n=100, class_labels=labels, guidance_scale=best[0], seed=0)
    params = pipe.resolve_params(n=100, class_labels=labels, guidance_scale=best[0])
    big = torch.nn.functional.interpolate(grid, scale_factor=4.0)  # 8x8 digits, 4x larger
    save_grid(big, picture, nrow=10, params=params)

    lines = [
        "# Latent diffusion on the digits",
        "",
        f"`python bench/latent_digits.py --vae-steps {args.vae_steps} --latent-channels "
        f"{args.latent_channels} --steps {args.steps}` ({args.threads} thread, torch "
        f"{torch.__version__}).",
        "",
        f"- Autoencoder: widths (32, 64), 8x8x1 pixels -> {args.latent_channels}x4x4 latents, "
        f"{args.vae_steps} steps in {ae.seconds:.0f} s; reconstruction L1 {ae.l1:.3f} per "
        f"pixel, PSNR {ae.psnr:.1f} dB; latent std {ae.latent_std:.3f}, so scaling_factor "
        f"{ae.scaling_factor:.4f}. The SVM recognises {100 * recon_acc:.1f}% of the "
        "reconstructions of all 1,797 real digits (the ceiling for decoded samples).",
        f"- Diffusion: the demo's class-conditional U-Net on the 4x4 latents with the "
        f"scaled-linear schedule (beta 0.00085-0.012, as Stable Diffusion), {args.steps} "
        f"steps in {ldm_s:.0f} s; DPM-Solver++(2M), 20 steps, 100 samples (10 per digit), "
        "decoded by the autoencoder.",
        "- Schedule matters here (measured by hand on 2026-11-27 with an autoencoder of this "
        "recipe whose biases were initialised from the global RNG; not re-run by this "
        "script): with the demo's cosine schedule the same run reached 52-62% "
        "(trailing spacing; 96% with leading), with linear 83%, with scaled-linear 99% "
        "(CFG 2). Cosine's alpha at t = T-1 is ~5e-5, so the first step multiplies the "
        "eps error by ~2e4; pixel models clip x0-hat to [-1, 1], latents have no range to "
        "clip to.",
        "",
        "| CFG scale | SVM accuracy of decoded samples |",
        "|---:|---:|",
        *[f"| {w:g} | {100 * acc:.0f}% |" for w, acc in rows],
        "",
        f"![decoded samples at CFG {best[0]:g}, one row per digit]({picture.name})",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
