"""configs/small_images.yaml (issue 15's small-data recipe): it loads and validates, trains two
steps on a tiny class-folder set (and on the same images as a .npz), and the run samples at
the recipe's own sampler / steps / CFG (the ``sample:`` section) when a call leaves them out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from train_helpers import one_thread  # noqa: F401

from difflab import Pipeline
from difflab.train import load_config, train

RECIPE = Path(__file__).parents[2] / "configs" / "small_images.yaml"
FAST = ["train.max_steps=2", "train.device=cpu", "train.plot_metrics=false", "train.log_every=1"]


def _digit_like(rng: np.random.Generator, k: int) -> np.ndarray:
    """A 28x28 uint8 image: a bright bar whose position encodes class ``k``, plus noise."""
    img = rng.integers(0, 30, (28, 28)).astype(np.uint8)
    img[4 + 10 * k : 8 + 10 * k, 6:22] = 255
    return img


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """12 grayscale 28x28 PNGs in 2 class folders (the judge's layout: class = subfolder)."""
    root = tmp_path_factory.mktemp("digits28")
    rng = np.random.default_rng(0)
    for k in range(2):
        (root / str(k)).mkdir()
        for i in range(6):
            Image.fromarray(_digit_like(rng, k), mode="L").save(root / str(k) / f"{i}.png")
    return root


def test_recipe_loads_and_validates():
    cfg = load_config(RECIPE, ["data.path=/somewhere"])
    raw = yaml.safe_load(RECIPE.read_text())
    assert cfg.diffusion.formulation == raw["diffusion"]["formulation"]
    assert cfg.train.max_time == "15m" and cfg.train.mixed_precision == "no"
    assert (cfg.data.image_size, cfg.data.channels) == (28, 1)
    model = cfg.model_config()
    assert (model.image_size, model.in_channels) == (28, 1)  # taken from the data section
    assert model.num_classes is None  # left out: class folders decide (see the next test)
    assert cfg.sample.sampler == raw["sample"]["sampler"]
    assert cfg.sample.steps == raw["sample"]["steps"]
    assert cfg.sample.guidance_scale == raw["sample"]["guidance_scale"]


def test_recipe_trains_two_steps_and_samples_at_its_defaults(tmp_path, folders, capsys):
    cfg = load_config(RECIPE, [f"data.path={folders}", f"run_dir={tmp_path / 'run'}", *FAST])
    result = train(cfg, progress=False)
    assert result.step == 2 and np.isfinite(result.final_loss)
    out = capsys.readouterr().out
    assert "class-conditional on the 2 class folders (0, 1)" in out
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["model"]["num_classes"] == 2
    assert written["sample"] == cfg.to_dict()["sample"]

    pipe = Pipeline.from_run(tmp_path / "run")
    params = pipe.resolve_params(4, class_labels=[0, 1, 0, 1])
    assert params["sampler"] == cfg.sample.sampler
    assert params["steps"] == cfg.sample.steps
    assert params["guidance_scale"] == cfg.sample.guidance_scale
    images = pipe(2, class_labels=[0, 1], steps=2, progress=False)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


def test_recipe_reads_an_npz_given_as_data_path(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = np.array([0, 1] * 4)
    images = np.stack([_digit_like(rng, k) for k in labels])  # (8, 28, 28) uint8
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    data = [f"data.path={tmp_path / 'digits.npz'}", f"run_dir={tmp_path / 'run'}"]
    cfg = load_config(RECIPE, [*data, "train.max_steps=1", *FAST[1:]])
    assert train(cfg, progress=False).step == 1
    out = capsys.readouterr().out
    assert "read as data.source npz" in out
    assert (
        yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["num_classes"] == 2
    )
