"""``difflab demo``: train the class-conditional digits demo, sample every class and score
the samples with an SVM (``run_demo``; ``DEMO_CONFIG`` is ``configs/digits.yaml`` apart from
``run_dir``; docs/demo.md records its time and accuracy).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import (
    _add_overrides,
    prepare_run_dir,
)

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

    from ..data import digits_accuracy, digits_caption
    from ..images import save_grid
    from ..pipeline import Pipeline
    from ..train import TrainConfig, apply_overrides, train

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
