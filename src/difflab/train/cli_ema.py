"""The ``difflab ema`` subcommand: post-hoc EMA reconstruction of a finished run.

Owns argument parsing and printing only; the maths and files are
``difflab.train.posthoc_ema``. Register with ``add_ema_parser(subparsers)``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_ema_parser", "parse_sigma_rels"]


def parse_sigma_rels(text: str) -> list[float]:
    """``"0.05,0.1"`` -> ``[0.05, 0.1]``; a bad entry raises a one-line ValueError."""
    out = []
    for item in text.split(","):
        try:
            out.append(float(item))
        except ValueError:
            raise ValueError(f"--sigma-rel: {item.strip()!r} is not a number") from None
    return out


def add_ema_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ema",
        help="reconstruct post-hoc EMA weights of a run (EDM2)",
        description="Reconstruct the EMA of any sigma_rel from the power-EMA snapshots a run "
        "wrote with train.posthoc_ema (Karras et al. 2024), as RUN/ema_sigma<S>.safetensors; "
        "sample one with `difflab sample RUN --weights ema_sigma<S>`.",
    )
    p.add_argument("run", help="run directory with posthoc_ema/ snapshots")
    p.add_argument("--sigma-rel", required=True, help="comma-separated sigma_rel values")
    p.add_argument("--step", type=int, default=None, help="reconstruct at this snapshot step "
                   "(default: the last)")  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default: the run directory)")
    p.set_defaults(func=_ema)


def _ema(args: argparse.Namespace) -> int:
    from .posthoc_ema import write_reconstructions

    sigma_rels = parse_sigma_rels(args.sigma_rel)
    for path in write_reconstructions(args.run, sigma_rels, step=args.step, out_dir=args.out):
        print(path)
    return 0
