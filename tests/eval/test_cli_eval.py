"""``difflab eval`` / ``difflab sweep`` handlers: thin over the library, JSON/tables written."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_tiny_run.py
from _tiny_run import make_tiny_run  # noqa: E402

from difflab.cli.eval import add_eval_parser, add_sweep_parser  # noqa: E402
from difflab.eval.sweep import SWEEP_FILES, evaluate_pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*not comparable with numbers in papers")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("cli_eval") / "run", num_classes=10)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="difflab")
    sub = parser.add_subparsers(dest="command")
    add_eval_parser(sub)
    add_sweep_parser(sub)
    return parser.parse_args(argv)


def test_eval_prints_every_metric_with_its_extractor_and_writes_json(run_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = parse(
        ["eval", str(run_dir), "--metrics", "fid,kid,accuracy", "--n", "8", "--sampler", "ddim"]
        + ["--steps", "2", "--cfg", "2", "--seed", "5", "-o", str(out)]
    )
    assert args.func(args) == 0
    results = json.loads(out.read_text())
    direct = evaluate_pipeline(
        run_dir, metrics="fid,kid,accuracy", n=8, sampler="ddim", steps=2, guidance_scale=2.0,
        seed=5,
    )  # fmt: skip
    for key in (
        "fid[digits-cnn]",
        "kid[digits-cnn]",
        "kid_std[digits-cnn]",
        "accuracy[digits-cnn]",
    ):
        assert results[key] == direct[key]
    assert (results["sampler"], results["steps"], results["guidance_scale"]) == ("ddim", 2, 2.0)
    assert results["nfe"] == 2 and results["n"] == 8 and results["run"] == str(run_dir)
    text = capsys.readouterr().out
    for name in ("fid", "kid", "accuracy"):
        assert any(
            line.split()[:1] == [name] and "digits-cnn" in line for line in text.splitlines()
        )
    assert "resize=area-8x8" in text and "< 10,000 samples" in text


def test_eval_defaults_come_from_the_run(run_dir, capsys):
    args = parse(["eval", str(run_dir), "--metrics", "accuracy", "--n", "4"])
    assert args.func(args) == 0
    written = run_dir / "eval" / "ddim-4steps-cfg2-n4-seed0.json"  # the run's sample defaults
    assert json.loads(written.read_text())["nfe"] == 4
    assert str(written) in capsys.readouterr().out
    args = parse(["eval", str(run_dir), "--metrics", "accuracy", "--n", "4", "--cfg-interval",
                  "0.5", "20", "--cfg-rescale", "0.7"])  # fmt: skip
    assert args.func(args) == 0
    name = "ddim-4steps-cfg2-guidance_interval0.5-20-guidance_rescale0.7-n4-seed0.json"
    options = json.loads((run_dir / "eval" / name).read_text())["sampler_options"]
    assert options == {"guidance_interval": [0.5, 20.0], "guidance_rescale": 0.7}


def test_sweep_writes_files_and_resumes(run_dir, tmp_path, capsys):
    argv = ["sweep", str(run_dir), "--samplers", "ddim", "--steps", "1,2", "--cfg", "1,3"]
    argv += ["--metrics", "fid,accuracy", "--n", "6", "--out", str(tmp_path)]
    args = parse(argv)
    assert args.func(args) == 0
    first = capsys.readouterr().out
    assert "4 cell(s) computed, 0 taken" in first and "| ddim | 2 | 3 | 2 |" in first
    assert {p.name for p in tmp_path.iterdir()} == set(SWEEP_FILES.values())
    args = parse(argv)
    assert args.func(args) == 0
    assert "0 cell(s) computed, 4 taken" in capsys.readouterr().out


def test_sweep_default_lists_and_bad_names(run_dir):
    args = parse(["sweep", str(run_dir)])
    assert (args.samplers, args.steps, args.cfg) == ("dpmpp_2m,ddim,heun", "5,10,20,50", "1,2,4")
    assert args.metrics is None and args.n == 2000 and args.out is None
    bad = parse(["sweep", str(run_dir), "--samplers", "eulr", "--n", "4"])
    with pytest.raises(ValueError, match="did you mean 'euler'"):
        bad.func(bad)
    bad = parse(["eval", str(run_dir), "--metrics", "fid,acuracy", "--n", "4"])
    with pytest.raises(ValueError, match="did you mean 'accuracy'"):
        bad.func(bad)
    missing = parse(["eval", str(run_dir), "--inception-weights", "/nonexistent.pth"])
    with pytest.raises(FileNotFoundError, match="never downloads"):
        missing.func(missing)


def test_inception_weights_from_the_environment(run_dir, monkeypatch):
    monkeypatch.setenv("DIFFLAB_INCEPTION_WEIGHTS", "/nonexistent-from-env.pth")
    args = parse(["eval", str(run_dir), "--metrics", "fid", "--n", "4"])
    with pytest.raises(FileNotFoundError, match="nonexistent-from-env"):
        args.func(args)


def test_likelihood_through_eval_equals_the_library_bounds(tmp_path, capsys):
    import torch
    import yaml

    from difflab.diffusion import bits_per_dim
    from difflab.eval.likelihood import ode_likelihood
    from difflab.eval.metrics import to_uint8
    from difflab.eval.sweep import reference_images
    from difflab.pipeline import Pipeline

    run_dir = make_tiny_run(tmp_path / "run", num_classes=10)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["diffusion"]["schedule"]["T"] = 50  # 50 VLB terms instead of 1000: a fast test
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "nll.json"
    argv = ["eval", str(run_dir), "--metrics", "none", "--likelihood", "vlb,ode",
            "--likelihood-n", "3", "--seed", "4", "-o", str(out)]  # fmt: skip
    args = parse(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "vlb" in printed and "ode" in printed
    got = json.loads(out.read_text())
    assert got["likelihood_n"] == 3 and "null label" in got["likelihood_condition"]

    # The same 3 real digits, scored by hand through the library with the null label.
    pipe = Pipeline.from_run(run_dir)
    real = to_uint8(reference_images({"source": "digits", "image_size": 8, "channels": 1}))
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(4))[:3]
    null = {"class_labels": torch.full((3,), 10)}
    vlb = bits_per_dim(pipe.model, real[pick].float() / 127.5 - 1, pipe.schedule, cond=null,
                       generator=torch.Generator().manual_seed(4), progress=False)  # fmt: skip
    assert got["bpd[vlb]"] == pytest.approx(float(vlb.total.mean()), rel=1e-6)
    ode = ode_likelihood(pipe.model, real[pick], pipe.schedule, cond=null,
                         generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert got["bpd[ode]"] == pytest.approx(float(ode.bpd.mean()), rel=1e-6)

    nothing = parse(["eval", str(run_dir), "--metrics", "none"])
    with pytest.raises(ValueError, match="nothing to compute"):
        nothing.func(nothing)
    bad = parse(["eval", str(run_dir), "--metrics", "none", "--likelihood", "elbo"])
    with pytest.raises(ValueError, match="did you mean 'vlb'|choices"):
        bad.func(bad)


def test_clip_score_of_each_sample_against_its_class_prompt(run_dir, tmp_path):
    pytest.importorskip("transformers")
    from test_clip import tiny_clip

    from difflab.eval.clip import CLIPScorer
    from difflab.eval.sweep import class_prompts, sample_images
    from difflab.pipeline import Pipeline

    folder = tmp_path / "clip"
    tiny_clip(folder)
    out = tmp_path / "clip.json"
    argv = ["eval", str(run_dir), "--metrics", "clip_score", "--clip-model", str(folder),
            "--clip-scale", "2.5", "--n", "6", "--sampler", "ddim", "--steps", "2",
            "--cfg", "1", "-o", str(out)]  # fmt: skip
    args = parse(argv)
    assert args.func(args) == 0
    got = json.loads(out.read_text())
    key = "clip_score[clip:clip]"
    assert got["clip_scale"] == 2.5 and got["clip_model"] == str(folder)

    prompts = class_prompts({"source": "digits", "image_size": 8, "channels": 1})
    assert prompts[7] == "a handwritten digit seven"
    images, labels, _ = sample_images(
        Pipeline.from_run(run_dir), 6, sampler="ddim", steps=2, guidance_scale=1.0, seed=0
    )
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    want = CLIPScorer(folder, scale=2.5)(images, [prompts[k] for k in labels.tolist()])
    assert got[key] == pytest.approx(want[key], rel=1e-6)

    missing = parse(["eval", str(run_dir), "--metrics", "clip_score", "--n", "2"])
    with pytest.raises(ValueError, match="clip-model"):
        missing.func(missing)
