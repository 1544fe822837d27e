"""difflab.eval.shapes_classifier: a deterministic, cached CNN that recognises the synthetic
shapes, gives a FID space where real-vs-real is small and real-vs-noise large, and is chosen
by the eval for runs on ``data.source: shapes``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from difflab.data.shapes import shapes_tensor
from difflab.eval.features import cache_dir
from difflab.eval.metrics import evaluate, to_uint8
from difflab.eval.shapes_classifier import ShapesClassifier
from difflab.eval.sweep import data_scorer, evaluate_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:.*not comparable with numbers in papers")
DATA = {"source": "shapes", "image_size": 32, "channels": 3}


@pytest.fixture(scope="module")
def shapes(_cache):
    state = torch.get_rng_state()
    clf = ShapesClassifier()  # trains once (~12 CPU-s) into the tests' $DIFFLAB_CACHE
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG used
    return clf


@pytest.fixture(scope="module")
def test_set():
    x, labels = shapes_tensor(600, 32, seed=7)  # neither the training (1) nor held-out (2) seed
    return to_uint8(x), labels


def test_accuracy_on_fresh_shapes_and_the_cache(shapes, test_set):
    assert shapes.accuracy >= 0.95
    images, labels = test_set
    assert (shapes.predict(images) == labels).float().mean() >= 0.95
    with safe_open(str(shapes.path), framework="pt") as f:
        meta = f.metadata()
    assert float(meta["held_out_accuracy"]) == shapes.accuracy
    assert shapes.path.parent == cache_dir() / "shapes_cnn"
    assert [p.name for p in shapes.path.parent.iterdir()] == [shapes.path.name]
    again = ShapesClassifier()  # loads, does not retrain
    assert again.accuracy == shapes.accuracy
    assert torch.equal(again(images[:8]), shapes(images[:8]))
    assert shapes(images[:8]).shape == (8, 64) and shapes.logits(images[:8]).shape == (8, 6)


def test_other_sizes_are_resized_to_32(shapes):
    x, labels = shapes_tensor(120, 64, seed=7)
    assert (shapes.predict(to_uint8(x)) == labels).float().mean() >= 0.95
    with pytest.raises(ValueError, match="C in \\(3,\\)"):
        shapes(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_fid_small_between_real_sets_large_for_noise(shapes, test_set):
    real, _ = shapes_tensor(600, 32, seed=8)
    noise = torch.rand(600, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = test_set[0]
    real_vs_real = evaluate(real, ref, extractor=shapes, metrics=("fid",))["fid[shapes-cnn]"]
    real_vs_noise = evaluate(noise, ref, extractor=shapes, metrics=("fid",))["fid[shapes-cnn]"]
    assert np.isfinite(real_vs_real) and real_vs_noise > 20 * real_vs_real


class _RealShapes:
    """A stand-in 6-class pipeline that 'samples' real shapes of the requested classes."""

    num_classes = 6
    pixel_shape = (3, 32, 32)

    def __call__(self, n, labels, prompt, sampler, steps, scale, seed, progress=False):
        from difflab.data.shapes import render_shapes

        return render_shapes(labels, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_eval_scores_shapes_runs_with_shapes_cnn(shapes):
    assert isinstance(data_scorer(None, DATA), ShapesClassifier)
    assert data_scorer(None, {"source": "digits"}) is None
    row = evaluate_pipeline(_RealShapes(), metrics=("fid", "accuracy"), n=120, reference=DATA,
                            batch_size=60)  # fmt: skip
    assert row["extractor"] == "shapes-cnn"
    assert row["accuracy[shapes-cnn]"] >= 0.95
    # the same number as the metrics API on the same images against the whole data set
    images = torch.cat([_RealShapes()(60, torch.arange(s, s + 60) % 6, None, None, None, None, s)
                        for s in (0, 60)])  # fmt: skip
    direct = evaluate(images, shapes_tensor()[0], extractor=shapes, metrics=("fid",))
    assert row["fid[shapes-cnn]"] == pytest.approx(direct["fid[shapes-cnn]"], rel=1e-6)


def test_periodic_eval_on_shapes_needs_no_inception_file():
    from pathlib import Path

    from difflab.train import load_config

    digits_yaml = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"
    base = ["data.source=shapes", "data.image_size=32", "model.num_classes=6",
            "train.eval_every=10", "train.eval_metrics=fid,accuracy"]  # fmt: skip
    cfg = load_config(digits_yaml, [*base, "data.channels=3"])  # scored with shapes-cnn
    assert cfg.data.source == "shapes"
    with pytest.raises(ValueError, match="shapes classifier, which needs 3-channel"):
        load_config(digits_yaml, [*base, "data.channels=1"])
    with pytest.raises(ValueError, match="digits classifier, which needs 1-channel"):
        load_config(digits_yaml, ["data.channels=3", "train.eval_every=10"])
