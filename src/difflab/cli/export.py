"""``difflab export``: a text-to-image latent run written as a diffusers folder, a single
file or a kohya LoRA (``difflab.convert.export``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    UserError,
)


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
    from ..convert import export

    if args.to == "kohya":
        if Path(args.out).exists() and not args.overwrite:
            raise UserError(f"{args.out} already exists; pass --overwrite to replace it")
        out = export.export_kohya_lora(args.run, args.out, weights=args.weights)
    else:
        write = export.export_diffusers if args.to == "diffusers" else export.export_single_file
        out = write(args.run, args.out, weights=args.weights, overwrite=args.overwrite)
    print(f"{args.run} written to {out} ({args.to})")
    return 0
