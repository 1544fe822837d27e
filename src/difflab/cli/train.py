"""``difflab train``: train from a YAML config (``difflab.train.load_config`` +
``difflab.train.train``), refusing to overwrite a trained run unless told.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .common import (
    UserError,
    _add_overrides,
    prepare_run_dir,
)


def add_train_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from CONFIG.yaml; the resolved config is written to the run.",
    )
    p.add_argument("config", nargs="?", help="YAML config (see configs/)")
    p.add_argument(
        "--config", dest="config_option", metavar="CONFIG",
        help="the YAML config, as an option (the same as the positional CONFIG)",
    )  # fmt: skip
    _add_overrides(p, "override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="resume from the run's checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run in run_dir first"
    )
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from ..train import load_config, train

    if (args.config is None) == (args.config_option is None):
        raise UserError(
            "difflab train takes one config: `difflab train CONFIG.yaml` or "
            "`difflab train --config CONFIG.yaml`"
        )
    args.config = args.config or args.config_option
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
