"""Validation loss of edm and flow runs: their own loss at fixed quantile levels."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.formulations import EDM, Flow, Formulation
from difflab.models import UNet
from difflab.train import DiffusionConfig, Trainer, train
from difflab.train.loop import _subseed
from difflab.train.validation import validation_loss

S = 0.8  # data x0 ~ N(0, S²·I)
FORMS = [
    EDM(sigma_data=0.5),
    Flow(timestep_sampling="uniform"),
    Flow(timestep_sampling="logit_normal", logit_mean=0.3, shift=2.0),
    Flow(timestep_sampling="mode", mode_scale=1.29),
]
IDS = ["edm", "flow-uniform", "flow-logit_normal-shift", "flow-mode"]


class ExactEDMNet(nn.Module):
    """F_θ whose preconditioned D is the exact denoiser of N(0, S²): S²/(S² + σ²)·x."""

    def __init__(self, edm: EDM) -> None:
        super().__init__()
        self.edm = edm

    def forward(self, x_in, c_noise):
        sigma = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = self.edm.precondition(sigma)
        x = x_in / c_in
        return (S**2 / (S**2 + sigma**2) * x - c_skip * x) / c_out


class ExactVelocity(nn.Module):
    """The exact velocity of N(0, S²): (t - (1-t)S²)/((1-t)²S² + t²)·x."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x, time):
        t = (time / self.flow.time_scale).reshape(-1, 1, 1, 1)
        return (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * x


def expected_loss(form: Formulation, level: torch.Tensor) -> torch.Tensor:
    """The exact denoiser's expected loss per dimension: its Bayes error times the weight.

    E‖D*(x; σ) - x0‖²/D = S²σ²/(S² + σ²); EDM weighs it by λ(σ); flow's v-error is the x0-error
    over t² with σ = t/(1-t), i.e. S²/((1-t)²S² + t²).
    """
    if isinstance(form, EDM):
        return form.loss_weight(level) * S**2 * level**2 / (S**2 + level**2)
    return S**2 / ((1 - level) ** 2 * S**2 + level**2)


@pytest.mark.parametrize("form", FORMS, ids=IDS)
def test_levels_are_the_quantiles_of_the_training_distribution(form):
    drawn = form.draw_levels(100_000, torch.Generator().manual_seed(0)).double()
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    empirical = torch.quantile(drawn, q)
    torch.testing.assert_close(form.quantile(q), empirical, rtol=0.02, atol=2e-3)
    levels = form.validation_levels(4)  # mid-quantiles 1/8, 3/8, 5/8, 7/8
    torch.testing.assert_close(levels, form.quantile((torch.arange(4) + 0.5) / 4).float())
    assert (levels.diff() > 0).all()


@pytest.mark.parametrize("form", FORMS, ids=IDS)
def test_exact_denoiser_validation_loss_is_the_closed_form(form):
    x0 = S * torch.randn(512, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    data = [{"image": x} for x in x0]
    model = ExactEDMNet(form) if isinstance(form, EDM) else ExactVelocity(form)
    kw = dict(timesteps=6, seed=3, batch_size=128, formulation=form)
    got = validation_loss(model, data, form.schedule, DiffusionConfig(), **kw)
    want = float(expected_loss(form, form.validation_levels(6).double()).mean())
    assert got == pytest.approx(want, rel=0.01)  # Monte Carlo over 6 × 131072 dimensions
    # the noise is seeded: the same value at every call, another with another seed
    assert validation_loss(model, data, form.schedule, DiffusionConfig(), **kw) == got
    assert validation_loss(model, data, form.schedule, None, **{**kw, "seed": 4}) != got
    # the formulation's sampling table names the formulation by itself
    kw.pop("formulation")
    assert validation_loss(model, data, form.schedule, None, **kw) == got


RUNS = {
    "edm": ["diffusion.formulation=edm", "diffusion.formulation_options.sigma_data=0.6"],
    "flow": ["diffusion.formulation=flow", "diffusion.formulation_options.shift=2.0"],
}
VAL = ["train.val_fraction=0.25", "train.val_every=2", "train.val_timesteps=3",
       "train.max_steps=4", "model.dropout=0"]  # fmt: skip


@pytest.mark.parametrize("name", sorted(RUNS))
def test_formulation_run_logs_its_validation_loss(tmp_path, name):
    cfg = tiny_config(tmp_path, *VAL, *RUNS[name], "train.patience=5")
    data = ToyData(32)
    result = train(cfg, dataset=data, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("event") == "validation"]
    assert [r["step"] for r in logged] == [2, 4] and result.validation == logged
    assert (tmp_path / "best.safetensors").exists()  # early stopping watched val_loss_ema

    # the last record, recomputed from the saved weights with the formulation named
    trainer = Trainer.from_config(cfg, dataset=data, progress=False)
    val_set, form = trainer.val_set, trainer.loss.formulation
    trainer.close()
    net = UNet(cfg.resolve().model_config())
    net.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    want = validation_loss(
        net, val_set, form.schedule, cfg.diffusion, timesteps=3, formulation=form,
        seed=_subseed(cfg.seed, 51), batch_size=cfg.train.batch_size, null_label=4,
    )  # fmt: skip
    assert logged[-1]["val_loss"] == pytest.approx(want, rel=1e-6)
