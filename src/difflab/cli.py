"""The ``difflab`` command: ``demo``, ``train``, ``train-vae``, ``finetune``, ``export``,
``sample``, ``serve``, ``ema``, ``eval`` and ``sweep``.

Owns argument parsing and error reporting only: each subcommand parses, builds the
library objects and calls them (``difflab.train.train``, ``difflab.Pipeline``,
``difflab.images.save_grid``).  Bad input exits with status 2 and a one-line message,
not a traceback (set ``DIFFLAB_DEBUG=1`` to see the traceback).

Adding a subcommand is one function ``add_<name>_parser(subparsers)`` that registers a
parser with ``set_defaults(func=run)`` where ``run(args) -> int``; ``eval`` and ``sweep``
live beside the metrics in ``difflab.eval.cli_eval``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEMO_CONFIG", "build_parser", "finetune_config", "main", "run_demo"]

# The digits demo: a class-conditional U-Net on the embedded 8x8 digits, sized to train in
# a few minutes on 2 CPU cores (see docs/demo.md for measured time and accuracy).  The same
# content lives in configs/digits.yaml.
DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "run_dir": "runs/demo",
    "model": {  # image_size and in_channels follow the data (or latent.vae)
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [],
        "num_heads": 2,
        "dropout": 0.0,
        "num_classes": 10,
        "norm_groups": 8,
    },
    "diffusion": {
        "schedule": {"name": "cosine", "T": 1000},
        "prediction": "eps",
        "variance": "fixedsmall",
        "cond_drop_prob": 0.1,
    },
    "data": {"source": "digits", "image_size": 8, "channels": 1},
    "train": {
        "batch_size": 128,
        "lr": 1.0e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 50,
        "max_steps": 800,
        "ema_decay": 0.995,
        "log_every": 100,
        "sample_every": 0,
        "save_every": 0,
        "tensorboard": False,
    },
    "sample": {"sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 2.0},
}
DEMO_PER_CLASS = 10  # samples per digit: a 10 x 10 grid, 100 images scored by the SVM
# `difflab demo --text`: the same U-Net conditioned on the captions ("a handwritten digit
# seven") through a small transformer trained with it, instead of on class labels.
DEMO_TEXT_OVERRIDES = (
    "model.num_classes=null",
    "text.encoder=transformer",
    "text.width=64",
    "text.layers=2",
    "text.heads=4",
    "text.max_length=8",
)

AddParser = Callable[[Any], None]


class UserError(Exception):
    """Bad command-line input (exit status 2)."""


# Files a training run (and the demo) writes into its run directory; --overwrite removes
# exactly these, never anything else a user keeps there.
RUN_FILES = ("config.yaml", "model.safetensors", "ema.safetensors", "metrics.jsonl",
             "demo_grid.png", "tokenizer.json", "lora.safetensors", "best.safetensors")  # fmt: skip
RUN_DIRS = ("train_state", "samples", "tensorboard")


def prepare_run_dir(run_dir: str | Path, *, overwrite: bool, resume: bool = False) -> None:
    """Refuse to train over an existing run unless ``resume`` or ``overwrite`` says what to do.

    With ``overwrite`` the run's own files (``RUN_FILES``, ``RUN_DIRS``, ``train_state.*``)
    are deleted first; other files in the folder are left alone.
    """
    import shutil

    from .train import find_checkpoint

    run_dir = Path(run_dir)
    if resume or find_checkpoint(run_dir) is None:
        return
    if not overwrite:
        raise UserError(
            f"{run_dir} already holds a trained run; pass --resume to continue it, "
            "--overwrite to delete it and start again, or choose another directory"
        )
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for path in [run_dir / d for d in RUN_DIRS] + list(run_dir.glob("train_state.*")):
        if path.is_dir():  # other torchrun ranks may be deleting the same tree
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- demo
def run_demo(
    out: str | Path = "runs/demo",
    *,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    sample_steps: int | None = None,
    per_class: int = DEMO_PER_CLASS,
    overrides: Sequence[str] = (),
    text: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the digits demo, sample every class, score the samples with an SVM.

    :param overrides: ``key.sub=value`` changes to ``DEMO_CONFIG`` (as ``difflab train --set``).
    :param text: condition on the captions through a text encoder trained with the U-Net
        (``DEMO_TEXT_OVERRIDES``) and sample each class from its caption, e.g. "a
        handwritten digit seven", instead of from its label.
    :return: ``{"run_dir", "grid", "accuracy", "train_seconds", "sample_seconds",
        "elapsed_seconds", "steps", "guidance_scale", "sampler", "sample_steps"}``.
    """
    import torch

    from .data import digits_accuracy, digits_caption
    from .images import save_grid
    from .pipeline import Pipeline
    from .train import TrainConfig, apply_overrides, train

    start = time.perf_counter()
    cfg_dict = _deep_copy(DEMO_CONFIG)
    cfg_dict["run_dir"] = str(out)
    cfg_dict["seed"] = seed
    if steps is not None:
        cfg_dict["train"]["max_steps"] = steps
        cfg_dict["train"]["warmup_steps"] = min(cfg_dict["train"]["warmup_steps"], steps)
    if text:
        overrides = [*DEMO_TEXT_OVERRIDES, *overrides]
    config = TrainConfig.from_dict(apply_overrides(cfg_dict, overrides))
    train(config, progress=progress)
    trained = time.perf_counter()

    pipe = Pipeline.from_run(out)
    labels = torch.arange(10).repeat_interleave(per_class)  # one row per class
    cond: tuple[Any, Any] = (labels, None)
    if text:
        cond = (None, [digits_caption(k) for k in labels.tolist()])
    params = pipe.resolve_params(len(labels), *cond, sampler, sample_steps, guidance_scale, seed)
    images = pipe(len(labels), *cond, sampler, sample_steps, guidance_scale, seed, progress)
    grid = save_grid(images, Path(out) / "demo_grid.png", nrow=per_class, params=params)
    accuracy = digits_accuracy(images, labels)
    done = time.perf_counter()
    result = {
        "run_dir": str(out),
        "grid": str(grid),
        "accuracy": accuracy,
        "train_seconds": trained - start,
        "sample_seconds": done - trained,
        "elapsed_seconds": done - start,
        "steps": config.train.max_steps,
        "guidance_scale": params["guidance_scale"],
        "sampler": params["sampler"],
        "sample_steps": params["steps"],
    }
    log(f"wrote {grid} (10 classes x {per_class}) and the run in {out}")
    what = "caption-conditioned" if text else "class-conditional"
    log(
        f"SVM accuracy on {what} samples: {100 * accuracy:.1f}% "
        f"({params['sampler']}, {params['steps']} steps, CFG {params['guidance_scale']})"
    )
    log(
        f"elapsed: {result['elapsed_seconds']:.1f} s "
        f"(train {result['train_seconds']:.1f} s, sample+score {result['sample_seconds']:.1f} s)"
    )
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides, as ``difflab.train.load_config``."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def add_demo_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a class-conditional model on the embedded digits and score its samples",
        description="Train the digits demo (a few minutes on a laptop CPU), write a sample "
        "grid with one row per class, and print the accuracy an SVM trained on real "
        "digits reaches on the samples.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an earlier demo run in --out first"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--sampler", default=None, help="sampler name (default: dpmpp_2m)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps")
    p.add_argument("--per-class", type=int, default=DEMO_PER_CLASS, help="samples per class")
    p.add_argument(
        "--text",
        action="store_true",
        help="condition on the captions ('a handwritten digit seven') through a text encoder "
        "trained with the U-Net, and sample from captions instead of labels",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: this tiny model gains little from more, and two "
        "threads on two busy cores run many times slower; 0 = torch's default)",
    )
    _add_overrides(p, "override a key of the demo config, e.g. --set model.model_channels=64")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    prepare_run_dir(args.out, overwrite=args.overwrite)
    run_demo(
        args.out,
        steps=args.steps,
        seed=args.seed,
        guidance_scale=args.cfg,
        sampler=args.sampler,
        sample_steps=args.sample_steps,
        per_class=args.per_class,
        overrides=args.overrides,
        text=args.text,
    )
    return 0


# ---------------------------------------------------------------------------- train
def add_train_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from CONFIG.yaml; the resolved config is written to the run.",
    )
    p.add_argument("config", help="YAML config (see configs/)")
    _add_overrides(p, "override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="resume from the run's checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run in run_dir first"
    )
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config file {args.config!r} does not exist")
    config = load_config(args.config, args.overrides)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    prepare_run_dir(config.run_dir, overwrite=args.overwrite, resume=args.resume)
    train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run
        print(f"run written to {config.run_dir}")
    return 0


# ---------------------------------------------------------------------------- train-vae
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
    # fmt: on


def _vae_loss_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``train_autoencoder`` that :func:`_add_vae_loss_arguments`
    sets."""
    from .train.gan_loss import GANConfig

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

    from .data import DataConfig
    from .models.vae import VAEConfig
    from .train import apply_overrides
    from .train.autoencoder import train_autoencoder
    from .train.config import _section_from_dict

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


# ---------------------------------------------------------------------------- finetune
def add_finetune_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a finished run: LoRA/DoRA/LoHa/LoKr adapters, DreamBooth, textual "
        "inversion",
        description="Fine-tune BASE (its config and weights; new data through --set data.*): "
        "LoRA (Hu et al. 2021), DoRA, or LyCORIS' LoHa / LoKr adapters (--adapter; on conv "
        "targets too: LoCon), optionally DreamBooth's prior preservation "
        "(--prior) and a textual-inversion word (--new-word). Only the adapters / the word "
        "train. Writes a run directory with lora.safetensors and/or embedding.safetensors "
        "(EMA weights) beside the usual checkpoint.",
    )
    p.add_argument(
        "base",
        help="the run to adapt: a run directory, or a Stable Diffusion 1.x/2.x model (a "
        "diffusers folder, or a single .safetensors file with --tokenizer), imported as "
        "OUT/sd_base; its U-Net adapter is also written in kohya / LyCORIS layout "
        "(lora_kohya.safetensors)",
    )
    p.add_argument("--tokenizer", default=None, help="SD single files: a tokenizer folder")
    p.add_argument(
        "--prediction",
        default=None,
        choices=["eps", "v", "x0"],
        help="SD models: override the prediction type (SD 2.x single files need it)",
    )
    p.add_argument("--out", required=True, help="run directory of the fine-tuning run")
    p.add_argument(
        "--adapter",
        default="lora",
        choices=["lora", "loha", "lokr"],
        help="lora (default), loha (LyCORIS' Hadamard product) or lokr (LyCORIS' Kronecker "
        "product)",
    )
    p.add_argument("--rank", type=int, default=4, help="adapter rank (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="adapter alpha (default: the rank)")
    p.add_argument(
        "--lokr-factor",
        type=int,
        default=-1,
        help="LoKr: the Kronecker factor size (default -1: LyCORIS' automatic split)",
    )
    p.add_argument(
        "--targets",
        default="attention",
        help="attention, conv, attention+conv (also 'attention,conv'), or comma-separated "
        "module-name patterns (e.g. '*.qkv,*.proj_out'); conv targets give LoCon",
    )
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    p.add_argument(
        "--dora", action="store_true", help="weight-decomposed LoRA (a trained magnitude per unit)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: base's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: base's)")
    p.add_argument(
        "--prior",
        default=None,
        metavar="PROMPT|LABEL",
        help="DreamBooth prior preservation: the class prompt (or class label) whose base-run "
        "samples are trained alongside the instance data",
    )
    p.add_argument("--prior-images", type=int, default=100, help="prior samples (default 100)")
    p.add_argument("--prior-weight", type=float, default=1.0, help="lambda of the prior loss")
    p.add_argument(
        "--new-word",
        default=None,
        help="textual inversion: add this word to a text run's vocabulary and train its "
        "embedding (with --targets none, nothing else trains)",
    )
    p.add_argument("--init-word", default=None, help="the word whose embedding starts it")
    _add_overrides(p, "override a config key, e.g. --set data.source=npz (repeatable)")
    p.add_argument("--resume", action="store_true", help="resume the fine-tuning run")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out first")
    p.set_defaults(func=_finetune)


def finetune_config(
    base: str | Path,
    out: str | Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    targets: str | list[str] = "attention",
    adapter: str = "lora",
    rslora: bool = False,
    dora: bool = False,
    lokr_factor: int = -1,
    overrides: Sequence[str] = (),
    prior: str | int | None = None,
    prior_images: int = 100,
    prior_weight: float = 1.0,
    new_word: str | None = None,
    init_word: str | None = None,
) -> Any:
    """The config of an adapter run (``adapter``: lora, loha or lokr) on ``base``: its config
    with ``finetune`` set, ``run_dir`` = ``out``, its train/sample/text sections kept, then
    ``overrides``."""
    from .runs import read_run_config
    from .train import TrainConfig, apply_overrides

    cfg = read_run_config(base)
    cfg["run_dir"] = str(out)
    cfg["finetune"] = dict(
        base_run=str(base), adapter=adapter, rank=rank, alpha=alpha, targets=targets,
        rslora=rslora, dora=dora, lokr_factor=lokr_factor, prior_condition=prior,
        prior_images=prior_images, prior_weight=prior_weight, new_word=new_word,
        init_word=init_word,
    )  # fmt: skip
    return TrainConfig.from_dict(apply_overrides(cfg, overrides))


def _finetune(args: argparse.Namespace) -> int:
    from .train import train

    targets: str | list[str] = args.targets
    parts = [t.strip() for t in args.targets.split(",") if t.strip()]
    if parts and all(p in ("attention", "conv") for p in parts):  # 'attention,conv'
        targets = "+".join(sorted(set(parts)))
    elif "," in targets or "*" in targets or "." in targets:
        targets = parts
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if args.lr is not None:
        overrides.append(f"train.lr={args.lr}")
    prior: str | int | None = args.prior
    if prior is not None and prior.strip().isdigit():
        prior = int(prior)  # a class label
    base, stable_diffusion = _finetune_base(args)
    config = finetune_config(
        base, args.out, rank=args.rank, alpha=args.alpha, targets=targets,
        adapter=args.adapter, rslora=args.rslora, dora=args.dora, lokr_factor=args.lokr_factor,
        overrides=overrides, prior=prior,
        prior_images=args.prior_images, prior_weight=args.prior_weight,
        new_word=args.new_word, init_word=args.init_word,
    )  # fmt: skip
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    prepare_run_dir(config.run_dir, overwrite=args.overwrite, resume=args.resume)
    train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        if stable_diffusion and config.finetune.targets != "none" and not config.finetune.dora:
            from .interop.export import export_kohya_lora

            export_kohya_lora(config.run_dir)
        made = [n for n in ("lora.safetensors", "lora_kohya.safetensors", "embedding.safetensors")
                if (Path(config.run_dir) / n).is_file()]  # fmt: skip
        print(f"fine-tuning run written to {config.run_dir} ({', '.join(made)})")
    return 0


def _finetune_base(args: argparse.Namespace) -> tuple[str, bool]:
    """``(base run, is it an imported Stable Diffusion model)``: an SD folder or file is
    written as a difflab run in OUT/sd_base first (kept on --resume)."""
    from .interop.sd import path_kind

    if path_kind(args.base) == "run":
        return str(args.base), False
    from .interop.sd_import import import_stable_diffusion

    base = Path(args.out) / "sd_base"
    if not (args.resume and (base / "config.yaml").is_file()):
        import_stable_diffusion(args.base, base, tokenizer=args.tokenizer,
                                prediction=args.prediction)  # fmt: skip
    return str(base), True


# ---------------------------------------------------------------------------- export
def add_export_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a text-to-image latent run as a diffusers folder, a single file or a "
        "kohya LoRA",
        description="Write RUN (a latent run with a frozen CLIP text encoder) as a diffusers "
        "Stable Diffusion folder (--to diffusers), an original-layout .safetensors file "
        "(--to single-file), or a fine-tuning run's LoRA in kohya layout (--to kohya).",
    )
    p.add_argument("run", help="the run directory")
    p.add_argument("--to", required=True, choices=["diffusers", "single-file", "kohya"])
    p.add_argument("out", help="the folder (diffusers) or .safetensors file to write")
    p.add_argument("--weights", default="ema", help="ema (default), raw or a weights file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from .interop import export

    if args.to == "kohya":
        if Path(args.out).exists() and not args.overwrite:
            raise UserError(f"{args.out} already exists; pass --overwrite to replace it")
        out = export.export_kohya_lora(args.run, args.out, weights=args.weights)
    else:
        write = export.export_diffusers if args.to == "diffusers" else export.export_single_file
        out = write(args.run, args.out, weights=args.weights, overwrite=args.overwrite)
    print(f"{args.run} written to {out} ({args.to})")
    return 0


# ---------------------------------------------------------------------------- sample
def add_sample_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sample",
        help="draw images from a trained run into a PNG grid",
        description="Sample a run directory. The PNG's 'difflab' text chunk holds every "
        "generation parameter as JSON.",
    )
    p.add_argument(
        "run",
        nargs="?",
        default=None,
        help="a run directory, a diffusers Stable Diffusion folder or an SD .safetensors file; "
        "with --from-png, default: the run the PNG's difflab parameters name",
    )
    p.add_argument(
        "--from-png",
        default=None,
        metavar="PNG",
        help="re-create an image from its parameters (difflab's or AUTOMATIC1111's text "
        "chunk); the other flags given override them",
    )
    p.add_argument("--weights", default="ema", help="runs: ema, raw or a weights file")
    _add_model_args(p)
    p.add_argument("--sampler", default=None, help="sampler name or alias")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--spacing", default=None, help="timestep spacing (default: the sampler's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    add_refinement_args(p)
    p.add_argument(
        "--init-image",
        default=None,
        metavar="PNG",
        help="image-to-image (SDEdit): start from this image (resized and centre-cropped to "
        "the run's size); each of the --n images is a variation from its own seed",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --init-image: the fraction of the steps run, in (0, 1] (1 = from pure noise)",
    )
    p.add_argument(
        "--mask",
        default=None,
        metavar="PNG",
        help="with --init-image: inpaint; white = generate, black = keep (grey blends)",
    )
    p.add_argument(
        "--class",
        dest="classes",
        type=int,
        nargs="+",
        default=None,
        help="class label(s): one for all images, or K labels each repeated n/K times",
    )
    p.add_argument("--prompt", default=None)
    p.add_argument(
        "--no-clip", action="store_true", help="do not clip each x0 prediction to [-1, 1]"
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--n", type=int, default=None, help="number of images (default 16)")
    p.add_argument(
        "--vae-tiling", action="store_true",
        help="latent models: decode in overlapping tiles (large images in less memory)",
    )  # fmt: skip
    p.add_argument(
        "--vae-slicing", action="store_true", help="latent models: decode one image at a time"
    )
    p.add_argument(
        "--clip-skip", type=int, default=None, metavar="N",
        help="SD models: A1111's Clip skip (1 = the text encoder's last layer, 2 = the one "
        "before it)",
    )  # fmt: skip
    for side in ("height", "width"):
        p.add_argument(
            f"--{side}", type=int, default=None, metavar="PX",
            help=f"image {side} in pixels (default: the model's own)",
        )  # fmt: skip
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    p.add_argument("-o", "--out", default=None, help="output PNG (default RUN/samples/...)")
    p.add_argument("--separate", action="store_true", help="also write one PNG per image")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the network first (Pipeline.compile)"
    )
    _add_device_args(p)
    _add_adapter_args(p)
    _defer_defaults(p)
    p.set_defaults(func=_sample)


def add_refinement_args(p: argparse.ArgumentParser) -> None:
    """``--cfg-rescale``, ``--cfg-interval LO HI``, ``--eta``, ``--apg`` and its options
    (``sample``, ``eval``, ``sweep``)."""
    p.add_argument(
        "--cfg-rescale",
        type=float,
        default=0.0,
        metavar="PHI",
        help="guidance rescale phi in [0, 1] (Lin et al. 2023; 0.7 is their choice)",
    )
    p.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="guide only at noise levels LO < sigma <= HI (k-diffusion/EDM sigma; "
        "Kynkäänniemi et al. 2024); the conditional prediction alone elsewhere",
    )
    p.add_argument(
        "--eta", type=float, default=None, help="stochasticity of DDIM / ancestral / SDE samplers"
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        metavar="TEXT",
        help="text models: what guidance steers away from (in place of the empty prompt)",
    )
    p.add_argument(
        "--negative-class",
        type=int,
        default=None,
        metavar="K",
        help="class models: the class guidance steers away from (in place of the null label)",
    )
    p.add_argument(
        "--apg",
        action="store_true",
        help="adaptive projected guidance in place of plain CFG (Sadat et al. 2025; "
        "defaults eta 0, no momentum, no norm cap)",
    )
    for name, metavar, text in (
        ("eta", "ETA", "weight of the update's part parallel to the prediction (1 = CFG's)"),
        ("momentum", "BETA", "momentum of the guidance direction over the steps (paper: -0.5)"),
        ("threshold", "R", "cap on the norm of the guidance direction (0 = none)"),
    ):
        p.add_argument(
            f"--apg-{name}", type=float, default=None, metavar=metavar,
            help=f"APG: {text}; implies --apg",
        )  # fmt: skip


def refinement_options(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline keywords of :func:`add_refinement_args`'s flags that were given."""
    apg = {
        key: value
        for key, value in (("eta", args.apg_eta), ("momentum", args.apg_momentum),
                           ("norm_threshold", args.apg_threshold))
        if value is not None
    }  # fmt: skip
    given = {
        "guidance_rescale": args.cfg_rescale or None,
        "guidance_interval": None if args.cfg_interval is None else tuple(args.cfg_interval),
        "eta": args.eta,
        "apg": apg if apg or args.apg else None,
        "negative_prompt": args.negative_prompt,
        "negative_class": args.negative_class,
    }
    return {k: v for k, v in given.items() if v is not None}


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default cpu)")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="precision of the network's weights (bf16/fp16: faster on GPUs)",
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """``--tokenizer`` / ``--prediction``: what a Stable Diffusion single file does not hold."""
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="single-file SD checkpoints: a local folder with the tokenizer(s), e.g. a "
        "diffusers folder of the same family (its scheduler/ config is read too)",
    )
    p.add_argument(
        "--prediction",
        default=None,
        choices=["eps", "v", "x0"],
        help="override the model's prediction type (SD 2.x single files need it)",
    )


def _load_pipeline(args: argparse.Namespace) -> Any:
    """``Pipeline.from_pretrained`` (a run, a diffusers folder or an SD single file) with
    ``--weights/--device/--tokenizer/--prediction``, the adapters, then ``--dtype``."""
    from .pipeline import Pipeline

    pipe = Pipeline.from_pretrained(
        args.run, weights=args.weights, device=args.device,
        tokenizer=getattr(args, "tokenizer", None), prediction=getattr(args, "prediction", None),
    )  # fmt: skip
    _apply_adapters(pipe, args)
    return pipe.to(dtype=args.dtype)


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    """``--lora FILE`` / ``--lora-scale`` / ``--embedding FILE`` (``difflab finetune`` outputs)."""
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="apply an adapter file: difflab's LoRA/DoRA, or for SD models kohya/LyCORIS "
        "(LoRA, LoCon, LoHa, LoKr) and diffusers/PEFT files; repeatable, each with its own "
        ":SCALE (default --lora-scale)",
    )
    p.add_argument(
        "--lora-scale", type=float, default=1.0, help="strength of --lora (0 = the base model)"
    )
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE",
        help="add a textual-inversion word (repeatable; see difflab finetune --new-word)",
    )


def lora_and_scale(item: str, default: float) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (a file's own strength, as A1111's ``<lora:name:0.8>``)."""
    path, sep, tail = item.rpartition(":")
    if sep and not Path(item).exists():
        try:
            return path, float(tail)
        except ValueError:
            pass
    return item, default


def _apply_adapters(pipe: Any, args: argparse.Namespace) -> None:
    for item in args.lora:
        path, scale = lora_and_scale(item, args.lora_scale)
        print(pipe.load_lora(path, scale=scale))
    for path in args.embedding:
        print(f"added the word {pipe.load_embedding(path)!r}")


def _expand_classes(classes: list[int] | None, n: int | None) -> tuple[list[int] | None, int]:
    if classes is None:
        return None, n if n is not None else 16
    k = len(classes)
    if n is None:
        n = k if k > 1 else 16
    if k == 1:
        return classes * n, n
    if n % k:
        raise UserError(f"--n {n} is not a multiple of the {k} labels given with --class")
    return [c for c in classes for _ in range(n // k)], n


def _read_image(path: str, shape: tuple[int, int, int], flag: str) -> Any:
    """The image at ``path`` as ``[1, C, H, W]`` in [-1, 1] at the run's pixel ``shape``:
    converted to its channels, shorter side resized, centre cropped (as training data)."""
    from PIL import Image, UnidentifiedImageError

    from .data.transforms import ImageTransform

    c, h, w = shape
    if h != w:
        raise UserError(f"{flag} needs a square model, this run makes {h}x{w} images")
    try:
        with Image.open(path) as img:
            return ImageTransform(h, c)(img)[None]
    except FileNotFoundError:
        raise UserError(f"{flag} {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{flag} {path!r} is not a readable image: {err}") from None


def _sample(args: argparse.Namespace) -> int:
    from .images import save_grid, save_image

    _from_png(args)
    labels, n = _expand_classes(args.classes, args.n)
    pipe = _load_pipeline(args)
    if args.compile:
        pipe.compile()
    kwargs = dict(
        class_labels=labels,
        prompt=args.prompt,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.cfg,
        seed=args.seed,
        spacing=args.spacing,
        clip_x0=False if args.no_clip else None,  # None: clip pixels, not latents
        **({"clip_skip": args.clip_skip} if args.clip_skip is not None else {}),
        **refinement_options(args),
    )
    if args.vae_tiling or args.vae_slicing:
        if pipe.vae is None:
            raise UserError("--vae-tiling / --vae-slicing need a latent model (an autoencoder)")
        pipe.vae.enable_tiling(args.vae_tiling)
        pipe.vae.enable_slicing(args.vae_slicing)
    if (args.init_image is None) != (args.strength is None):
        raise UserError("image-to-image needs both --init-image and --strength")
    if args.mask is not None and args.init_image is None:
        raise UserError("--mask (inpainting) needs --init-image and --strength")
    if args.init_image is None:
        size = None if args.height is None and args.width is None else (args.height, args.width)
        params = pipe.resolve_params(n, size=size, **kwargs)
        images = pipe(n, progress=None, height=args.height, width=args.width, **kwargs)
    else:
        init = _read_image(args.init_image, pipe.pixel_shape, "--init-image")
        mask = None
        if args.mask is not None:  # white = generate: [-1, 1] grey levels to [0, 1]
            _, h, w = pipe.pixel_shape
            mask = (_read_image(args.mask, (1, h, w), "--mask") + 1) / 2
        params = pipe.resolve_params(n, strength=args.strength, inpaint=mask is not None, **kwargs)
        result = pipe.img2img(
            init.expand(n, -1, -1, -1), args.strength, progress=None, mask=mask, **kwargs
        )
        images = result.images
        params.update(init_image=str(args.init_image), timesteps=result.timesteps)
        if args.mask is not None:
            params["mask"] = str(args.mask)
    out = Path(args.out) if args.out else Path(args.run) / "samples" / f"sample_seed{args.seed}.png"
    nrow = args.nrow
    if nrow is None and args.classes and len(args.classes) > 1:
        nrow = n // len(args.classes)  # one row per class
    save_grid(images, out, nrow=nrow, params=params)
    steps = f"{params['steps']} steps"
    if args.init_image is not None:  # the steps actually run, and what they started from
        what = "inpainting" if args.mask is not None else "from"
        steps = f"{len(params['timesteps'])} of {steps} {what} {args.init_image}"
    print(f"wrote {out} ({n} images, {params['sampler']}, {steps})")
    if args.separate:
        folder = out.with_suffix("")
        for i in range(n):
            one = dict(params, n=1, seed=args.seed + i, index=i)
            one["class_labels"] = None if labels is None else [labels[i]]
            save_image(images[i], folder / f"{i:04d}.png", one)
        print(f"wrote {n} separate images to {folder}/")
    return 0


# `difflab sample --from-png`: the flags it may fill -> the PNG parameter each takes.
_PNG_FLAGS = {
    "weights": "weights", "sampler": "sampler", "steps": "steps", "spacing": "spacing",
    "cfg": "guidance_scale", "cfg_rescale": "guidance_rescale",
    "cfg_interval": "guidance_interval", "eta": "eta", "seed": "seed", "n": "n",
    "classes": "class_labels", "prompt": "prompt", "negative_prompt": "negative_prompt",
    "negative_class": "negative_class", "dtype": "dtype", "init_image": "init_image",
    "mask": "mask", "height": "height", "width": "width", "clip_skip": "clip_skip",
}  # fmt: skip
# Sample flags whose default is not None: None until parsed, so a flag left out is told from
# one given with its default value; ``_from_png`` puts the defaults back.
_DEFERRED = ("weights", "cfg_rescale", "seed", "dtype", "lora_scale")


def _defer_defaults(p: argparse.ArgumentParser) -> None:
    p.set_defaults(
        _deferred={dest: p.get_default(dest) for dest in _DEFERRED}, **dict.fromkeys(_DEFERRED)
    )


def _from_png(args: argparse.Namespace) -> None:
    """Fill the sample flags not given from ``--from-png``'s parameters, then the defaults."""
    if args.from_png is not None:
        from .images import read_png_parameters

        params = read_png_parameters(args.from_png)
        if args.run is None:
            args.run = params.get("run")
            if args.run is None:
                model = f" (A1111 'Model: {params['model']}')" if params.get("model") else ""
                raise UserError(
                    f"--from-png {args.from_png}: its parameters name no difflab run{model}; "
                    "give the run directory as the first argument"
                )
        _fill_from_params(args, params, sd_model=_is_sd_model(args.run))
    for dest, default in args._deferred.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.run is None:
        raise UserError("sample needs a run directory (or --from-png PNG naming one)")


def _is_sd_model(path: str) -> bool:
    """Whether ``path`` is a Stable Diffusion model (not a difflab run)."""
    from .interop.sd import path_kind

    try:
        return path_kind(path) != "run"
    except (OSError, ValueError):
        return False  # the loader names what is wrong with it


def _fill_from_params(
    args: argparse.Namespace, params: dict[str, Any], *, sd_model: bool = False
) -> None:
    """``args``' flags left out <- ``params`` (difflab's names; see ``_PNG_FLAGS``); A1111's
    Clip skip applies to SD models only (a difflab run has no CLIP layers to skip)."""
    skip = params.get("clip_skip")
    if skip is not None and not sd_model:
        params = {k: v for k, v in params.items() if k != "clip_skip"}
    if params.get("size") and "height" not in params:  # difflab's [height, width]
        params = {**params, "height": params["size"][0], "width": params["size"][1]}
    if isinstance(params.get("negative_class"), list):  # one per image; the flag takes one
        classes = set(params["negative_class"])
        params = {**params, "negative_class": classes.pop() if len(classes) == 1 else None}
    given = {dest for dest in _PNG_FLAGS if getattr(args, dest, None) is not None}
    if "sampler" in given:  # another sampler: its own default spacing unless --spacing
        given.add("spacing")
    for dest, key in _PNG_FLAGS.items():
        value = params.get(key)
        if dest in given or value is None or value == "":
            continue
        if not hasattr(args, dest):  # a parameter this command has no flag for
            warnings.warn(f"--from-png: {key} {value!r} is not applied", stacklevel=2)
            continue
        setattr(args, dest, value)
    if args.init_image is not None and args.strength is None:
        args.strength = params.get("strength")
    if params.get("clip_x0") is False:
        args.no_clip = True
    apg = params.get("apg")
    if apg and not args.apg and (args.apg_eta, args.apg_momentum, args.apg_threshold) == (
        None, None, None,
    ):  # fmt: skip
        args.apg = True
        args.apg_eta, args.apg_momentum = apg.get("eta"), apg.get("momentum")
        args.apg_threshold = apg.get("norm_threshold")
    loras = params.get("lora") or []
    if loras and not args.lora:  # each file at its own strength, unless --lora-scale says
        args.lora = [
            lora["path"] if args.lora_scale is not None else f"{lora['path']}:{lora['scale']}"
            for lora in loras
        ]
    if params.get("embeddings") and not args.embedding:
        args.embedding = [item["path"] for item in params["embeddings"]]
    if args.nrow is None and "n" not in given:
        args.nrow = _grid_columns(args.from_png, int(params.get("n") or 1))
    unused = [f"sampler options {params['sampler_options']}"] if "sampler_options" in params else []
    if skip not in (None, 1) and not sd_model:
        unused.append(f"Clip skip {skip}")
    unused += [key for key in params.get("extra", {}) if key != "Version"]
    if unused:
        warnings.warn(f"--from-png: not applied: {', '.join(unused)}", stacklevel=2)


def _grid_columns(path: str, n: int) -> int | None:
    """The columns of the grid of ``n`` square images in ``path`` (1-pixel padding), if any."""
    from PIL import Image

    if n < 2:
        return None
    with Image.open(path) as img:
        width, height = img.size
    for ncol in range(1, n + 1):
        rows = -(-n // ncol)
        tile, rem = divmod(width - 1, ncol)
        if not rem and (height - 1) % rows == 0 and (height - 1) // rows == tile:
            return ncol
    return None


# ---------------------------------------------------------------------------- serve
def add_serve_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a run over HTTP (a page to generate, browse, A/B-vote; POST /generate)",
        description="Serve RUN: GET / is a page to sample it with live progress, a gallery, "
        "human A/B evaluation and sweep results; GET /info its settings; POST /generate "
        "(JSON: n, class_labels, prompt, sampler, steps, guidance_scale, seed, spacing, nrow, "
        "...) returns a PNG grid with its parameters. README.md lists the HTTP API.",
    )
    p.add_argument(
        "run",
        help="a run directory, a diffusers Stable Diffusion folder or an SD .safetensors file",
    )
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--weights", default="ema", help="runs: ema, raw or a weights file")
    _add_model_args(p)
    _add_device_args(p)
    _add_adapter_args(p)
    p.add_argument("--max-n", type=int, default=64, help="largest n one request may ask for")
    p.add_argument("--token", default=None, help="access token (required off 127.0.0.1)")
    p.add_argument("--data-dir", default=None, help="gallery and A/B votes (default RUN/web)")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="PATH",
        help="another run or SD model that A/B experiments may set against this one "
        '(a side\'s "run": PATH); repeatable',
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from .interop.sd import path_kind
    from .web import serve
    from .web.app import is_loopback

    if not is_loopback(args.host) and not args.token:
        raise UserError(
            f"--host {args.host} opens the server beyond this machine; give it a --token "
            "(or serve on 127.0.0.1)"
        )
    for other in args.compare:  # a model A/B sides may name: it must load later
        path_kind(other)
    pipe = _load_pipeline(args)
    print(f"serving {args.run} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    serve(
        pipe, args.host, args.port, token=args.token, max_n=args.max_n, data_dir=args.data_dir,
        compare=args.compare,
    )  # fmt: skip
    return 0


def add_ema_parser(subparsers: Any) -> None:
    """``difflab ema``: post-hoc EMA reconstruction (``difflab.train.cli_ema``)."""
    from .train.cli_ema import add_ema_parser as add

    add(subparsers)


# ---------------------------------------------------------------------------- main
SUBCOMMANDS: list[AddParser] = [
    add_demo_parser,
    add_train_parser,
    add_train_vae_parser,
    add_finetune_parser,
    add_export_parser,
    add_sample_parser,
    add_serve_parser,
    add_ema_parser,
]


def _eval_adders() -> list[AddParser]:
    """``eval`` and ``sweep`` (imported here so ``difflab sample`` never loads the metrics)."""
    from .eval.cli_eval import add_eval_parser, add_sweep_parser

    return [add_eval_parser, add_sweep_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``difflab`` parser with every available subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="difflab",
        description="Denoising diffusion models: train, sample, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS + _eval_adders():
        add(subparsers)
    for sub in subparsers.choices.values():  # every command takes --threads
        if not any("--threads" in a.option_strings for a in sub._actions):
            _add_threads_arg(sub)
    return parser


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: 1 on a machine of 2 cores or fewer, where 2 threads "
        "ran a training step 2.3x slower once other work shared the cores, see "
        "docs/training.md; else torch's default; 0 = torch's default)",
    )


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """``--threads`` for the command's duration; the caller's count comes back after."""
    if threads is not None and threads < 0:
        raise UserError(f"--threads must be >= 0, got {threads}")
    if threads is None:
        threads = 1 if (os.cpu_count() or 1) <= 2 else 0
    if threads == 0:  # torch's default
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _warning_printer(command: str, fallback: Any) -> Any:
    """``warnings.showwarning`` for the command line: difflab's own warnings as one line,
    ``difflab COMMAND: warning: ...`` (no source path and code line); others as before."""
    package = str(Path(__file__).parent)

    def show(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if str(filename).startswith(package):
            print(f"difflab {command}: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, *rest)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``difflab`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argparse usage errors (status 2)
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _check_device(getattr(args, "device", None))
        with warnings.catch_warnings(), _torch_threads(getattr(args, "threads", None)):
            warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
            return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as err:
        if os.environ.get("DIFFLAB_DEBUG"):
            raise
        message = str(err).strip() or type(err).__name__
        print(f"difflab {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during training
        if os.environ.get("DIFFLAB_DEBUG"):
            raise
        return _interrupted(args.command, err, sys.argv[1:] if argv is None else list(argv))


def _check_device(device: str | None) -> None:
    """``--device``: a torch device this torch can use (else a one-line error, not torch's
    assertion from deep inside ``.to()``)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device such as cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {device!r}: torch sees no CUDA device (torch {torch.__version__}); "
            "use --device cpu or leave it unset"
        )


def _interrupted(command: str, err: KeyboardInterrupt, argv: list[str]) -> int:
    """Say where an interrupted command stopped (and how to resume training); 128 + signal."""
    from .train import TrainingInterrupted

    if not isinstance(err, TrainingInterrupted):
        print(f"\ndifflab {command}: interrupted", file=sys.stderr)
        return 130
    again = " ".join(shlex.quote(a) for a in argv if a not in ("--overwrite", "--resume"))
    resume = f"; resume with: difflab {again} --resume" if command != "demo" else ""
    print(f"difflab {command}: stopped by {err}{resume}", file=sys.stderr)
    return 128 + err.signum


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
