"""difflab.eval.sweep: every cell once, exact resume, tables/plots, values equal the metrics API."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_tiny_run.py
from _tiny_run import make_tiny_run  # noqa: E402

from difflab.eval.features import DigitsClassifier  # noqa: E402
from difflab.eval.metrics import (  # noqa: E402
    conditional_accuracy,
    evaluate,
    frechet_distance,
    to_uint8,
)
from difflab.eval.sweep import (  # noqa: E402
    SWEEP_FILES,
    evaluate_pipeline,
    periodic_eval,
    reference_cache_path,
    reference_images,
    run_sweep,
    sample_images,
)
from difflab.pipeline import Pipeline  # noqa: E402
from difflab.samplers import SAMPLERS  # noqa: E402

FAST = {"kid_subsets": 5}
DATA = {"source": "digits", "image_size": 8, "channels": 1}


pytestmark = pytest.mark.filterwarnings("ignore:.*not comparable with numbers in papers")


@pytest.fixture(scope="module")
def digits(_cache):
    return DigitsClassifier()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The tiny run, read as an x0-predictor: its random network then gives samples that are
    not saturated at ±1 and that change with sampler, steps and guidance."""
    run = make_tiny_run(tmp_path_factory.mktemp("sweep") / "run", num_classes=10)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["diffusion"]["prediction"] = "x0"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


class CountingPipe:
    """Delegates to a Pipeline and records every sampling call's settings."""

    def __init__(self, pipe: Pipeline):
        self.pipe, self.calls, self.options = pipe, [], []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, n, class_labels, prompt, sampler, steps, guidance_scale, seed, progress,
                 **options):  # fmt: skip
        self.calls.append((sampler, steps, guidance_scale))
        self.options.append(options)
        return self.pipe(n, class_labels, prompt, sampler, steps, guidance_scale, seed, progress,
                         **options)  # fmt: skip


def _sweep(pipe, out, digits, **kw):
    args = dict(
        samplers=["ddim", "heun"],
        steps=[1, 2],
        cfg_scales=[1.0, 2.0],
        metrics="fid,kid,accuracy",
        n=10,
        out_dir=out,
        seed=3,
        classifier=digits,
        metric_options=FAST,
    )
    return run_sweep(pipe, **{**args, **kw})


def test_every_cell_once_then_resume_recomputes_only_the_missing_cell(run_dir, digits, tmp_path):
    pipe = CountingPipe(Pipeline.from_run(run_dir))
    first = _sweep(pipe, tmp_path, digits)
    cells = [(s, k, w) for s in ("ddim", "heun") for k in (1, 2) for w in (1.0, 2.0)]
    assert sorted(pipe.calls) == sorted(cells)  # each combination sampled exactly once
    assert len(first.rows) == len(first.computed) == 8
    assert [(r["sampler"], r["steps"], r["guidance_scale"]) for r in first.rows] == cells
    assert len({r["fid[digits-cnn]"] for r in first.rows}) >= 6  # the cells differ

    pipe.calls.clear()
    again = _sweep(pipe, tmp_path, digits)
    assert pipe.calls == [] and again.computed == [] and again.rows == first.rows

    log = tmp_path / "sweep.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]))  # as if interrupted before the last cell finished
    resumed = _sweep(pipe, tmp_path, digits)
    assert pipe.calls == [cells[-1]] and len(resumed.computed) == 1
    old, new = first.rows[-1], resumed.rows[-1]
    for key in ("fid[digits-cnn]", "kid[digits-cnn]", "accuracy[digits-cnn]", "nfe"):
        assert new[key] == old[key]  # same seeds, same samples, same numbers
    assert len(log.read_text().splitlines()) == 8


def test_torn_last_line_is_dropped_and_key_includes_n(run_dir, digits, tmp_path):
    pipe = CountingPipe(Pipeline.from_run(run_dir))
    kw = dict(samplers="ddim", steps="1,2", cfg_scales="2", metrics="accuracy")
    _sweep(pipe, tmp_path, digits, **kw)
    log = tmp_path / "sweep.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # crash mid-write
    pipe.calls.clear()
    _sweep(pipe, tmp_path, digits, **kw)
    assert pipe.calls == [("ddim", 2, 2.0)]
    assert all(json.loads(x) for x in log.read_text().splitlines())
    pipe.calls.clear()
    res = _sweep(pipe, tmp_path, digits, **{**kw, "n": 12})  # another n: another cell
    assert len(pipe.calls) == 2 and all(r["n"] == 12 for r in res.rows)


def test_values_equal_direct_metric_calls(run_dir, digits, tmp_path):
    pipe = Pipeline.from_run(run_dir)
    res = _sweep(pipe, tmp_path, digits, samplers="ddim", steps=2, cfg_scales=[2.0])
    row = res.rows[0]
    n = 10
    labels = torch.arange(n) % 10
    images = pipe(n, labels, None, "ddim", 2, 2.0, 3)
    real = reference_images(DATA)
    direct = evaluate(
        images,
        real,
        extractor=digits,
        metrics=["fid", "kid", "accuracy"],
        labels=labels,
        classifier=digits,
        **FAST,
    )
    for key in ("fid[digits-cnn]", "kid[digits-cnn]", "kid_std[digits-cnn]"):
        assert row[key] == pytest.approx(direct[key], rel=1e-12)
    # FID and accuracy again from the lowest-level calls
    fake_f = digits(to_uint8(images)).double().numpy()
    real_f = digits(to_uint8(real)).double().numpy()
    fid = frechet_distance(
        fake_f.mean(0), np.cov(fake_f, rowvar=False), real_f.mean(0), np.cov(real_f, rowvar=False)
    )
    assert row["fid[digits-cnn]"] == pytest.approx(fid, rel=1e-6)
    assert row["accuracy[digits-cnn]"] == conditional_accuracy(digits, images, labels)
    assert row["n"] == n and row["n_ref"] == 1797 and row["extractor"] == "digits-cnn"


def test_reference_features_cached_by_extractor_and_content(run_dir, digits, tmp_path):
    pipe = Pipeline.from_run(run_dir)
    kw = dict(metrics="fid", n=8, sampler="ddim", steps=1, guidance_scale=1.0, classifier=digits)
    path = tmp_path / "ref.npz"
    first = evaluate_pipeline(pipe, reference_cache=path, **kw)
    with np.load(path) as data:
        assert str(data["extractor"]) == "digits-cnn" and data["features"].shape == (1797, 64)
    bare = Pipeline(
        pipe.model, pipe.schedule, prediction="x0", image_shape=(1, 8, 8), num_classes=10
    )
    assert bare.run_dir is None  # only the cache file says what the real data is
    assert evaluate_pipeline(bare, reference_cache=path, **kw)["fid[digits-cnn]"] == pytest.approx(
        first["fid[digits-cnn]"], rel=1e-12
    )
    default = reference_cache_path(digits, reference_images(DATA))
    assert default.parent.name == "reference" and default.name.startswith("digits-cnn-")
    assert default != reference_cache_path(digits, reference_images(DATA)[:-1])  # content key


def test_nfe_matches_the_sampler_spec_and_batches_equal_one_call(run_dir):
    pipe = Pipeline.from_run(run_dir)
    for name, steps in (("ddim", 3), ("heun", 3)):
        images, labels, nfe = sample_images(
            pipe, 5, sampler=name, steps=steps, guidance_scale=2.0, seed=1, batch_size=2
        )
        assert nfe == SAMPLERS[name].nfe(steps)  # heun: 2k-1, ddim: k
        assert labels.tolist() == [0, 1, 2, 3, 4]
        whole = to_uint8(pipe(5, labels, None, name, steps, 2.0, 1))
        assert (images.int() - whole.int()).abs().max() <= 1  # batch size only moves rounding


def test_sampler_options_reach_every_call_and_are_part_of_each_cells_key(run_dir, digits, tmp_path):
    interval = {"guidance_interval": (0.5, 50.0), "eta": 0.5}
    images, _, _ = sample_images(Pipeline.from_run(run_dir), 4, sampler="ddim", steps=3,
                                 guidance_scale=2.0, seed=1, sampler_options=interval)  # fmt: skip
    pipe = Pipeline.from_run(run_dir)
    labels = torch.arange(4)
    assert torch.equal(images, to_uint8(pipe(4, labels, None, "ddim", 3, 2.0, 1, **interval)))
    assert not torch.equal(images, to_uint8(pipe(4, labels, None, "ddim", 3, 2.0, 1)))

    counting = CountingPipe(pipe)
    kw = dict(samplers="ddim", steps="2", cfg_scales="2", metrics="accuracy")
    limited = _sweep(counting, tmp_path, digits, sampler_options=interval, **kw)
    as_json = {"eta": 0.5, "guidance_interval": [0.5, 50.0]}  # as recorded in sweep.jsonl
    assert counting.options and all(o == as_json for o in counting.options)
    assert limited.rows[0]["sampler_options"] == as_json
    summary = (tmp_path / "sweep.md").read_text()
    assert 'sampling options {"eta": 0.5, "guidance_interval": [0.5, 50.0]}' in summary
    counting.calls.clear()
    assert _sweep(counting, tmp_path, digits, sampler_options=interval, **kw).computed == []
    plain = _sweep(counting, tmp_path, digits, **kw)  # no options: another cell
    assert len(plain.computed) == 1 and plain.rows[0]["sampler_options"] is None
    result = evaluate_pipeline(pipe, metrics="accuracy", n=10, sampler="ddim", steps=2,
                               guidance_scale=2.0, seed=3, classifier=digits,
                               sampler_options=interval)  # fmt: skip
    assert result["accuracy[digits-cnn]"] == limited.rows[0]["accuracy[digits-cnn]"]


def test_tables_and_plots_written(run_dir, digits, tmp_path):
    res = _sweep(Pipeline.from_run(run_dir), tmp_path, digits, metrics="fid,accuracy")
    assert set(res.files) == set(SWEEP_FILES)
    assert {p.name for p in res.files.values()} == set(SWEEP_FILES.values())
    with open(res.files["csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 8 and {"fid[digits-cnn]", "accuracy[digits-cnn]", "nfe"} <= set(table[0])
    assert float(table[0]["fid[digits-cnn]"]) == pytest.approx(res.rows[0]["fid[digits-cnn]"])
    md = res.files["markdown"].read_text()
    assert md.startswith("| sampler | steps | CFG | NFE | fid[digits-cnn] | accuracy[digits-cnn]")
    assert md.count("\n| ddim |") == 4 and md.count("\n| heun |") == 4
    for kind in ("nfe_plot", "guidance_plot", "tradeoff_plot"):
        path = res.files[kind]
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
    no_acc = _sweep(Pipeline.from_run(run_dir), tmp_path / "b", digits, metrics="fid", steps=1)
    assert "tradeoff_plot" not in no_acc.files  # needs FID and accuracy


def test_periodic_eval_is_pure_and_uses_pipeline_defaults(run_dir, digits):
    loaded = Pipeline.from_run(run_dir)
    pipe = Pipeline(  # built in memory, as a training loop would, around the same network
        loaded.model,
        loaded.schedule,
        prediction=loaded.prediction,
        image_shape=loaded.image_shape,
        num_classes=10,
        sample_defaults={"sampler": "ddim", "steps": 3, "guidance_scale": 2.0},
    )
    state = torch.random.get_rng_state()
    out = periodic_eval(pipe, ["fid", "accuracy"], 10, 0, classifier=digits, reference=DATA)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (out["sampler"], out["steps"], out["guidance_scale"], out["nfe"]) == ("ddim", 3, 2.0, 3)
    same = evaluate_pipeline(
        run_dir, metrics="fid,accuracy", n=10, sampler="ddim", steps=3, guidance_scale=2.0,
        seed=0, classifier=digits,
    )  # fmt: skip
    for key in ("fid[digits-cnn]", "accuracy[digits-cnn]"):
        assert out[key] == same[key]
    json.dumps(out)  # loggable as a metrics.jsonl line
    with pytest.raises(ValueError, match="reference="):
        periodic_eval(pipe, ["fid"], 10, 0, classifier=digits)  # no run dir to read data from


def test_the_default_digits_scorer_refuses_colour_runs_and_says_what_to_pass():
    class ColourPipe:  # what evaluate_pipeline reads of a 3-channel, 2-class run
        num_classes, pixel_shape = 2, (3, 16, 16)

    with pytest.raises(ValueError, match="run makes 3x16x16 images; pass --inception-weights"):
        evaluate_pipeline(ColourPipe(), metrics="fid,kid", n=4)
    with pytest.raises(ValueError, match="'accuracy' scores with the digits classifier by"):
        evaluate_pipeline(ColourPipe(), metrics="accuracy", n=4)


def test_bad_input_raises_clear_errors(run_dir, tmp_path, digits):
    pipe = Pipeline.from_run(run_dir)
    with pytest.raises(ValueError, match="did you mean 'dpmpp_2m'"):
        _sweep(pipe, tmp_path, digits, samplers="dpm++2m")
    with pytest.raises(ValueError, match="unknown metric 'fdi'; did you mean 'fid'"):
        _sweep(pipe, tmp_path, digits, metrics="fdi")
    with pytest.raises(ValueError, match="steps"):
        _sweep(pipe, tmp_path, digits, steps="0")
    uncond = Pipeline.from_run(make_tiny_run(tmp_path / "u", num_classes=None))
    with pytest.raises(ValueError, match="unconditional"):
        _sweep(uncond, tmp_path, digits, cfg_scales=[1, 2])
    with pytest.raises(ValueError, match="class-conditional"):
        _sweep(uncond, tmp_path, digits, cfg_scales=[1])
    assert not (tmp_path / "sweep.jsonl").exists()  # nothing computed before the checks


def test_sample_count_warning_is_given_once_per_sweep(run_dir, digits, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_sweep(run_dir, samplers="ddim", steps=[1, 2], cfg_scales=[1.0, 2.0],
                        metrics=["fid"], n=8, out_dir=tmp_path, plots=False)  # fmt: skip
    few = [w for w in caught if "not comparable with numbers in papers" in str(w.message)]
    assert len(res.computed) == 4 and len(few) == 1  # FID for the first cell only


def test_ode_bits_per_dim_of_a_flow_run_is_its_own_ode(tmp_path):
    """A fresh flow network outputs v ≡ 0 (zero-initialised output): its ODE is the
    identity and p(x) is the N(0, I) prior itself (a ddpm reading would not be)."""
    from safetensors.torch import save_file

    from difflab.eval.likelihood import BIN_WIDTH, dequantize
    from difflab.eval.sweep import evaluate_likelihood
    from difflab.models import UNet

    run = make_tiny_run(tmp_path / "flow", num_classes=None)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["diffusion"]["formulation"] = "flow"
    config["diffusion"]["formulation_options"] = {"shift": 2.0}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    fresh = UNet(Pipeline.from_run(run).model.config)
    fresh.initialize_weights(torch.Generator().manual_seed(0))
    save_file(fresh.state_dict(), str(run / "ema.safetensors"))
    real = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator())
    got = evaluate_likelihood(run, "ode", n=2, seed=3, reference=real)
    assert got["likelihood_n"] == 2 and got["likelihood_ode_nfe"] > 2

    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(3))[:2]
    x = dequantize(real[pick], torch.Generator().manual_seed(3)).flatten(1)
    d = x.shape[1]
    log_px = -0.5 * d * np.log(2 * np.pi) - 0.5 * (x**2).sum(1)  # N(x; 0, I)
    bpd = (-log_px - d * np.log(BIN_WIDTH)) / (d * np.log(2))
    assert got["bpd[ode]"] == pytest.approx(float(bpd.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="'vlb' needs a ddpm run.*'flow'"):
        evaluate_likelihood(run, "vlb,ode", n=2, reference=real)
