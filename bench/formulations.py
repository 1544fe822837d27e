"""Formulations x backbones at equal CPU time: ddpm / edm / flow with a U-Net and a DiT.

Every cell starts from the digits demo's recipe (``configs/digits.yaml``: 8x8 digits, 10
classes, batch 128, lr 1e-3, cosine LR, EMA 0.995, CFG dropout 0.1) and changes only

* ``diffusion.formulation``: ``ddpm`` (the config's cosine VP process, eps prediction), ``edm``
  (Karras et al. 2022) or ``flow`` (rectified flow, Esser et al. 2024), each with its default
  ``formulation_options``;
* ``model``: the config's U-Net, or ``{arch: dit, preset: digits, num_classes: 10}`` (Peebles
  & Xie 2023; patch 2 on the 8x8 digits: 16 tokens).

Each cell trains for the same budget (``train.max_time``; ``max_steps`` is set far out of
reach so the clock stops every run and the LR schedule anneals over the budget) on
``--threads`` threads, in one process, one cell after another. With ``--clock cpu`` (the
default) the trainer's budget clock is ``time.process_time``, so every cell gets the same
CPU seconds even when other processes share the machine; ``--clock wall`` uses the
trainer's default ``time.monotonic``. Both times are recorded.

Each trained model (EMA weights) is then sampled with one sampler (``--sampler``, DPM-Solver++
2M by default, CFG 2 as the demo) at several step counts and scored by
``difflab.eval.sweep.evaluate_pipeline``: FID in the digits classifier's feature space
(``fid[digits-cnn]``, against all 1,797 digits) and the classifier's accuracy on the
requested labels. "NFE for quality" is the fewest steps whose FID is within ``--tolerance``
of that cell's best FID over the step counts tried (network evaluations per step: one, for a
CFG batch of two).

``--data shapes`` runs the same grid on difflab's synthetic 32x32 RGB shapes
(``data.source: shapes``, 6 classes, `difflab.data.shapes`) with small 32 px networks sized
for a CPU (``SHAPES``: a 0.29M-parameter U-Net and a patch-4 DiT, 64 tokens, batch 16, lr 2e-3)
and scores in the shapes classifier's feature space (``fid[shapes-cnn]``, against all 3,000
shapes). It also writes a grid of each cell's samples (one row per cell, two per class).

Usage::

    python bench/formulations.py                    # 6 cells x 60 s + eval, ~10 min
    python bench/formulations.py --budget 20s --n 200 --steps 5,10  # a quick look
    python bench/formulations.py --data shapes --budget 30s --n 300 --steps 5,10
    python bench/formulations.py --data shapes --budget 4m --n 300 --steps 8,16 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab import Pipeline
from difflab.data import shapes_tensor
from difflab.eval import DigitsClassifier, ShapesClassifier, evaluate, to_uint8
from difflab.eval.features import digits_data
from difflab.eval.sweep import evaluate_pipeline
from difflab.images import save_grid
from difflab.train import Trainer, load_config
from difflab.train.budget import parse_duration

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class BenchData:
    """One data set of the bench: its overrides of configs/digits.yaml, the two backbones,
    its classifier (FID space and accuracy) and its real images (uint8) and labels."""

    name: str
    title: str
    overrides: tuple[str, ...]
    unet: str | None  # None: the config's U-Net
    dit: str
    scorer: Callable[[], Any]
    real: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    out: str

    @property
    def fid(self) -> str:
        return f"fid[{self.scorer.id}]"  # type: ignore[attr-defined]

    @property
    def acc(self) -> str:
        return f"accuracy[{self.scorer.id}]"  # type: ignore[attr-defined]


def _shapes_real() -> tuple[torch.Tensor, torch.Tensor]:
    x, labels = shapes_tensor()
    return to_uint8(x), labels


DIGITS = BenchData(
    "digits", "digits 8x8", (), None, "model={arch: dit, preset: digits, num_classes: 10}",
    DigitsClassifier, digits_data, "formulations.md",
)  # fmt: skip
SHAPES = BenchData(
    "shapes", "shapes 32x32 RGB",
    ("data.source=shapes", "data.image_size=32", "data.channels=3", "train.batch_size=16",
     "train.lr=2e-3", "train.warmup_steps=10"),
    "model={model_channels: 16, channel_mult: [1, 2, 2], num_res_blocks: 1, "
    "attention_resolutions: [], num_heads: 2, norm_groups: 8, num_classes: 6}",
    "model={arch: dit, patch_size: 4, hidden_size: 96, depth: 4, num_heads: 4, num_classes: 6}",
    ShapesClassifier, _shapes_real, "formulations_shapes.md",
)  # fmt: skip
DATA = {d.name: d for d in (DIGITS, SHAPES)}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def train_cell(formulation: str, arch: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train one (formulation, backbone) cell for the budget; its run dir and training stats."""
    run_dir = work / f"{formulation}_{arch}"
    overrides = [
        f"run_dir={run_dir}",
        f"seed={args.seed}",
        f"diffusion.formulation={formulation}",
        f"train.max_time={args.budget}",
        "train.max_steps=1000000",  # out of reach: the clock stops the run
        "train.log_every=1000000",
        *args.data.overrides,
    ]
    backbone = args.data.dit if arch == "dit" else args.data.unet
    if backbone is not None:
        overrides.append(backbone)
    cfg = load_config(ROOT / "configs" / "digits.yaml", overrides)
    params = sum(p.numel() for p in _build(cfg).parameters())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    clock = time.process_time if args.clock == "cpu" else None  # None: time.monotonic
    trainer = Trainer.from_config(cfg, progress=False, clock=clock)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    return dict(formulation=formulation, arch=arch, run_dir=run_dir, params=params,
                train_steps=result.step, stop=result.stop_reason, train_wall_s=wall_s,
                train_cpu_s=cpu_s)  # fmt: skip


def run_cell(cell: tuple[str, str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train and score one (formulation, backbone) cell (in a worker process with ``--jobs``)."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="FID computed from")
    formulation, arch = cell
    out = train_cell(formulation, arch, args, work)
    print(f"{formulation}/{arch}: {out['train_steps']} steps in {out['train_wall_s']:.0f} s "
          f"wall, {out['train_cpu_s']:.0f} s CPU", file=sys.stderr, flush=True)  # fmt: skip
    eval_cell(out, args)
    return out


def _build(cfg: Any) -> torch.nn.Module:
    from difflab.models import build_model

    return build_model(cfg.model_config(), generator=torch.Generator().manual_seed(0))


def eval_cell(cell: dict[str, Any], args: argparse.Namespace) -> None:
    """Score the cell's EMA model at every step count; adds ``fid`` / ``acc`` per steps."""
    pipe = Pipeline.from_run(cell["run_dir"])
    cell["fid"], cell["acc"], cell["sample_s"] = {}, {}, {}
    for steps in args.steps:
        row = evaluate_pipeline(pipe, metrics=("fid", "accuracy"), n=args.n,
                                sampler=args.sampler, steps=steps,
                                guidance_scale=args.guidance_scale, seed=args.seed)  # fmt: skip
        fid, acc = args.data.fid, args.data.acc
        cell["fid"][steps], cell["acc"][steps] = row[fid], row[acc]
        cell["sample_s"][steps] = row["sample_seconds"]
        print(f"  {cell['formulation']}/{cell['arch']} steps={steps}: FID {row[fid]:.2f}, "
              f"acc {row[acc]:.3f}", file=sys.stderr)  # fmt: skip
    per_class = 2
    labels = torch.arange(pipe.num_classes).repeat_interleave(per_class)
    cell["grid"] = pipe(len(labels), labels, None, args.sampler, max(args.steps),
                        args.guidance_scale, args.seed, False).cpu()  # fmt: skip


def steps_needed(fid: dict[int, float], tolerance: float) -> int:
    """The fewest steps whose FID is within ``tolerance`` (a fraction) of the best FID."""
    best = min(fid.values())
    return min(s for s, f in fid.items() if f <= best * (1 + tolerance))


def real_floor(data: BenchData, n: int, seed: int) -> float:
    """FID of ``n`` real images drawn with replacement against the whole set, in the data's
    classifier space: the score a perfect model would get at this ``n``
    (bench/digits_floor.py)."""
    clf = data.scorer()
    images, labels = data.real()
    idx = torch.randint(len(images), (n,), generator=torch.Generator().manual_seed(seed))
    res = evaluate(images[idx], images, extractor=clf, classifier=clf, labels=labels[idx],
                   metrics=("fid",), generator=seed)  # fmt: skip
    return res[data.fid]


def sample_grid(cells: list[dict[str, Any]], path: Path) -> None:
    """One row per cell: two samples of each class at the largest step count."""
    rows = [c["grid"] for c in cells]
    save_grid(torch.cat(rows), path, nrow=len(rows[0]), padding=2)


def plot(cells: list[dict[str, Any]], args: argparse.Namespace, floor: float, path: Path) -> None:
    """FID against sampling steps, one line per cell (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = {"ddpm": "tab:blue", "edm": "tab:orange", "flow": "tab:green"}
    for c in cells:
        style = "-o" if c["arch"] == "unet" else "--s"
        ax.plot(
            args.steps,
            [c["fid"][s] for s in args.steps],
            style,
            color=colours.get(c["formulation"]),
            label=f"{c['formulation']} / {c['arch']} ({c['train_steps']} train steps)",
        )
    ax.axhline(floor, color="grey", lw=0.8, ls=":", label=f"real {args.data.name}, n={args.n}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(NullLocator())  # no "6x10^0" labels
    ax.set_xticks(args.steps, [str(s) for s in args.steps])
    ax.set_xlabel(f"sampling steps ({args.sampler}, CFG {args.guidance_scale:g})")
    ax.set_ylabel(f"FID[{args.data.scorer.id}], n={args.n}")
    ax.set_title(
        f"{args.data.title}, {args.budget} ({args.clock}) of training per cell, "
        f"{args.threads} thread"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recipe_lines(args: argparse.Namespace, floor: float) -> list[str]:
    """What was trained and how it was scored, per data set."""
    if args.data.name == "digits":
        return [
            "- Recipe: `configs/digits.yaml` (8x8 digits, batch 128, lr 1e-3, cosine LR over "
            "the budget, EMA 0.995) with only `diffusion.formulation` and the backbone changed: "
            f"U-Net = the config's; DiT = `{args.data.dit.split('=', 1)[1]}` (patch 2, 16 "
            "tokens). Default `formulation_options`; ddpm is the config's cosine schedule with "
            "eps prediction.",
            f"- Eval: EMA weights, {args.sampler}, CFG {args.guidance_scale:g}, n = {args.n} "
            f"class-conditional samples (labels i mod 10), seed {args.seed}; FID in the digits "
            "classifier's feature space against all 1,797 digits (`evaluate_pipeline`); acc = "
            "the classifier's accuracy on the requested labels. "
            f"Floor: {args.n} real digits (with replacement) score FID {floor:.2f}.",
        ]
    return [
        "- Recipe: `configs/digits.yaml` with `" + " ".join(args.data.overrides) + "` "
        "(difflab's synthetic 32x32 RGB shapes, `data.source: shapes`, 3,000 images in 6 "
        "classes; cosine LR over the budget, EMA 0.995 with warm-up), then only "
        "`diffusion.formulation` and the backbone changed: U-Net = `"
        + args.data.unet.split("=", 1)[1]
        + "`; DiT = `"
        + args.data.dit.split("=", 1)[1]
        + "` (patch 4, 64 tokens). Default `formulation_options`; ddpm is the config's cosine "
        "schedule with eps prediction.",
        f"- Eval: EMA weights, {args.sampler}, CFG {args.guidance_scale:g}, n = {args.n} "
        f"class-conditional samples (labels i mod 6), seed {args.seed}; FID in the shapes "
        "classifier's feature space (`fid[shapes-cnn]`, `difflab.eval.ShapesClassifier`, 64-d) "
        "against all 3,000 shapes (`evaluate_pipeline`); acc = that classifier's accuracy on "
        f"the requested labels (it scores {ShapesClassifier().accuracy:.1%} on held-out real "
        f"shapes). Floor: {args.n} real shapes (with replacement) score FID {floor:.2f}.",
    ]


def report(
    cells: list[dict[str, Any]], args: argparse.Namespace, floor: float, total_s: float
) -> str:
    command = " ".join(["python bench/formulations.py", *args.argv])
    best_cell = min(cells, key=lambda c: min(c["fid"].values()))
    steps_head = " | ".join(f"FID @{s}" for s in args.steps)
    acc_head = " | ".join(f"acc @{s}" for s in args.steps)
    lines = [
        f"# Formulations x backbones at equal CPU time ({args.data.name})",
        "",
        f"`{command}`",
        "",
        f"- Budget: **{args.budget}** of training per cell (`train.max_time`, counted in "
        + (
            "process CPU seconds: the trainer's clock is `time.process_time`"
            if args.clock == "cpu"
            else "wall seconds"
        )
        + f"), {args.threads} CPU thread (`torch.set_num_threads`), {cpu_name()}, torch "
        f"{torch.__version__}; {total_s / 60:.1f} min in all"
        + (f", {args.jobs} cells at a time (one process each)" if args.jobs > 1 else "")
        + ". CPU s and wall s are those of each cell's `Trainer` (construction included).",
        *recipe_lines(args, floor),
        f"- Steps for quality: fewest steps with FID within {100 * args.tolerance:g}% of the "
        f"cell's best over steps {', '.join(map(str, args.steps))} (1 network call per step, "
        "on a CFG batch of 2).",
        "- **Indicative only**: one seed, one short budget, small n (FID at n = "
        f"{args.n} is biased upwards and noisy); the ranking can change with a longer budget "
        "or per-formulation tuning (all cells share one recipe's lr).",
        "",
        f"| formulation | backbone | params (M) | train steps | CPU s | wall s | {steps_head} | "
        f"{acc_head} | steps for quality |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * (2 * len(args.steps)) + "---:|",
    ]
    for c in cells:
        fids = " | ".join(f"{c['fid'][s]:.2f}" for s in args.steps)
        accs = " | ".join(f"{100 * c['acc'][s]:.0f}%" for s in args.steps)
        lines.append(
            f"| {c['formulation']} | {c['arch']} | {c['params'] / 1e6:.2f} | "
            f"{c['train_steps']} | {c['train_cpu_s']:.0f} | {c['train_wall_s']:.0f} | "
            f"{fids} | {accs} | "
            f"{steps_needed(c['fid'], args.tolerance)} |"
        )
    lines += [
        "",
        f"Best FID at this budget: {best_cell['formulation']} / {best_cell['arch']} "
        f"({min(best_cell['fid'].values()):.2f}).",
        "",
        f"![FID vs sampling steps per cell]({args.out.with_suffix('.png').name})",
        "",
        f"Samples at {max(args.steps)} steps (one row per cell in table order, two per class):",
        "",
        f"![samples]({args.out.stem}_samples.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="60s", help="train.max_time per cell (60s, 2m, ...)")
    p.add_argument("--formulations", default="ddpm,edm,flow")
    p.add_argument("--archs", default="unet,dit")
    p.add_argument("--steps", default="5,10,20", help="sampling step counts to evaluate")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--n", type=int, default=500, help="samples per evaluation")
    p.add_argument("--tolerance", type=float, default=0.1, help="'within X of the best FID'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what the budget counts: process CPU seconds (time.process_time) or wall seconds",
    )
    p.add_argument("--jobs", type=int, default=1,
                   help="cells trained at once, one process each (2 on an idle 2-core machine "
                   "with --threads 1 and --clock cpu)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=tuple(DATA), default="digits",
                   help="digits (8x8, configs/digits.yaml) or shapes (32x32 RGB, data.source "
                   "shapes)")  # fmt: skip
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default bench/results/formulations[_shapes].md)",
    )
    args = p.parse_args(argv)
    args.data = DATA[args.data]
    args.out = args.out or RESULTS / args.data.out
    args.argv = sys.argv[1:] if argv is None else argv
    args.steps = sorted(int(s) for s in args.steps.split(","))
    parse_duration(args.budget)  # fail before any training
    torch.set_num_threads(args.threads)
    # The small-n FID warning is stated once in the report instead of per evaluation.
    warnings.filterwarnings("ignore", message="FID computed from")
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="formulations_"))

    todo = [(f, a) for a in args.archs.split(",") for f in args.formulations.split(",")]
    if args.jobs > 1:  # one process per cell, each on --threads threads (the CPU clock is its own)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            cells = list(pool.map(run_cell, todo, [args] * len(todo), [work] * len(todo)))
    else:
        cells = [run_cell(cell, args, work) for cell in todo]
    floor = real_floor(args.data, args.n, args.seed)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(cells, args, floor, args.out.with_suffix(".png"))
    sample_grid(cells, args.out.with_name(f"{args.out.stem}_samples.png"))
    text = report(cells, args, floor, time.perf_counter() - start)
    raw = [{k: v for k, v in c.items() if k not in ("run_dir", "grid")} for c in cells]
    args.out.with_suffix(".json").write_text(json.dumps({"floor": floor, "cells": raw}, indent=1))
    print(text)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
