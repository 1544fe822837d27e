"""What every ``difflab`` command shares: the ``UserError`` of bad input (exit status 2),
the run-directory guard of the training commands, and the argument groups several commands
take (``--set`` overrides, guidance refinements, ``--device/--dtype``, Stable Diffusion's
``--tokenizer/--prediction``, adapters, ``--threads``) with the functions that read them.

Imports the library lazily, inside the functions, so ``difflab --help`` stays fast; the
library never imports this package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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

    from ..train import find_checkpoint

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


def _add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides, as ``difflab.train.load_config``."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


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
    from ..pipeline import Pipeline

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


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: the cores other work leaves free, from the 1-minute "
        "load average, at least 1: on an idle 2-core machine 2 threads trained 1.6x faster "
        "than 1, beside one busy process 1.7x slower, see docs/training.md; 0 = torch's "
        "default)",
    )


def free_cores(torch_default: int) -> int:
    """The default ``--threads``: the cores that other work leaves free, ``cpu_count`` minus
    the 1-minute load average (floored), at least 1; 0 (torch's own choice) when that is
    no fewer than ``torch_default``.  Where the load average is unknown, 1 on a machine of
    2 cores or fewer, else 0."""
    cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average (Windows)
        return 1 if cores <= 2 else 0
    free = max(1, cores - busy)
    return 0 if free >= torch_default else free


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """``--threads`` for the command's duration; the caller's count comes back after."""
    if threads is not None and threads < 0:
        raise UserError(f"--threads must be >= 0, got {threads}")
    import torch

    if threads is None:
        threads = free_cores(torch.get_num_threads())
    if threads == 0:  # torch's default
        yield
        return

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
