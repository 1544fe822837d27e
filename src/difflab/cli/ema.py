"""The ``difflab ema`` subcommand: post-hoc EMA reconstruction of a finished run.

Owns argument parsing and printing only; the maths and files are
``difflab.train.posthoc_ema``, the ``--eval`` sweep over σ_rel ``difflab.train.posthoc_sweep``.
Register with ``add_ema_parser(subparsers)``.
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
    p.add_argument("--out", default=None, help="output folder (default: the run directory; "
                   "with --eval, the sweep's tables and plot: RUN/posthoc_ema/sweep)")  # fmt: skip
    g = p.add_argument_group(
        "sweep", "with --eval: score each reconstruction with the same sampling settings and "
        "seeds, write a table and a plot of metric vs sigma_rel, print the best sigma_rel",
    )  # fmt: skip
    g.add_argument("--eval", default=None, metavar="METRICS",
                   help="comma-separated metrics, e.g. fid,accuracy")  # fmt: skip
    g.add_argument("--n", type=int, default=500, help="samples per sigma_rel (default 500)")
    g.add_argument("--sampler", default=None, help="sampler (default: the run's)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--device", default=None, help="device to sample on (default: the run's)")
    p.set_defaults(func=_ema)


def _ema(args: argparse.Namespace) -> int:
    from ..train.posthoc_ema import write_reconstructions

    sigma_rels = parse_sigma_rels(args.sigma_rel)
    if args.eval is not None:
        return _sweep(args, sigma_rels)
    for path in write_reconstructions(args.run, sigma_rels, step=args.step, out_dir=args.out):
        print(path)
    return 0


def _sweep(args: argparse.Namespace, sigma_rels: list[float]) -> int:
    from ..train.posthoc_sweep import best_sigma_rels, sweep_sigma_rel

    rows = sweep_sigma_rel(
        args.run, sigma_rels, metrics=args.eval, n=args.n, step=args.step,
        sampler=args.sampler, steps=args.steps, guidance_scale=args.cfg, seed=args.seed,
        out_dir=args.out, device=args.device,
    )  # fmt: skip
    for metric, sigma in best_sigma_rels(rows).items():
        value = next(r[metric] for r in rows if r["sigma_rel"] == sigma)
        print(f"best {metric}: sigma_rel {sigma:g} ({value:.4g})")
    out = args.out or f"{args.run}/posthoc_ema/sweep"
    print(f"table and plot in {out}")
    return 0
