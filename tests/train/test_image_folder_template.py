"""configs/image_folder.yaml on 60 coloured 32x32 images in 3 class folders: each failure of
the small-data path (USER_NEEDS issue 15) now runs, with what it changed said aloud."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file
from train_helpers import one_thread  # noqa: F401

from difflab.cli import main
from difflab.models import UNetConfig
from difflab.train import load_config

TEMPLATE = Path(__file__).parents[2] / "configs" / "image_folder.yaml"
FAST = [  # the template's model and data, shrunk to seconds; batch_size stays 64 > 60 images
    "model.preset=tiny", "model.model_channels=8", "model.norm_groups=4",
    "data.image_size=16", "model.image_size=16", "train.max_steps=2", "train.num_workers=0",
    "train.mixed_precision=no", "train.device=cpu", "train.plot_metrics=false",
    "train.tensorboard=false", "sample.num_images=2", "sample.steps=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}.items():
        (root / name).mkdir()
        for i in range(20):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def test_no_and_false_both_mean_off():
    for value in ("no", "false", "off"):
        cfg = load_config(TEMPLATE, ["data.path=.", f"train.mixed_precision={value}"])
        assert cfg.train.mixed_precision == "no"


def test_tiny_preset_at_32_px_moves_attention_to_the_same_level():
    assert UNetConfig.preset("tiny").attention_resolutions == (4,)  # level 1 of 8 px
    assert UNetConfig.preset("tiny", image_size=32).attention_resolutions == (16,)


def test_template_runs_on_a_small_class_folder(tmp_path, folders, capsys):
    run = tmp_path / "run"
    args = ["train", str(TEMPLATE), "--set", f"data.path={folders}", "--set", f"run_dir={run}"]
    for item in FAST:
        args += ["--set", item]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "batch_size=64 is larger than the data set (60 samples): using batch_size=60" in err
    assert "class-conditional on the 3 class folders (blue, green, red)" in out
    assert "one sample grid at the last step" in out
    assert "done: step 2 (2 this session" in out and f"run in {run}" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 60 and saved["model"]["num_classes"] == 3
    assert saved["model"]["attention_resolutions"] == [8]  # tiny's level 1 at 16 px
    assert load_file(str(run / "ema.safetensors"))["class_embed.weight"].shape[0] == 4  # 3 + null
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_000002_ema.png",
        "step_000002_raw.png",
    ]


def test_explicit_null_classes_warns_and_trains_unconditionally(tmp_path, folders, capsys):
    args = ["train", str(TEMPLATE), "--set", f"data.path={folders}",
            "--set", f"run_dir={tmp_path / 'run'}", "--set", "model.num_classes=null"]  # fmt: skip
    for item in FAST + ["train.batch_size=30", "train.sample_every=0"]:
        args += ["--set", item]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "the data has 3 classes (blue, green, red) but model.num_classes is null" in err


def test_more_classes_than_the_model_has_is_one_line(tmp_path, folders, capsys):
    """3 class folders into model.num_classes 2: label 2 would have no embedding."""
    args = ["train", str(TEMPLATE), "--set", f"data.path={folders}",
            "--set", f"run_dir={tmp_path / 'run'}", "--set", "model.num_classes=2"]  # fmt: skip
    for item in FAST:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (
        "difflab train: error: the data (source folder) has 3 classes (blue, green, red) but "
        "model.num_classes is 2: label 2 has no embedding; set model.num_classes: 3 (or leave "
        "it out for folder/npz data)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fewer_classes_than_the_model_has_warns(tmp_path, capsys):
    """The digits config (10 classes) on the shapes set (6): trains, and says so."""
    args = ["train", str(TEMPLATE.parent / "digits.yaml"), "--set", "data.source=shapes",
            "--set", "data.image_size=8", "--set", f"run_dir={tmp_path / 'run'}",
            "--set", "train.max_steps=1", "--set", "train.sample_every=0",
            "--set", "train.plot_metrics=false", "--set", "train.tensorboard=false",
            "--set", "model.model_channels=8", "--set", "model.norm_groups=4"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert ("the data (source shapes) has 6 classes (disc, square, " in err
            and "but model.num_classes is 10: classes 6..9 are never trained" in err)  # fmt: skip
