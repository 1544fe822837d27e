"""Training edm and flow runs: the loss is the formulation's, resume is exact, and
``Pipeline.from_run`` samples the trained run with several samplers."""

from __future__ import annotations

import pytest
import torch
import yaml
from train_helpers import ToyData, one_thread, tiny_config, train_with_a_cut  # noqa: F401

from difflab import Pipeline
from difflab.formulations import EDM, Flow
from difflab.train import Trainer, load_checkpoint, train

FORMS = {
    "edm": ["diffusion.formulation=edm", "diffusion.formulation_options.sigma_data=0.6"],
    "flow": [
        "diffusion.formulation=flow",
        "diffusion.formulation_options.timestep_sampling=mode",
        "diffusion.formulation_options.shift=2.0",
    ],
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_formulation_run_trains_resumes_exactly_and_samples(tmp_path, form):
    opts = ["train.max_steps=4", "diffusion.cond_drop_prob=0.3", *FORMS[form]]
    data = ToyData(16)
    full = train(tiny_config(tmp_path / "full", *opts), dataset=data)
    split = train_with_a_cut(tiny_config(tmp_path / "split", *opts), 2, dataset=data)
    assert split.losses == full.losses[2:] and split.final_loss == full.final_loss
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k

    written = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["diffusion"]
    assert written["formulation"] == form

    pipe = Pipeline.from_run(tmp_path / "full")
    expect = EDM(sigma_data=0.6) if form == "edm" else Flow(timestep_sampling="mode", shift=2.0)
    assert pipe.formulation == expect and pipe.schedule.formulation == expect
    for sampler in ("euler", "heun", "dpmpp_2m", "flow_heun"):
        images = pipe(n=2, class_labels=[0, 1], sampler=sampler, steps=3, seed=0)
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    # the pipeline's sampling equals dl.sample with the formulation's denoiser by hand
    from difflab.samplers import sample

    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    got = pipe(
        n=1,
        class_labels=[2],
        sampler="euler",
        steps=3,
        noise=noise,
        clip_x0=False,
        guidance_scale=1.0,
    )
    den = expect.denoiser(pipe.model)
    ref = sample(den, schedule=expect.schedule, noise=noise, sampler="euler", steps=3,
                 cond={"class_labels": torch.tensor([2])})  # fmt: skip
    torch.testing.assert_close(got, ref.clamp(-1, 1))


def test_formulation_loss_is_the_formulations_own(tmp_path):
    """The trainer's first-step loss is EDM's weighted loss at its drawn levels and noise."""
    cfg = tiny_config(tmp_path, "diffusion.formulation=edm", "diffusion.cond_drop_prob=0.0")
    trainer = Trainer.from_config(cfg, dataset=ToyData(16))
    try:
        batch = trainer.stream.next()
        mb = trainer.loss.draw(batch)
        loss, per_sample = trainer.loss.loss(trainer.model, mb)
        ref = EDM().training_loss(trainer.model, mb.x0, mb.t, mb.noise, mb.cond)
        torch.testing.assert_close(loss, ref.loss)
        assert mb.t.is_floating_point() and (mb.t > 0).all()
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["diffusion.formulation=edm", "diffusion.variance=learned"], "diffusion.variance"),
        (["diffusion.formulation=flow", "diffusion.timestep_sampler=importance"],
         "timestep_sampler"),
        (["diffusion.formulation=edm", "diffusion.formulation_options.rho=7"], "rho"),
        (["diffusion.formulation_options.shift=2"], "apply to edm or flow"),
    ],
)  # fmt: skip
def test_formulation_config_errors_name_the_key(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, *extra)
