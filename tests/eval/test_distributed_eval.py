"""``difflab eval`` / ``difflab sweep`` under ``torchrun``: 2 gloo ranks give one process's numbers.

10 samples in batches of 4: rank 0 draws batches [0, 4) and [8, 10), rank 1 draws [4, 8);
rank 0 gathers them in order and scores them.  Per-image seeds make the images those of one
process: accuracy is equal, FID and KID equal to 1e-12 (the workers' one BLAS thread
rounds the covariance square root's last bit differently from the test's threads), and the
files are written once, by rank 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_tiny_run.py
from _tiny_run import make_tiny_run  # noqa: E402
from torchrun_helpers import torchrun, worker_env  # noqa: E402

from difflab.eval.ranks import Ranks  # noqa: E402
from difflab.eval.sweep import evaluate_pipeline, run_sweep  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not comparable with numbers in papers"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
]
SRC = Path(__file__).resolve().parents[2] / "src"
EVAL = ["--metrics", "fid,kid,accuracy", "--n", "10", "--batch-size", "4", "--sampler", "ddim",
        "--steps", "2", "--cfg", "2", "--seed", "3"]  # fmt: skip
SWEEP = ["--samplers", "ddim", "--steps", "1,2", "--cfg", "2", "--metrics", "fid,accuracy",
         "--n", "10", "--batch-size", "4", "--seed", "3", "--no-plots"]  # fmt: skip
METRICS = ("fid[digits-cnn]", "kid[digits-cnn]", "kid_std[digits-cnn]", "accuracy[digits-cnn]")


def _torchrun(*args: str) -> subprocess.Popen:
    """``torchrun ... -m difflab.cli -- ARGS``: the ``--`` keeps torchrun's own parser off
    ``--n``, which it would take for an ambiguous abbreviation of ``--nnodes`` / ``--node-rank``."""
    cmd = torchrun("-m", "difflab.cli", "--", *args)
    return subprocess.Popen(cmd, env=worker_env(SRC), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_ranks_share_the_batches_in_rounds():
    """Batch k on rank k % world; a rank whose share ran out waits a round with None."""
    assert list(Ranks(0, 2).batches(10, 4)) == [(0, 4), (8, 10)]
    assert list(Ranks(1, 2).batches(10, 4)) == [(4, 8), None]
    assert list(Ranks().batches(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        Ranks(2, 2)


def test_two_ranks_give_the_metrics_of_one_process(tmp_path):
    run = make_tiny_run(tmp_path / "run", num_classes=10)
    out = tmp_path / "eval.json"
    procs = {  # at once: one's imports overlap the other's
        "eval": _torchrun("eval", str(run), *EVAL, "-o", str(out)),
        "sweep": _torchrun("sweep", str(run), *SWEEP, "--out", str(tmp_path / "sweep")),
    }
    outputs = {name: p.communicate(timeout=300) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, (name, outputs[name][1][-3000:])

    one = evaluate_pipeline(run, metrics="fid,kid,accuracy", n=10, batch_size=4,
                            sampler="ddim", steps=2, guidance_scale=2.0, seed=3)  # fmt: skip
    two = json.loads(out.read_text())
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], rel=1e-12, abs=1e-15), key
    assert (two["n"], two["nfe"], two["ranks"]) == (10, 2, 2) and "ranks" not in one
    assert outputs["eval"][0].count("wrote ") == 1  # rank 0 alone prints and writes

    rows = run_sweep(run, samplers="ddim", steps="1,2", cfg_scales="2", metrics="fid,accuracy",
                     n=10, batch_size=4, seed=3, out_dir=tmp_path / "sweep1",
                     plots=False).rows  # fmt: skip
    lines = (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per cell: written once
    for a, b in zip(map(json.loads, lines), rows, strict=True):
        assert (a["steps"], a["nfe"]) == (b["steps"], b["nfe"])
        assert a["accuracy[digits-cnn]"] == b["accuracy[digits-cnn]"]
        assert a["fid[digits-cnn]"] == pytest.approx(b["fid[digits-cnn]"], rel=1e-12)
