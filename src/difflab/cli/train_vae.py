"""``difflab train-vae``: train the KL autoencoder of latent diffusion
(``difflab.train.autoencoder.train_autoencoder``) into a folder in the SD VAE layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    UserError,
    _add_overrides,
)


def add_train_vae_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train-vae",
        help="train the KL autoencoder for latent diffusion",
        description="Train an AutoencoderKL (L1 + KL, Rombach et al. 2022) and fit its latent "
        "scale to the data. The folder (Stable Diffusion VAE layout) is what a training "
        "config's latent.vae names.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--widths", default="32,64", help="channels per level (default 32,64: 2x down)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--layers", type=int, default=1, help="residual blocks per level")
    p.add_argument("--norm-groups", type=int, default=8)
    _add_overrides(p, "a data key, e.g. --set data.source=folder --set data.path=imgs")
    p.add_argument(
        "--save-every", type=int, default=500, help="checkpoint every N steps (0: at the end)"
    )
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    _add_vae_loss_arguments(p)
    p.set_defaults(func=_train_vae)


def _add_vae_loss_arguments(p: argparse.ArgumentParser) -> None:
    """LDM's adversarial and perceptual terms, and the held-out evaluations."""
    g = p.add_argument_group("LDM's GAN and perceptual terms (Rombach et al. 2022, app. G)")
    # fmt: off
    g.add_argument("--disc-start", type=int, default=None, metavar="N",
                   help="add a PatchGAN discriminator after N warm-up steps (default: none)")
    g.add_argument("--disc-weight", type=float, default=None,
                   help="factor on the adaptive GAN weight (default 0.5)")
    g.add_argument("--disc-layers", type=int, default=None,
                   help="stride-2 layers of the PatchGAN (default 3; 8-px images fit 1)")
    g.add_argument("--disc-channels", type=int, default=None, help="its first width (64)")
    g.add_argument("--disc-lr", type=float, default=None, help="its Adam LR (default: --lr)")
    g.add_argument("--perceptual-weights", default=None, metavar="PATH",
                   help="local LPIPS-style network (.safetensors; see docs/training.md); "
                   "without it there is no perceptual term")
    g.add_argument("--perceptual-weight", type=float, default=1.0)
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="images held out for PSNR (and rFID on the digits); 0: none")
    g.add_argument("--eval-every", type=int, default=500, help="evaluate every N steps")


def _vae_loss_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``train_autoencoder`` that :func:`_add_vae_loss_arguments`
    sets."""
    from ..train.gan_loss import GANConfig

    disc = {"weight": args.disc_weight, "layers": args.disc_layers,
            "channels": args.disc_channels, "lr": args.disc_lr}  # fmt: skip
    given = {k: v for k, v in disc.items() if v is not None}
    if args.disc_start is None and given:
        names = ", ".join(f"--disc-{k}" for k in given)
        raise UserError(f"{names} configure the discriminator: add --disc-start N to use one")
    gan = None if args.disc_start is None else GANConfig(start=args.disc_start, **given)
    return {"gan": gan, "perceptual_weights": args.perceptual_weights,
            "perceptual_weight": args.perceptual_weight, "val_fraction": args.val_fraction,
            "eval_every": args.eval_every}  # fmt: skip


# What train-vae writes into its folder; --overwrite removes exactly these.
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "metrics.jsonl",
             "reconstructions.png")  # fmt: skip


def _train_vae(args: argparse.Namespace) -> int:
    import shutil

    from ..data import DataConfig
    from ..models.vae import VAEConfig
    from ..train import apply_overrides
    from ..train.autoencoder import train_autoencoder
    from ..train.config import _section_from_dict

    out = Path(args.out)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    held = (out / "config.json").exists() or (out / "checkpoint").exists()
    if held and not (args.overwrite or args.resume):
        raise UserError(
            f"{out} already holds an autoencoder or its checkpoint; pass --resume to continue "
            "it, --overwrite to replace it, or choose another folder"
        )
    for item in args.overrides:
        if not item.startswith("data."):
            raise UserError(f"--set {item!r}: train-vae takes data.* keys only")
    data = apply_overrides({"data": {"source": "digits", "image_size": 8, "channels": 1}},
                           args.overrides)["data"]  # fmt: skip
    data_cfg = _section_from_dict(DataConfig, data, "data")
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        raise UserError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
    vae = VAEConfig(
        in_channels=data_cfg.channels, out_channels=data_cfg.channels, block_out_channels=widths,
        layers_per_block=args.layers, latent_channels=args.latent_channels,
        norm_groups=args.norm_groups,
    )  # fmt: skip
    if args.overwrite:  # only once every argument has been checked
        for name in VAE_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    run = train_autoencoder(
        out, data_cfg, vae, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        kl_weight=args.kl_weight, seed=args.seed, save_every=args.save_every,
        resume=args.resume, device=args.device, **_vae_loss_options(args),
    )  # fmt: skip
    assert run is not None  # only a stop_at run stops early
    print(
        f"wrote {out} ({run.seconds:.0f} s): reconstruction L1 {run.l1:.4f}/pixel, PSNR "
        f"{run.psnr:.1f} dB, latent std {run.latent_std:.3g} -> scaling_factor "
        f"{run.scaling_factor:.4g}; use it with --set latent.vae={out}"
    )
    if run.held_out_psnr is not None:
        rfid = "" if run.rfid is None else f", reconstruction FID (digits) {run.rfid:.3g}"
        print(f"held-out images: PSNR {run.held_out_psnr:.1f} dB{rfid}")
    return 0
