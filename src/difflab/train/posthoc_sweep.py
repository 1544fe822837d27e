"""A sweep over σ_rel of a run's post-hoc EMA (Karras et al. 2024, EDM2 sec. 3 and fig. 5):
reconstruct the EMA of each σ_rel, score each with the same sampling settings and seeds, and
tabulate and plot metric vs σ_rel.

Owns the sweep's rows, its files under ``RUN/posthoc_ema/sweep/`` (``sigma_rel_sweep.csv``,
``sigma_rel_sweep.md``, ``sigma_rel_sweep.png``) and which direction is better per metric.
Knows nothing of the reconstruction maths (`difflab.train.posthoc_ema`) or of sampling and
metric maths (`difflab.eval.sweep.evaluate_pipeline` computes every number).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..images import new_figure, save_figure
from ..runs import atomic_write_bytes
from .posthoc_ema import SNAPSHOT_DIR, _sigma_name, write_reconstructions

__all__ = [
    "SWEEP_FILES",
    "best_sigma_rels",
    "higher_is_better",
    "plot_sigma_rel_sweep",
    "sweep_sigma_rel",
    "write_sigma_rel_tables",
]

SWEEP_FILES = {
    "csv": "sigma_rel_sweep.csv",
    "markdown": "sigma_rel_sweep.md",
    "plot": "sigma_rel_sweep.png",
}
# Metric names (the part before "[extractor]") where a smaller number is better; the others
# (accuracy, precision, recall, inception_score, clip_score) are better larger.
_LOWER_IS_BETTER = frozenset({"fid", "kid"})
_METRIC_KEY = re.compile(r"^(?P<name>[a-z_]+)\[(?P<extractor>[^\]]+)\]$")
_FIRST_COLUMNS = ("sigma_rel", "weights", "ema_step", "sampler", "steps", "guidance_scale",
                  "nfe", "n", "seed")  # fmt: skip


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (``"fid[digits-cnn]"`` or ``"fid"``) is better."""
    m = _METRIC_KEY.match(metric)
    return (m["name"] if m else metric) not in _LOWER_IS_BETTER


def sweep_sigma_rel(
    run_dir: str | os.PathLike,
    sigma_rels: Sequence[float],
    *,
    metrics: Iterable[str] | str = ("fid", "accuracy"),
    n: int = 500,
    step: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    plots: bool = True,
    **eval_kwargs: Any,
) -> list[dict[str, Any]]:
    """Reconstruct the EMA of each σ_rel (``RUN/ema_sigma<S>.safetensors``, `reconstruct`)
    and score it with `evaluate_pipeline` at the same sampler, steps, guidance and seeds.

    Writes ``sigma_rel_sweep.csv`` / ``.md`` and (with ``plots``) ``sigma_rel_sweep.png``
    into ``out_dir`` (default ``RUN/posthoc_ema/sweep``).

    :param eval_kwargs: further arguments of `evaluate_pipeline` (``reference``,
        ``extractor``, ``batch_size``, ``device``, ...).
    :return: one row per σ_rel, in the given order: ``sigma_rel``, ``weights`` (the name
        ``Pipeline.from_run`` takes), ``ema_step`` and everything `evaluate_pipeline` returns.
    """
    from ..eval.sweep import evaluate_pipeline

    sigma_rels = [float(s) for s in sigma_rels]
    if not sigma_rels:
        raise ValueError("sweep_sigma_rel needs at least one sigma_rel")
    names = [f"ema_{_sigma_name(s)}" for s in sigma_rels]
    if len(set(names)) != len(names):
        raise ValueError(f"sigma_rels {sigma_rels} must differ in their first 3 decimals "
                         "(they name the reconstruction files)")  # fmt: skip
    paths = write_reconstructions(Path(run_dir), sigma_rels, step=step)
    rows = []
    for sigma, name, path in zip(sigma_rels, names, paths):
        with safe_open(str(path), framework="pt") as fh:
            ema_step = int((fh.metadata() or {})["step"])
        result = evaluate_pipeline(
            run_dir, metrics=metrics, n=n, sampler=sampler, steps=steps,
            guidance_scale=guidance_scale, seed=seed, weights=name, **eval_kwargs,
        )  # fmt: skip
        rows.append({"sigma_rel": sigma, "weights": name, "ema_step": ema_step, **result})
    out = Path(run_dir) / SNAPSHOT_DIR / "sweep" if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_sigma_rel_tables(rows, out)
    if plots:
        plot_sigma_rel_sweep(rows, out)
    return rows


def _metric_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        for k in row:
            m = _METRIC_KEY.match(k)
            if m and not m["name"].endswith("_std") and isinstance(row[k], int | float):
                cols[k] = None
    return list(cols)


def best_sigma_rels(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The σ_rel of the best row per metric column (min for FID/KID, max otherwise; the first
    σ_rel on a tie, NaN rows skipped)."""
    best = {}
    for m in _metric_columns(rows):
        scored = [r for r in rows if isinstance(r.get(m), int | float) and not math.isnan(r[m])]
        if not scored:
            continue
        sign = -1.0 if higher_is_better(m) else 1.0
        best[m] = min(scored, key=lambda r: sign * r[m])["sigma_rel"]
    return best


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _csv_value(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return ";".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else v


def write_sigma_rel_tables(
    rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write ``sigma_rel_sweep.csv`` (every field) and ``sigma_rel_sweep.md`` (σ_rel, the
    metrics with the best of each in bold, and the shared settings) atomically."""
    out = Path(out_dir)
    columns = dict.fromkeys(_FIRST_COLUMNS)
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})

    metrics, best = _metric_columns(rows), best_sigma_rels(rows)
    head = ["σ_rel", *(f"{m} {'↑' if higher_is_better(m) else '↓'}" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['sigma_rel']:g}"]
        for m in metrics:
            cell = _fmt(r.get(m))
            cells.append(f"**{cell}**" if best.get(m) == r["sigma_rel"] else cell)
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        r0 = rows[0]
        guidance = _fmt(r0.get("guidance_scale"))
        lines += ["", f"EMA reconstructed at step {r0.get('ema_step')}; "
                  f"sampler {r0.get('sampler')}, {r0.get('steps')} steps, guidance {guidance}, "
                  f"n={r0.get('n')} samples per σ_rel, seed {r0.get('seed')} (image i: seed+i), "
                  "the same for every σ_rel. Best in bold."]  # fmt: skip
    md = "\n".join(lines) + "\n"
    files = {"csv": out / SWEEP_FILES["csv"], "markdown": out / SWEEP_FILES["markdown"]}
    atomic_write_bytes(files["csv"], buf.getvalue().encode("utf-8"))
    atomic_write_bytes(files["markdown"], md.encode("utf-8"))
    return files


def plot_sigma_rel_sweep(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> Path:
    """``sigma_rel_sweep.png``: a panel per metric, metric vs σ_rel on a log axis, the best
    σ_rel marked with a star (cf. EDM2 fig. 5)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    metrics, best = _metric_columns(rows), best_sigma_rels(rows)
    fig, axes = new_figure(1, max(len(metrics), 1))
    sigmas = sorted(r["sigma_rel"] for r in rows)
    for ax, m in zip(axes[0], metrics):
        pts = sorted((r["sigma_rel"], r[m]) for r in rows if isinstance(r.get(m), int | float))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        if m in best:
            y = next(v for s, v in pts if s == best[m])
            ax.plot([best[m]], [y], marker="*", markersize=14, color="tab:red", linestyle="none",
                    label=f"best σ_rel {best[m]:g}")  # fmt: skip
            ax.legend(fontsize="small")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sigmas))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        better = "higher is better" if higher_is_better(m) else "lower is better"
        ax.set(xlabel="σ_rel", ylabel=m, title=better)
    return save_figure(fig, Path(out_dir) / SWEEP_FILES["plot"])
