"""The ``difflab`` command: ``demo``, ``train``, ``train-vae``, ``finetune``, ``export``,
``sample``, ``serve``, ``ema``, ``eval`` and ``sweep``, one module each in this package
(``eval`` and ``sweep`` share ``cli/eval.py``), the argument helpers and ``UserError`` they
share in ``cli/common.py``.

Owns argument parsing and error reporting only: each subcommand parses, builds the
library objects and calls them (``difflab.train.train``, ``difflab.Pipeline``,
``difflab.images.save_grid``).  Bad input exits with status 2 and a one-line message,
not a traceback (set ``DIFFLAB_DEBUG=1`` to see the traceback).  This is the top layer:
it imports the library, and no library module imports it (tests/test_imports.py).

Adding a subcommand is a module ``cli/<name>.py`` with ``add_<name>_parser(subparsers)``
that registers a parser with ``set_defaults(func=run)`` where ``run(args) -> int``, listed
in ``SUBCOMMANDS`` below.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import AddParser, UserError, _add_threads_arg, _check_device, lora_and_scale
from .common import _torch_threads as _torch_threads
from .demo import DEMO_CONFIG, add_demo_parser, run_demo
from .demo import _deep_copy as _deep_copy
from .ema import add_ema_parser
from .export import add_export_parser
from .finetune import add_finetune_parser, finetune_config
from .sample import add_sample_parser
from .serve import add_serve_parser
from .train import _train as _train
from .train import add_train_parser
from .train_vae import add_train_vae_parser

__all__ = [
    "DEMO_CONFIG",
    "UserError",
    "build_parser",
    "finetune_config",
    "lora_and_scale",
    "main",
    "run_demo",
]

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
    from .eval import add_eval_parser, add_sweep_parser

    return [add_eval_parser, add_sweep_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``difflab`` parser with every available subcommand."""
    from .._version import __version__

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


def _warning_printer(command: str, fallback: Any) -> Any:
    """``warnings.showwarning`` for the command line: difflab's own warnings as one line,
    ``difflab COMMAND: warning: ...`` (no source path and code line); others as before."""
    package = str(Path(__file__).parent.parent)  # src/difflab

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


def _interrupted(command: str, err: KeyboardInterrupt, argv: list[str]) -> int:
    """Say where an interrupted command stopped (and how to resume training); 128 + signal."""
    from ..train import TrainingInterrupted

    if not isinstance(err, TrainingInterrupted):
        print(f"\ndifflab {command}: interrupted", file=sys.stderr)
        return 130
    again = " ".join(shlex.quote(a) for a in argv if a not in ("--overwrite", "--resume"))
    resume = f"; resume with: difflab {again} --resume" if command != "demo" else ""
    print(f"difflab {command}: stopped by {err}{resume}", file=sys.stderr)
    return 128 + err.signum
