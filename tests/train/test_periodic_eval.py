"""``train.eval_every``: metrics of EMA samples logged while training, without changing it."""

from __future__ import annotations

import json
import math

import pytest
from train_helpers import one_thread, tiny_config  # noqa: F401

from difflab.eval import evaluate_pipeline
from difflab.pipeline import Pipeline
from difflab.train import train

DIGITS = [
    "model.num_classes=10",
    "data.source=digits",
    "data.channels=1",
    "train.max_steps=2",
    "sample.sampler=ddim",
    "sample.steps=2",
]

pytestmark = pytest.mark.filterwarnings("ignore:.*not comparable with numbers in papers")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path_factory.getbasetemp() / "difflab_cache"))


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_eval_every_logs_metrics_equal_to_evaluating_the_saved_run(tmp_path):
    evals = ["train.eval_every=1", "train.eval_n=20", "train.eval_metrics=fid,accuracy"]
    with_eval = train(tiny_config(tmp_path / "a", *DIGITS, *evals), progress=False)
    without = train(tiny_config(tmp_path / "b", *DIGITS), progress=False)

    # Evaluating draws from forked RNG streams: the training run is unchanged.
    assert with_eval.losses == without.losses

    logged = [r for r in _records(tmp_path / "a") if r.get("event") == "eval"]
    assert [r["step"] for r in logged] == [1, 2]
    assert with_eval.evals == logged
    last = logged[-1]
    assert 0.0 <= last["accuracy[digits-cnn]"] <= 1.0 and last["n"] == 20
    assert math.isfinite(last["fid[digits-cnn]"])

    # The same numbers from the saved EMA weights through the public evaluation API.
    again = evaluate_pipeline(
        Pipeline.from_run(tmp_path / "a"), metrics=["fid", "accuracy"], n=20, seed=0
    )
    assert again["accuracy[digits-cnn]"] == last["accuracy[digits-cnn]"]
    assert again["fid[digits-cnn]"] == pytest.approx(last["fid[digits-cnn]"], rel=1e-9)


def test_eval_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="eval_metrics entry"):
        tiny_config(tmp_path, *DIGITS, "train.eval_every=1", "train.eval_metrics=fid,acc")
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_config(tmp_path, "data.source=digits", "model.num_classes=null", "train.eval_every=5")
