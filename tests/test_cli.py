"""The ``difflab`` command in-process: sample, a few-step demo, train, error exit codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _tiny_run import make_tiny_run
from PIL import Image

from difflab.cli import main
from difflab.data.transforms import ImageTransform
from difflab.images import make_grid, read_png_params, save_image
from difflab.pipeline import Pipeline


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("cli") / "run", num_classes=10)


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "train", "sample", "eval", "sweep"):
        assert name in out


def test_eval_through_main_writes_json_equal_to_the_library_call(
    run, tmp_path, capsys, monkeypatch
):
    import json

    from difflab.eval import evaluate_pipeline

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "e.json"
    argv = ["eval", str(run), "--metrics", "accuracy", "--n", "20", "--sampler", "ddim",
            "--steps", "2", "--cfg", "1", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    written = json.loads(out.read_text())
    direct = evaluate_pipeline(
        run, metrics=["accuracy"], n=20, sampler="ddim", steps=2, guidance_scale=1.0
    )
    assert written["accuracy[digits-cnn]"] == direct["accuracy[digits-cnn]"]


def test_sample_writes_grid_with_params_and_separate_images(run, tmp_path, capsys):
    out = tmp_path / "s.png"
    argv = [
        "sample", str(run), "--sampler", "ddim", "--steps", "3", "--cfg", "1.5",
        "--class", "2", "7", "--n", "4", "--seed", "5", "-o", str(out), "--separate",
    ]  # fmt: skip
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    params = read_png_params(out)
    assert params["class_labels"] == [2, 2, 7, 7] and params["seed"] == 5
    assert (params["sampler"], params["steps"], params["guidance_scale"]) == ("ddim", 3, 1.5)
    assert params["weights"] == "ema" and params["run"] == str(run)
    assert params["spacing"] and params["difflab_version"] and params["clip_x0"] is True
    refinements = (params["guidance_rescale"], params["guidance_interval"], params["eta"])
    assert refinements == (0, None, None)
    with Image.open(out) as img:
        assert img.size == (2 * 9 + 1, 2 * 9 + 1)  # one row per class: 2 x 2 tiles of 8 + pad
    singles = sorted((tmp_path / "s").glob("*.png"))
    assert len(singles) == 4
    one = read_png_params(singles[3])
    assert one["seed"] == 8 and one["class_labels"] == [7] and one["n"] == 1


def test_sample_passes_guidance_refinements_and_eta_to_the_pipeline(run, tmp_path):
    out = tmp_path / "g.png"
    argv = ["sample", str(run), "--sampler", "ddim", "--steps", "3", "--cfg", "2", "--class", "4",
            "--n", "2", "--cfg-rescale", "0.5", "--cfg-interval", "0.2", "8", "--eta", "0.3",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    params = read_png_params(out)
    assert (params["guidance_rescale"], params["guidance_interval"], params["eta"]) == (
        0.5, [0.2, 8.0], 0.3,
    )  # fmt: skip
    pipe = Pipeline.from_run(run)
    want = pipe(2, [4, 4], None, "ddim", 3, 2.0, 0, eta=0.3, guidance_rescale=0.5,
                guidance_interval=(0.2, 8.0))  # fmt: skip
    with Image.open(out) as img:
        assert np.array_equal(np.asarray(img), np.asarray(make_grid(want)))
    argv = ["sample", str(run), "--sampler", "ddim", "--steps", "3", "--cfg", "3", "--class", "4",
            "--n", "2", "--apg-momentum", "-0.25", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert read_png_params(out)["apg"] == {"eta": 0.0, "momentum": -0.25, "norm_threshold": 0.0}
    want = pipe(2, [4, 4], None, "ddim", 3, 3.0, 0, apg={"momentum": -0.25})
    with Image.open(out) as img:
        assert np.array_equal(np.asarray(img), np.asarray(make_grid(want)))
    argv = ["sample", str(run), "--sampler", "ddim", "--steps", "3", "--cfg", "3", "--class", "4",
            "--n", "2", "--negative-class", "7", "--width", "16", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    params = read_png_params(out)
    assert params["negative_class"] == [7, 7] and params["size"] == [8, 16]
    want = pipe(2, [4, 4], None, "ddim", 3, 3.0, 0, negative_class=7, width=16)
    with Image.open(out) as img:
        assert np.array_equal(np.asarray(img), np.asarray(make_grid(want)))


def test_sample_from_an_init_image_is_the_pipelines_img2img(run, tmp_path, capsys):
    init = tmp_path / "init.png"
    pipe = Pipeline.from_run(run)
    save_image(pipe(1, [6], seed=9)[0], init)
    out = tmp_path / "i2i.png"
    argv = ["sample", str(run), "--init-image", str(init), "--strength", "0.5", "--class", "6",
            "--n", "2", "--steps", "6", "--sampler", "ddim", "--seed", "3",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert f"(2 images, ddim, 3 of 6 steps from {init})" in capsys.readouterr().out
    params = read_png_params(out)
    assert params["strength"] == 0.5 and params["init_image"] == str(init)
    with Image.open(init) as img:
        x = ImageTransform(8, 1)(img)[None].expand(2, -1, -1, -1)
    want = pipe.img2img(x, 0.5, [6, 6], None, "ddim", 6, None, 3)
    assert params["timesteps"] == want.timesteps and len(want.timesteps) == 3
    with Image.open(out) as img:
        assert np.array_equal(np.asarray(img), np.asarray(make_grid(want.images)))
    assert main(["sample", str(run), "--init-image", str(init), "-o", str(out)]) == 2
    assert "needs both --init-image and --strength" in _err(capsys)

    mask = tmp_path / "mask.png"  # white = generate: the centre 4x4
    Image.fromarray((np.pad(np.ones((4, 4)), 2) * 255).astype(np.uint8)).save(mask)
    argv += ["--mask", str(mask)]
    assert main(argv) == 0
    params = read_png_params(out)
    assert params["inpaint"] is True and params["mask"] == str(mask)
    hole = torch.from_numpy(np.pad(np.ones((4, 4), np.float32), 2))[None, None]
    want = pipe.img2img(x, 0.5, [6, 6], None, "ddim", 6, None, 3, mask=hole)
    with Image.open(out) as img:
        assert np.array_equal(np.asarray(img), np.asarray(make_grid(want.images)))
    assert main(["sample", str(run), "--mask", str(mask), "-o", str(out)]) == 2
    assert "--mask (inpainting) needs --init-image" in _err(capsys)
    assert main(["sample", str(run), "--init-image", str(tmp_path / "no.png"), "--strength",
                 "0.5"]) == 2  # fmt: skip
    assert "does not exist" in _err(capsys)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_difflabs_warnings_print_as_one_line_naming_the_command(tmp_path, capsys):
    """difflab's own warnings reach a terminal as ``difflab COMMAND: warning: ...``, without
    the source path and code line of Python's default format."""
    import warnings

    config = Path(__file__).parents[1] / "configs" / "digits.yaml"
    small = ["model.preset=tiny", "model.model_channels=16", "model.norm_groups=4",
             "train.batch_size=8", "train.device=cpu", "train.sample_every=0"]  # fmt: skip
    argv = ["train", str(config), "--set", f"run_dir={tmp_path}",
            *[f"--set={o}" for o in small]]  # fmt: skip
    assert main([*argv, "--set", "train.max_steps=1"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main([*argv, "--set", "train.max_steps=2", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "difflab train: warning: resuming with changed config keys: train.max_steps" in err
    assert "loop.py" not in err and "UserWarning" not in err


def test_error_paths_exit_2_with_a_message(run, tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _err(capsys)

    uncond = make_tiny_run(tmp_path / "u", num_classes=None)
    assert main(["sample", str(uncond), "--cfg", "3", "--n", "1"]) == 2
    assert "unconditional" in _err(capsys)

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["model_channels"] = 16
    other = make_tiny_run(tmp_path / "o")
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["sample", str(other), "--n", "1"]) == 2
    assert "another architecture" in _err(capsys)

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"batchsize": 8}}))
    assert main(["train", str(bad)]) == 2
    assert "did you mean 'batch_size'" in _err(capsys)

    shape = tmp_path / "shape.yaml"
    shape.write_text(yaml.safe_dump({"data": {"channels": 3}, "model": {"in_channels": 1}}))
    assert main(["train", str(shape)]) == 2
    assert "channels" in _err(capsys)

    assert main(["sample", str(run), "--class", "1", "2", "3", "--n", "4"]) == 2
    assert "multiple" in _err(capsys)
    assert main(["frobnicate"]) == 2


def test_demo_few_steps_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "3", "--per-class", "2", "--sampler", "ddim",
            "--sample-steps", "3", "--set", "model.model_channels=16",
            "--set", "train.batch_size=16", "--threads", "0"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "SVM accuracy" in text and "elapsed" in text
    params = read_png_params(out / "demo_grid.png")
    assert params["class_labels"] == [k for k in range(10) for _ in range(2)]
    with Image.open(out / "demo_grid.png") as img:
        assert img.size == (2 * 9 + 1, 10 * 9 + 1)  # one row per class
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 3 and cfg["model"]["num_classes"] == 10
    assert cfg["model"]["model_channels"] == 16
    assert (out / "ema.safetensors").is_file()

    # A second demo into the same folder is refused with the flags that resolve it ...
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 2
    err = _err(capsys)
    assert "already holds a trained run" in err and "--overwrite" in err and "--resume" in err
    # ... and --overwrite replaces the run (2 steps now) but keeps the user's own files.
    argv[argv.index("--steps") + 1] = "2"
    assert main([*argv, "--overwrite"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 2 and (out / "notes.txt").read_text() == "mine"
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "start"' in line for line in metrics) == 1  # the old log is gone


def test_train_from_config_with_overrides(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    from difflab.cli.demo import DEMO_CONFIG

    config.write_text(yaml.safe_dump(DEMO_CONFIG))
    out = tmp_path / "t"
    argv = ["train", str(config), "--set", f"run_dir={out}", "--set", "train.max_steps=2",
            "--set", "train.batch_size=8", "--set", "model.model_channels=16"]  # fmt: skip
    assert main(argv) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 2 and cfg["model"]["model_channels"] == 16
    assert main(argv) == 2  # the run exists: needs --resume
    assert "resume" in _err(capsys)


def test_configs_digits_yaml_is_the_demo_config():
    from difflab.cli.demo import DEMO_CONFIG
    from difflab.train import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    shipped = yaml.safe_load(path.read_text())
    assert {**shipped, "run_dir": DEMO_CONFIG["run_dir"]} == DEMO_CONFIG
    assert load_config(path).model_config().num_classes == 10
