"""``difflab sample --from-png``: an image re-created from difflab's or A1111's PNG chunk."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_run import make_tiny_run
from PIL import Image, PngImagePlugin

from difflab.cli import main
from difflab.images import make_grid, read_png_params
from difflab.pipeline import Pipeline


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("png") / "run", num_classes=10)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_from_png_of_a_sample_is_bit_identical(run, tmp_path, capsys):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    argv = ["sample", str(run), "--sampler", "dpmpp_2m", "--steps", "3", "--spacing", "karras",
            "--cfg", "1.5", "--class", "2", "7", "--n", "4", "--seed", "5", "--eta", "0",
            "--cfg-rescale", "0.5", "--weights", "raw", "-o", str(first)]  # fmt: skip
    assert main(argv) == 0
    assert main(["sample", "--from-png", str(first), "-o", str(again)]) == 0
    assert _err(capsys) == ""
    assert np.array_equal(_pixels(again), _pixels(first))  # the 2 x 2 grid, same layout
    assert read_png_params(again) == read_png_params(first)
    assert again.read_bytes() == first.read_bytes()

    # flags given override the file's values, even one equal to the flag's default (seed 0)
    assert main(["sample", "--from-png", str(first), "--seed", "0", "--weights", "ema",
                 "-o", str(again)]) == 0  # fmt: skip
    params = read_png_params(again)
    assert (params["seed"], params["weights"], params["class_labels"]) == (0, "ema", [2, 2, 7, 7])
    want = Pipeline.from_run(run)(4, [2, 2, 7, 7], None, "dpmpp_2m", 3, 1.5, 0, spacing="karras",
                                  eta=0.0, guidance_rescale=0.5)  # fmt: skip
    assert np.array_equal(_pixels(again), np.asarray(make_grid(want, 2)))


def test_an_a1111_png_of_a_class_run_maps_to_the_right_options(run, tmp_path, capsys):
    src, out = tmp_path / "a1111.png", tmp_path / "out.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "class 3\nNegative prompt: \nSteps: 5, Sampler: Euler a Karras, CFG scale: 2.5, "
        "Seed: 42, Size: 8x8, Model hash: 0123456789, Model: tiny, Version: v1.7.0",
    )
    Image.new("L", (8, 8)).save(src, pnginfo=info)
    assert main(["sample", "--from-png", str(src)]) == 2  # A1111 names no difflab run
    assert "name no difflab run (A1111 'Model: tiny'); give the run directory" in _err(capsys)

    assert main(["sample", str(run), "--from-png", str(src), "-o", str(out)]) == 0
    params = read_png_params(out)
    got = {k: params[k] for k in ("sampler", "spacing", "steps", "guidance_scale", "seed", "n")}
    assert got == {"sampler": "euler_ancestral", "spacing": "karras", "steps": 5,
                   "guidance_scale": 2.5, "seed": 42, "n": 1}  # fmt: skip
    assert params["class_labels"] == [3] and params["run"] == str(run)
    want = Pipeline.from_run(run)(1, [3], None, "euler_ancestral", 5, 2.5, 42, spacing="karras")
    assert np.array_equal(_pixels(out), np.asarray(make_grid(want)))

    assert main(["sample", str(run), "--from-png", str(src), "--steps", "4", "--class", "6",
                 "--sampler", "ddim", "-o", str(out)]) == 0  # fmt: skip
    params = read_png_params(out)  # a new sampler takes its own spacing
    assert (params["steps"], params["class_labels"], params["sampler"]) == (4, [6], "ddim")
    assert (params["spacing"], params["seed"]) == ("trailing", 42)


def test_a1111_settings_difflab_cannot_apply_are_named_in_one_warning(run, tmp_path, capsys):
    src = tmp_path / "hires.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "class 1\nSteps: 2, Sampler: DDIM, CFG scale: 1, Seed: 0, Clip skip: 2, "
        'Denoising strength: 0.5, Hires upscale: 2, Lora hashes: "a: 1f2e, b: 3d4c"',
    )
    Image.new("L", (8, 8)).save(src, pnginfo=info)
    assert main(["sample", str(run), "--from-png", str(src), "-o", str(tmp_path / "o.png")]) == 0
    err = _err(capsys)
    assert err.count("\n") == 1 and err.startswith("difflab sample: warning: --from-png: not")
    assert "Clip skip 2, Denoising strength, Hires upscale, Lora hashes" in err


def test_from_png_without_parameters_is_a_one_line_error(run, tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("L", (8, 8)).save(plain)
    assert main(["sample", str(run), "--from-png", str(plain)]) == 2
    err = _err(capsys)
    assert err.count("\n") == 1 and "plain.png holds no generation parameters" in err
    assert main(["sample", "--from-png", str(tmp_path / "none.png")]) == 2
    assert "does not exist" in _err(capsys)
    assert main(["sample"]) == 2
    assert "sample needs a run directory" in _err(capsys)
