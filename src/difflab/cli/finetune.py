"""``difflab finetune``: LoRA-family, DreamBooth and textual-inversion runs on a base run or
a Stable Diffusion model (imported first with ``difflab.convert.sd_import``); ``finetune_config``
builds the fine-tuning ``TrainConfig`` from Python too.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import (
    UserError,
    _add_overrides,
    prepare_run_dir,
)


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
    p.add_argument(
        "--text-encoder",
        action="store_true",
        help="SD models: adapters of the same kind on the CLIP text encoder(s) too (kohya's "
        "lora_te_ / lora_te1_, lora_te2_)",
    )
    p.add_argument(
        "--text-encoder-lr", type=float, default=None, help="their learning rate (default --lr)"
    )
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
    text_encoder: bool = False,
    text_encoder_lr: float | None = None,
) -> Any:
    """The config of an adapter run (``adapter``: lora, loha or lokr) on ``base``: its config
    with ``finetune`` set, ``run_dir`` = ``out``, its train/sample/text sections kept, then
    ``overrides``."""
    from ..runs import read_run_config
    from ..train import TrainConfig, apply_overrides

    cfg = read_run_config(base)
    cfg["run_dir"] = str(out)
    cfg["finetune"] = dict(
        base_run=str(base), adapter=adapter, rank=rank, alpha=alpha, targets=targets,
        rslora=rslora, dora=dora, lokr_factor=lokr_factor, prior_condition=prior,
        prior_images=prior_images, prior_weight=prior_weight, new_word=new_word,
        init_word=init_word, text_encoder=text_encoder, text_encoder_lr=text_encoder_lr,
    )  # fmt: skip
    return TrainConfig.from_dict(apply_overrides(cfg, overrides))


def _finetune(args: argparse.Namespace) -> int:
    from ..train import train

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
    if isinstance(prior, str) and prior.strip().isdigit():
        prior = int(prior)  # a class label
    base, stable_diffusion = _finetune_base(args)
    config = finetune_config(
        base, args.out, rank=args.rank, alpha=args.alpha, targets=targets,
        adapter=args.adapter, rslora=args.rslora, dora=args.dora, lokr_factor=args.lokr_factor,
        overrides=overrides, prior=prior,
        prior_images=args.prior_images, prior_weight=args.prior_weight,
        new_word=args.new_word, init_word=args.init_word,
        text_encoder=args.text_encoder, text_encoder_lr=args.text_encoder_lr,
    )  # fmt: skip
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    prepare_run_dir(config.run_dir, overwrite=args.overwrite, resume=args.resume)
    train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        ft = config.finetune
        if stable_diffusion and (ft.targets != "none" or ft.text_encoder) and not ft.dora:
            from ..convert.export import export_kohya_lora

            export_kohya_lora(config.run_dir)
        made = [n for n in ("lora.safetensors", "lora_kohya.safetensors", "embedding.safetensors")
                if (Path(config.run_dir) / n).is_file()]  # fmt: skip
        print(f"fine-tuning run written to {config.run_dir} ({', '.join(made)})")
    return 0


def _finetune_base(args: argparse.Namespace) -> tuple[str, bool]:
    """``(base run, is it an imported Stable Diffusion model)``: an SD folder or file is
    written as a difflab run in OUT/sd_base first (kept on --resume)."""
    from ..interop.sd import path_kind

    if path_kind(args.base) == "run":
        return str(args.base), False
    from ..convert.sd_import import import_stable_diffusion

    base = Path(args.out) / "sd_base"
    if not (args.resume and (base / "config.yaml").is_file()):
        import_stable_diffusion(args.base, base, tokenizer=args.tokenizer,
                                prediction=args.prediction)  # fmt: skip
    return str(base), True
