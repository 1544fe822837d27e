"""``train.eval_every``: metrics of EMA samples logged while training, without changing it."""

from __future__ import annotations

import json
import math

import pytest
from train_helpers import one_thread, tiny_config, write_captioned_images  # noqa: F401

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


def test_text_runs_are_scored_with_each_class_drawn_from_its_caption(tmp_path):
    """eval_every on a text run: class k is sampled from the prompt "a handwritten digit
    <k>", scored like a class-conditional run, and equal to evaluating the saved run."""
    from difflab.data import digits_caption
    from difflab.eval.sweep import PromptedPipeline, load_pipeline

    text = ["model.num_classes=null", "text.encoder=transformer", "text.width=16",
            "text.heads=2", "text.layers=1", "text.max_length=8",
            "sample.guidance_scale=2"]  # fmt: skip
    evals = ["train.eval_every=2", "train.eval_n=20", "train.eval_metrics=fid,accuracy"]
    cfg_opts = [*DIGITS[1:], *text]
    with_eval = train(tiny_config(tmp_path / "a", *cfg_opts, *evals), progress=False)
    without = train(tiny_config(tmp_path / "b", *cfg_opts), progress=False)
    assert with_eval.losses == without.losses
    (logged,) = with_eval.evals
    assert logged["n"] == 20 and 0.0 <= logged["accuracy[digits-cnn]"] <= 1.0

    pipe = load_pipeline(str(tmp_path / "a"))
    assert isinstance(pipe, PromptedPipeline) and pipe.num_classes == 10
    assert pipe.prompts[7] == digits_caption(7)
    again = evaluate_pipeline(pipe, metrics=["fid", "accuracy"], n=20, seed=0)
    assert again["accuracy[digits-cnn]"] == logged["accuracy[digits-cnn]"]
    assert again["fid[digits-cnn]"] == pytest.approx(logged["fid[digits-cnn]"], rel=1e-9)
    # Class k of the wrapper is the text pipeline prompted with class k's caption.
    inner = Pipeline.from_run(tmp_path / "a")
    a = pipe(2, [3, 7], None, "ddim", 2, 2.0, 5)
    b = inner(2, None, [digits_caption(3), digits_caption(7)], "ddim", 2, 2.0, 5)
    assert (a == b).all()


def test_caption_only_text_runs_cycle_over_their_captions(tmp_path):
    """Captions without classes: eval samples cycle over the distinct captions, FID is
    scored (and equals evaluating the saved run); accuracy is refused, naming why."""
    from difflab.eval.sweep import PromptedPipeline, load_pipeline

    folder = write_captioned_images(tmp_path / "captions", ["a tall bar", "a small ring"] * 4)
    text = ["model.num_classes=null", "text.encoder=transformer", "text.width=16",
            "text.heads=2", "text.layers=1", "text.max_length=8", "data.source=captions",
            f"data.path={folder}", "data.image_size=8", "train.batch_size=4",
            "train.max_steps=2", "sample.sampler=ddim", "sample.steps=2"]  # fmt: skip
    with pytest.raises(ValueError, match="has captions only"):
        tiny_config(tmp_path / "x", *text, "train.eval_every=1")  # default metrics: accuracy
    evals = ["train.eval_every=2", "train.eval_n=6", "train.eval_metrics=fid"]
    result = train(tiny_config(tmp_path / "run", *text, *evals), progress=False)
    (logged,) = result.evals
    pipe = load_pipeline(str(tmp_path / "run"))
    assert isinstance(pipe, PromptedPipeline) and not pipe.labelled
    assert pipe.prompts == ["a tall bar", "a small ring"]
    again = evaluate_pipeline(pipe, metrics=["fid"], n=6, seed=0)
    assert again["fid[digits-cnn]"] == pytest.approx(logged["fid[digits-cnn]"], rel=1e-9)
    with pytest.raises(ValueError, match="accuracy' needs classes"):
        evaluate_pipeline(pipe, metrics=["accuracy"], n=2)
