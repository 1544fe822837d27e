"""``difflab eval`` / ``difflab sweep`` on a Stable Diffusion model: prompts from a file, real
images from a reference folder, numbers equal to the same metrics computed by hand from
``Pipeline.from_pretrained`` samples.

The model is a tiny random SD 1.x diffusers folder (32x32 RGB images). The FID features come
from a test-only extractor (channel means over a 2x2 grid of each image: Inception on CPU is
seconds per image), put in place of ``--inception-weights``'s; the CLIP score from a tiny
random CLIP saved locally (``test_clip.tiny_clip``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "interop"))  # sd_helpers
sys.path.insert(0, str(TESTS))  # _tiny_run
from _tiny_run import make_tiny_run  # noqa: E402
from sd_helpers import tiny_sd1_pipeline  # noqa: E402
from test_clip import tiny_clip  # noqa: E402

from difflab.cli import eval as cli_eval  # noqa: E402
from difflab.cli import main  # noqa: E402
from difflab.eval.clip import CLIPScorer  # noqa: E402
from difflab.eval.features import FeatureExtractor  # noqa: E402
from difflab.eval.metrics import frechet_distance, to_uint8  # noqa: E402
from difflab.eval.sources import read_prompts  # noqa: E402
from difflab.eval.sweep import SWEEP_FILES, evaluate_pipeline  # noqa: E402
from difflab.pipeline import Pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*not comparable with numbers in papers")

PROMPTS = ["a red house", "a photo of a cat", "the blue sky"]
REF_SIZES = [(32, 32), (32, 32), (32, 32), (32, 32), (40, 48)]  # (width, height)


class GridMeans(FeatureExtractor):
    """Test-only features ``[N, 12]``: each channel's mean over a 2x2 grid, in [0, 1]."""

    id = "grid-means"
    feature_dim = 12

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        x = images.float().div(255).reshape(n, c, 2, h // 2, 2, w // 2)
        return x.mean(dim=(3, 5)).flatten(1)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The SD folder, a prompts file, a reference folder of PNGs and a CLIP folder."""
    root = tmp_path_factory.mktemp("sd_eval")
    tiny_sd1_pipeline(seed=0).save_pretrained(root / "sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    ref = root / "real"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(REF_SIZES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(ref / f"{i}.png")
    tiny_clip(root / "clip")
    return {"sd": root / "sd", "prompts": root / "prompts.txt", "real": ref,
            "clip": root / "clip", "root": root}  # fmt: skip


@pytest.fixture
def grid_means(monkeypatch):
    """The test extractor in place of the one ``--inception-weights`` would load."""
    monkeypatch.setattr(cli_eval, "_extractor", lambda args: GridMeans())


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="difflab")
    sub = parser.add_subparsers(dest="command")
    cli_eval.add_eval_parser(sub)
    cli_eval.add_sweep_parser(sub)
    return parser.parse_args(argv)


def reference_by_hand(folder: Path) -> torch.Tensor:
    """The reference PNGs at 32x32 with PIL alone: shorter side to 32 (bicubic), centre crop."""
    out = []
    for path in sorted(folder.glob("*.png")):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        if (w, h) != (32, 32):
            img = img.resize((32, round(h * 32 / w)), Image.Resampling.BICUBIC)  # w < h here
            top = round((img.size[1] - 32) / 2)
            img = img.crop((0, top, 32, top + 32))
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(out)  # (N, 3, 32, 32) uint8


def fid_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    fa, fb = GridMeans()(a).double().numpy(), GridMeans()(b).double().numpy()
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0),
                            np.cov(fb, rowvar=False))  # fmt: skip


def samples_by_hand(folder: Path, n: int, **kwargs) -> torch.Tensor:
    """``n`` samples of the SD folder, sample i drawn from PROMPTS[i % 3], as uint8."""
    pipe = Pipeline.from_pretrained(folder)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return to_uint8(pipe(n, prompt=prompts, progress=False, **kwargs))


def test_eval_fid_and_clip_score_equal_the_metrics_of_the_samples(files, grid_means, tmp_path):
    out = tmp_path / "sd.json"
    argv = ["eval", str(files["sd"]), "--prompts", str(files["prompts"]), "--reference",
            str(files["real"]), "--metrics", "fid,clip_score", "--clip-model", str(files["clip"]),
            "--n", "4", "--sampler", "ddim", "--steps", "2", "--cfg", "3", "--seed", "2",
            "--negative-prompt", "blurry", "-o", str(out)]  # fmt: skip
    args = parse(argv)
    assert args.func(args) == 0
    got = json.loads(out.read_text())

    images = samples_by_hand(files["sd"], 4, sampler="ddim", steps=2, guidance_scale=3.0,
                             seed=2, negative_prompt="blurry")  # fmt: skip
    real = reference_by_hand(files["real"])
    assert got["n"] == 4 and got["n_ref"] == len(REF_SIZES)
    assert got["fid[grid-means]"] == pytest.approx(fid_by_hand(images, real), rel=1e-9)
    want = CLIPScorer(files["clip"])(images, [PROMPTS[i % 3] for i in range(4)])
    key = "clip_score[clip:clip]"
    assert got[key] == pytest.approx(want[key], rel=1e-6)
    assert got["prompts"]["count"] == 3 and got["prompts_file"] == str(files["prompts"])
    assert got["reference"] == str(files["real"])
    assert got["sampler_options"] == {"negative_prompt": "blurry"}
    assert (got["sampler"], got["steps"], got["guidance_scale"]) == ("ddim", 2, 3.0)


def test_clip_score_alone_needs_no_reference_and_default_output_folder(files):
    """clip_score only: no --reference and no FID features; the JSON goes to SD/eval/."""
    argv = ["eval", str(files["sd"]), "--prompts", str(files["prompts"]), "--metrics",
            "clip_score", "--clip-model", str(files["clip"]), "--n", "3", "--sampler", "euler",
            "--steps", "2", "--cfg", "1"]  # fmt: skip
    args = parse(argv)
    assert args.func(args) == 0
    written = files["sd"] / "eval" / "euler-2steps-cfg1-prompts_prompts-n3-seed0.json"
    got = json.loads(written.read_text())
    images = samples_by_hand(files["sd"], 3, sampler="euler", steps=2, guidance_scale=1.0)
    want = CLIPScorer(files["clip"])(images, PROMPTS)["clip_score[clip:clip]"]
    assert got["clip_score[clip:clip]"] == pytest.approx(want, rel=1e-6)
    assert "extractor" not in got


def test_sd_errors_are_one_line_and_say_what_to_pass(files, capsys):
    sd, prompts, real = str(files["sd"]), str(files["prompts"]), str(files["real"])
    cases = [
        (["eval", sd, "--n", "2"], "pass --prompts FILE"),
        (["sweep", sd, "--n", "2"], "pass --prompts FILE"),
        (["eval", sd, "--prompts", prompts, "--metrics", "fid", "--n", "2"],
         "pass --reference DIR"),
        (["eval", sd, "--prompts", prompts, "--n", "2"], "clip_score only"),
        (["eval", sd, "--prompts", prompts, "--reference", real, "--metrics", "kid", "--n", "2"],
         "--inception-weights"),  # the digits classifier reads no RGB
        (["eval", sd, "--prompts", prompts, "--metrics", "accuracy", "--n", "2"],
         "needs classes"),
        (["eval", sd, "--prompts", str(files["root"] / "none.txt"), "--n", "2"], "none.txt"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err  # also transformers' "Loading weights" bars
        lines = [line for line in err.splitlines() if line.startswith("difflab ")]
        assert len(lines) == 1 and message in lines[0], (argv, err)
        assert lines[0].startswith(f"difflab {argv[0]}: error: ")


def test_sweep_two_cells_writes_tables_equal_to_single_evaluations(files, grid_means, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", str(files["sd"]), "--prompts", str(files["prompts"]), "--reference",
            str(files["real"]), "--samplers", "ddim", "--steps", "1,2", "--cfg", "4",
            "--metrics", "fid", "--n", "3", "--out", str(out)]  # fmt: skip
    args = parse(argv)
    assert args.func(args) == 0
    assert {p.name for p in out.iterdir()} == set(SWEEP_FILES.values()) - {"sweep_tradeoff.png"}
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["sampler"], r["steps"], r["guidance_scale"]) for r in rows] == [
        ("ddim", "1", "4.0"), ("ddim", "2", "4.0")
    ]  # fmt: skip
    real = reference_by_hand(files["real"])
    for row, steps in zip(rows, (1, 2)):
        images = samples_by_hand(files["sd"], 3, sampler="ddim", steps=steps, guidance_scale=4.0)
        assert float(row["fid[grid-means]"]) == pytest.approx(fid_by_hand(images, real), rel=1e-9)
        assert int(row["nfe"]) == steps
    table = (out / "sweep.md").read_text()
    assert "| ddim | 2 | 4 | 2 |" in table and "prompts cycling over 3 given prompts" in table

    assert args.func(parse([*argv, "--no-plots"])) == 0  # resumed: nothing recomputed
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 2
    other = files["root"] / "other.txt"
    other.write_text("a dog\n")
    again = parse([*argv, "--prompts", str(other), "--steps", "1", "--no-plots"])
    assert again.func(again) == 0  # other prompts: another cell
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 3


def test_reference_folder_replaces_a_runs_data(tmp_path):
    """--reference on a difflab run: FID against the folder's images (grey, as the run's)."""
    run = make_tiny_run(tmp_path / "run", num_classes=10)
    ref = tmp_path / "real"
    ref.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(ref / f"{i}.png")
    kwargs = dict(metrics="fid", n=6, sampler="ddim", steps=2, guidance_scale=1.0,
                  extractor=GridMeans())  # fmt: skip
    got = evaluate_pipeline(run, reference=ref, **kwargs)
    grey = torch.stack([torch.from_numpy(np.asarray(Image.open(ref / f"{i}.png")).copy())
                        for i in range(6)])[:, None]  # fmt: skip
    want = evaluate_pipeline(run, reference=grey, **kwargs)
    assert got["fid[grid-means]"] == pytest.approx(want["fid[grid-means]"], rel=1e-9)
    assert got["reference"] == str(ref) and got["n_ref"] == 6
    own = evaluate_pipeline(run, **kwargs)
    assert own["fid[grid-means]"] != got["fid[grid-means]"] and own["n_ref"] != 6


def test_read_prompts_from_a_file_or_a_captioned_folder(tmp_path):
    (tmp_path / "p.txt").write_text("  a cat \n\nthe dog\na cat\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "the dog", "a cat"]
    folder = tmp_path / "captioned"
    folder.mkdir()
    for name, caption in (("b", "a red house"), ("a", "the blue sky")):
        Image.new("RGB", (4, 4)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption + "\n")
    assert read_prompts(folder) == ["the blue sky", "a red house"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt holds no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_model_flags_reach_the_loader_and_output_folders(files, tmp_path):
    """--prediction / --tokenizer are sample's (`_add_model_args`); results of a single file
    go beside it."""
    args = parse(["eval", str(files["sd"]), "--prompts", str(files["prompts"]), "--prediction",
                  "v", "--tokenizer", str(files["sd"])])  # fmt: skip
    pipe, prompts = cli_eval._model(args)
    assert pipe.prediction == "v" and prompts == PROMPTS and pipe.prompts == PROMPTS
    assert Pipeline.from_pretrained(files["sd"]).prediction == "eps"
    single = tmp_path / "model.safetensors"
    single.touch()
    assert cli_eval._results_dir(str(single), "eval") == tmp_path / "model-eval"
    assert cli_eval._results_dir(str(files["sd"]), "sweep") == files["sd"] / "sweep"
