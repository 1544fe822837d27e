"""``difflab ema RUN --sigma-rel ... --eval``: each σ_rel's reconstruction scored with the same
sampling settings and seeds, equal to evaluating that reconstruction directly; the table,
the plot and the best σ_rel per metric."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import one_thread, tiny_config  # noqa: F401

from difflab.cli import main as cli_main
from difflab.eval import evaluate_pipeline
from difflab.pipeline import Pipeline
from difflab.train import train
from difflab.train.posthoc_ema import reconstruct
from difflab.train.posthoc_sweep import (
    SWEEP_FILES,
    best_sigma_rels,
    higher_is_better,
    sweep_sigma_rel,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*not comparable with numbers in papers")

DIGITS = ["model.num_classes=10", "data.source=digits", "data.channels=1", "train.max_steps=6",
          "train.lr=1e-2", "train.log_every=100", "sample.sampler=ddim", "sample.steps=2",
          "train.posthoc_ema={sigma_rels: [0.05, 0.10], every: 1}"]  # fmt: skip
SIGMAS = [0.03, 0.08, 0.15]
FID, ACC = "fid[digits-cnn]", "accuracy[digits-cnn]"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path_factory.getbasetemp() / "difflab_cache"))


def test_sigma_rel_sweep_rows_equal_direct_evaluation_and_cli_prints_the_best(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, *DIGITS), progress=False)
    rows = sweep_sigma_rel(run, SIGMAS, metrics="fid,accuracy", n=20, steps=2, seed=3)

    assert [r["sigma_rel"] for r in rows] == SIGMAS
    states = []
    for sigma, row in zip(SIGMAS, rows):
        name = f"ema_sigma{sigma:.3f}"
        assert row["weights"] == name and row["ema_step"] == 6
        assert (row["sampler"], row["steps"], row["seed"], row["n"]) == ("ddim", 2, 3, 20)
        # the file the sweep scored is the reconstruction of that σ_rel
        state = load_file(run / f"{name}.safetensors")
        rebuilt, _ = reconstruct(run, sigma)
        assert all(torch.equal(state[k], v) for k, v in rebuilt.items())
        states.append(state)
        direct = evaluate_pipeline(Pipeline.from_run(run, weights=name),
                                   metrics=["fid", "accuracy"], n=20, steps=2, seed=3)  # fmt: skip
        assert row[ACC] == direct[ACC]
        assert row[FID] == pytest.approx(direct[FID], rel=1e-9)
    # the three σ_rel are three different networks
    key = next(k for k, v in states[0].items() if v.is_floating_point() and v.numel() > 16)
    assert not torch.equal(states[0][key], states[1][key])
    assert not torch.equal(states[1][key], states[2][key])

    # best: lowest FID, highest accuracy (the first σ_rel on a tie)
    assert higher_is_better(ACC) and not higher_is_better(FID)
    best = best_sigma_rels(rows)
    assert best[FID] == min(rows, key=lambda r: r[FID])["sigma_rel"]
    assert best[ACC] == max(rows, key=lambda r: r[ACC])["sigma_rel"]

    out = run / "posthoc_ema" / "sweep"
    with open(out / SWEEP_FILES["csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [float(r["sigma_rel"]) for r in table] == SIGMAS
    assert [float(r[FID]) for r in table] == [r[FID] for r in rows]
    md = (out / SWEEP_FILES["markdown"]).read_text()
    assert md.splitlines()[0] == f"| σ_rel | {FID} ↓ | {ACC} ↑ |"
    assert f"| {best[FID]:g} | **" in md
    assert (out / SWEEP_FILES["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the CLI: same settings, two of the σ_rel, another folder: the same numbers and their best
    capsys.readouterr()
    cli_out = tmp_path / "cli"
    args = ["ema", str(run), "--sigma-rel", "0.03,0.15", "--eval", "fid,accuracy",
            "--n", "20", "--steps", "2", "--seed", "3", "--out", str(cli_out)]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    pair = best_sigma_rels([rows[0], rows[2]])
    assert (
        f"best {FID}: sigma_rel {pair[FID]:g} ({rows[0 if pair[FID] == 0.03 else 2][FID]:.4g})"
        in printed
    )
    assert f"best {ACC}: sigma_rel {pair[ACC]:g}" in printed
    with open(cli_out / SWEEP_FILES["csv"], newline="") as fh:
        again = list(csv.DictReader(fh))
    assert [r[ACC] for r in again] == [table[0][ACC], table[2][ACC]]
    assert [r[FID] for r in again] == [table[0][FID], table[2][FID]]
    assert (cli_out / SWEEP_FILES["plot"]).is_file()
    assert cli_main(["ema", str(run), "--sigma-rel", "0.1", "--eval", "fid,acc"]) == 2
    assert "metric" in capsys.readouterr().err
