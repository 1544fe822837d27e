"""The ``difflab eval`` and ``difflab sweep`` subcommands.

Owns argument parsing and printing only: ``eval`` calls `difflab.eval.sweep.evaluate_pipeline`,
``sweep`` calls `difflab.eval.sweep.run_sweep`. Both take a difflab run or a Stable Diffusion
model (a diffusers folder or a single file, with ``--tokenizer`` / ``--prediction`` as
``difflab sample``), with ``--prompts`` and ``--reference`` for what an SD model has no data
for. Register them with
``add_eval_parser(subparsers)`` and ``add_sweep_parser(subparsers)``; each parser sets
``func=handler`` where ``handler(args) -> int`` (exit status).

Under ``torchrun`` (``WORLD_SIZE`` > 1) both join the process group (gloo on CPU, NCCL with
``--device cuda``, each rank on ``cuda:LOCAL_RANK``), split the samples over the ranks
(`difflab.eval.ranks.Ranks`) and let rank 0 alone print and write the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..eval.features import RESIZE_MODES, FeatureExtractor
from ..eval.ranks import Ranks
from .common import _add_model_args, add_refinement_args, refinement_options

__all__ = ["add_eval_parser", "add_sweep_parser", "format_results", "run_eval", "run_sweep_cli"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run",
        help="a run directory (config.yaml + *.safetensors), a diffusers Stable Diffusion "
        "folder or an SD .safetensors file",
    )
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="runs: which weights")
    _add_model_args(p)
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="text models: one prompt per line, or a captioned image folder (its captions); "
        "sample i is drawn from prompt i mod N and CLIP-scored against it. Required for SD "
        "models; replaces a text run's data captions",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="DIR",
        help="a folder of real images for FID/KID/precision-recall (resized and centre-cropped "
        "to the model's size; features cached). Required for those on SD models; replaces a "
        "run's data",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="FID Inception-v3 weights (pytorch-fid .pth or .safetensors; default "
        "$DIFFLAB_INCEPTION_WEIGHTS): FID/KID/precision-recall/IS in Inception space instead "
        "of the run data's classifier (digits-cnn, or shapes-cnn for data.source shapes; "
        "never downloaded)",
    )
    p.add_argument(
        "--resize",
        default="clean",
        choices=RESIZE_MODES,
        help="Inception resize: clean (PIL bicubic, clean-fid) or legacy (torch bilinear)",
    )
    p.add_argument(
        "--clip-model",
        default=None,
        metavar="DIR",
        help="local Hugging Face CLIP folder for --metrics clip_score (each sample against its "
        "own prompt, a class model's against its class prompt; never downloaded)",
    )
    p.add_argument(
        "--clip-scale",
        type=float,
        default=1.0,
        help="CLIP score weight w in w*max(100*cos, 0) (1.0 as torchmetrics; Hessel et al. 2.5)",
    )
    p.add_argument(
        "--reference-cache",
        default=None,
        metavar="NPZ",
        help="reference features file (default: keyed by extractor and image content "
        "under $DIFFLAB_CACHE/reference)",
    )


def _clip(args: argparse.Namespace) -> Any:
    """A `CLIPScorer` from ``--clip-model`` (None without it)."""
    if args.clip_model is None:
        return None
    from ..eval.clip import CLIPScorer

    return CLIPScorer(args.clip_model, scale=args.clip_scale, device=args.device or "cpu")


def _model(args: argparse.Namespace) -> tuple[Any, list[str] | None]:
    """The pipeline of ``args.run`` (with ``--prompts`` read) and the prompts."""
    from ..eval.sources import read_prompts
    from ..eval.sweep import load_pipeline

    prompts = None if args.prompts is None else read_prompts(args.prompts)
    pipe = load_pipeline(
        args.run, weights=args.weights, device=args.device, prompts=prompts,
        tokenizer=args.tokenizer, prediction=args.prediction,
    )  # fmt: skip
    return pipe, prompts


@contextlib.contextmanager
def _ranks(args: argparse.Namespace) -> Iterator[Ranks]:
    """The ranks of a ``torchrun`` launch (a single process otherwise); under torchrun the
    process group is made here (``args.device`` becomes this rank's device) and closed after."""
    from ..train.distributed import setup_distributed, teardown_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Ranks()
        return
    info = setup_distributed(args.device or "cpu")
    args.device = str(info.device)
    try:
        yield Ranks(info.rank, info.world_size)
    finally:
        teardown_distributed(info)


def _results_dir(run: str, kind: str) -> Path:
    """``RUN/<kind>`` for a run or diffusers folder; ``<stem>-<kind>`` beside a single file."""
    path = Path(run)
    return path / kind if path.is_dir() else path.with_name(f"{path.stem}-{kind}")


def _extractor(args: argparse.Namespace) -> FeatureExtractor | None:
    """Inception from ``--inception-weights`` or ``$DIFFLAB_INCEPTION_WEIGHTS``; else None
    (the classifier of the run's data: digits-cnn or shapes-cnn)."""
    from ..eval.features import INCEPTION_WEIGHTS_ENV, InceptionV3Features

    path = args.inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not path:
        return None
    device = args.device or "cpu"
    return InceptionV3Features(path, resize=args.resize, device=device)


# ---------------------------------------------------------------------------- eval
def add_eval_parser(subparsers: Any) -> None:
    """Register ``difflab eval RUN [--metrics ...] [--n N] [--sampler --steps --cfg --seed]``."""
    p = subparsers.add_parser(
        "eval",
        help="score samples of a run: FID/KID, precision/recall, IS, class accuracy",
        description="Draw --n samples (labels cycling over the classes) and score them. Every "
        "number is printed with the feature extractor that produced it and the settings used, "
        "and written as JSON.",
    )
    _common(p)
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated: fid, kid, precision_recall, inception_score, accuracy, "
        "clip_score (needs --clip-model), or none "
        "(default: fid,kid plus accuracy for a class-conditional model; fid/kid/"
        "precision_recall of an SD model need --reference)",
    )
    p.add_argument(
        "--likelihood",
        default=None,
        metavar="METHODS",
        help="also report bits/dim of real images of the run's data (or --reference): vlb "
        "(the full variational bound, T model calls per image), ode (probability-flow ODE), "
        "or vlb,ode",
    )
    p.add_argument(
        "--likelihood-n",
        type=int,
        default=256,
        help="real images scored by --likelihood (a seeded random subset; default 256)",
    )
    p.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's)")
    add_refinement_args(p)
    p.add_argument(
        "-o", "--out", default=None,
        help="results JSON (default RUN/eval/<settings>.json; beside an SD single file, "
        "<stem>-eval/)",
    )  # fmt: skip
    p.set_defaults(func=run_eval)


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table: one line per metric with its extractor, then the settings."""
    from ..eval.sweep import metric_columns

    rows = []
    for key in metric_columns([results]):
        name, extractor = key[:-1].split("[", 1)
        value = results[key]
        std = results.get(f"{name}_std[{extractor}]")
        shown = f"{value:.6g}" + (f" ± {std:.3g}" if std is not None else "")
        rows.append((name, shown, extractor))
    head = ("metric", "value", "extractor")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    metric_keys = set(metric_columns([results])) | {k for k in results if "_std[" in k}
    settings = {k: v for k, v in results.items() if k not in metric_keys}
    lines.append("")
    lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if isinstance(results.get("n"), int) and results["n"] < 10_000:
        lines.append(
            f"note: n={results['n']} < 10,000 samples; FID/KID are biased by the sample count "
            "and not comparable with numbers in papers"
        )
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    """Handler of ``difflab eval``."""
    with _ranks(args) as ranks:
        return _run_eval(args, ranks)


def _run_eval(args: argparse.Namespace, ranks: Ranks) -> int:
    from ..eval.sweep import evaluate_likelihood, evaluate_pipeline, labelled_classes

    pipe, prompts = _model(args)
    metrics = args.metrics
    if metrics is None:
        metrics = "fid,kid" + (",accuracy" if labelled_classes(pipe) else "")
    if metrics.strip() == "none" and args.likelihood is None:
        raise ValueError("--metrics none leaves nothing to compute: add --likelihood vlb|ode")
    results: dict[str, Any] = {"run": str(args.run), "weights": args.weights}
    if metrics.strip() != "none":
        results.update(
            evaluate_pipeline(
                pipe,
                metrics=metrics,
                n=args.n,
                sampler=args.sampler,
                steps=args.steps,
                guidance_scale=args.cfg,
                seed=args.seed,
                extractor=_extractor(args),
                clip_model=_clip(args) if "clip_score" in metrics else None,
                reference_cache=args.reference_cache,
                batch_size=args.batch_size,
                sampler_options=refinement_options(args),
                reference=args.reference,
                prompts=prompts,
                ranks=ranks,
            )
        )
    if not ranks.is_main:  # rank 0 has the results (and the likelihood, not split)
        return 0
    if args.likelihood is not None:
        results.update(
            evaluate_likelihood(
                pipe,
                args.likelihood,
                n=args.likelihood_n,
                seed=args.seed,
                reference=args.reference,
                batch_size=min(args.batch_size, 64),
            )
        )
    if args.prompts is not None:
        results["prompts_file"] = str(args.prompts)
    if args.out is not None:
        out = Path(args.out)
    elif "sampler" in results:
        extra = "".join(
            f"-{key}{'-'.join(f'{v:g}' for v in (value if isinstance(value, list) else [value]))}"
            for key, value in (results.get("sampler_options") or {}).items()
        )  # e.g. -guidance_interval0.3-5
        if args.prompts is not None:
            extra += f"-prompts_{Path(args.prompts).stem}"
        name = (
            f"{results['sampler']}-{results['steps']}steps-cfg{results['guidance_scale']:g}"
            f"{extra}-n{args.n}-seed{args.seed}.json"
        )
        out = _results_dir(args.run, "eval") / name
    else:
        name = f"likelihood-n{args.likelihood_n}-seed{args.seed}.json"
        out = _results_dir(args.run, "eval") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(format_results(results))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------- sweep
def add_sweep_parser(subparsers: Any) -> None:
    """Register ``difflab sweep RUN --samplers ... --steps ... --cfg ... --metrics ... --n N``."""
    p = subparsers.add_parser(
        "sweep",
        help="evaluate every sampler x steps x guidance combination; tables and plots",
        description="Score every combination of --samplers, --steps and --cfg on --n samples. "
        "Resumable: finished cells are kept in OUT/sweep.jsonl and not recomputed. Writes "
        "sweep.csv, sweep.md and PNG plots (metric vs NFE, metric vs guidance, FID vs "
        "accuracy).",
    )
    _common(p)
    p.add_argument("--samplers", default="dpmpp_2m,ddim,heun", help="comma-separated names")
    p.add_argument("--steps", default="5,10,20,50", help="comma-separated step counts")
    p.add_argument("--cfg", default="1,2,4", help="comma-separated guidance scales")
    add_refinement_args(p)
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated: fid, kid, precision_recall, inception_score, accuracy, "
        "clip_score (needs --clip-model) (default: fid, plus accuracy for a class-conditional "
        "model)",
    )
    p.add_argument("--n", type=int, default=2000, help="samples per cell (default 2000)")
    p.add_argument(
        "--out", default=None,
        help="output folder (default RUN/sweep; beside an SD single file, <stem>-sweep/)",
    )  # fmt: skip
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.set_defaults(func=run_sweep_cli)


def run_sweep_cli(args: argparse.Namespace) -> int:
    """Handler of ``difflab sweep``."""
    with _ranks(args) as ranks:
        return _run_sweep(args, ranks)


def _run_sweep(args: argparse.Namespace, ranks: Ranks) -> int:
    from ..eval.sweep import labelled_classes, run_sweep

    pipe, prompts = _model(args)
    metrics = args.metrics
    if metrics is None:
        metrics = "fid" + (",accuracy" if labelled_classes(pipe) else "")
    out = Path(args.out) if args.out is not None else _results_dir(args.run, "sweep")
    result = run_sweep(
        pipe,
        samplers=args.samplers,
        steps=args.steps,
        cfg_scales=args.cfg,
        metrics=metrics,
        n=args.n,
        out_dir=out,
        seed=args.seed,
        batch_size=args.batch_size,
        extractor=_extractor(args),
        clip_model=_clip(args) if "clip_score" in metrics else None,
        reference=args.reference,
        reference_cache=args.reference_cache,
        plots=args.plots,
        sampler_options=refinement_options(args),
        prompts=prompts,
        ranks=ranks,
    )
    if not ranks.is_main:
        return 0
    print(result.to_markdown())
    reused = len(result.rows) - len(result.computed)
    print(f"{len(result.computed)} cell(s) computed, {reused} taken from {result.files['jsonl']}")
    for kind, path in result.files.items():
        print(f"wrote {path}" if kind != "jsonl" else f"log   {path}")
    return 0
