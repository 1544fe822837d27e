"""Non-finite losses: reported with step and module; skip mode skips exactly that step.
Also: bf16 autocast on CPU trains with finite losses; fp16 on CPU falls back to bf16."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.train import NonFiniteError, Trainer, epoch_order, train
from difflab.train.amp import resolve_precision


class Square(nn.Module):
    def forward(self, x):
        return x * x


class StandIn(nn.Module):
    """A tiny unconditional stand-in model: conv -> square -> conv (overflows on huge inputs)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            OrderedDict(conv_in=nn.Conv2d(1, 4, 3, padding=1), square=Square(),
                        conv_out=nn.Conv2d(4, 1, 3, padding=1))
        )  # fmt: skip

    def forward(self, x, t, class_labels=None):
        return self.body(x)


def _poisoned(n=16, bad=5):
    data = ToyData(n)
    data.images[bad] = 1e30  # finite, but its square overflows float32 inside the model
    return data


def _bad_step(seed, n=16, bad=5, batch=8):
    """The 1-based optimiser step whose batch holds sample ``bad`` (first epoch)."""
    pos = epoch_order(seed, 0, n).tolist().index(bad)
    return pos // batch + 1


OPTS = ["diffusion.schedule.name=linear", "diffusion.cond_drop_prob=0", "train.max_steps=2"]


def test_stop_reports_step_and_first_bad_module(tmp_path):
    cfg = tiny_config(tmp_path, *OPTS)
    k = _bad_step(cfg.seed)
    with pytest.raises(NonFiniteError) as info:
        train(cfg, dataset=_poisoned(), model=StandIn())
    assert info.value.step == k
    assert info.value.module == "body.square"
    assert f"step {k}" in str(info.value) and "body.square" in str(info.value)


def test_skip_mode_skips_exactly_that_step(tmp_path):
    cfg = tiny_config(tmp_path, *OPTS, "train.on_nonfinite=skip")
    k = _bad_step(cfg.seed)
    trainer = Trainer.from_config(cfg, dataset=_poisoned(), model=StandIn())
    try:
        for step in (1, 2):
            before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            rec = trainer.train_step()
            after = dict(trainer.model.named_parameters())
            unchanged = all(torch.equal(before[n], after[n]) for n in before)
            assert unchanged == (step == k)
            assert rec.get("skipped", False) == (step == k)
        assert trainer.step == 2 and trainer.ema.num_updates == 1
        opt_steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
        assert opt_steps == {1.0}
    finally:
        trainer.close()
    with pytest.warns(UserWarning, match=rf"skip skipped 1 of 2 steps .*\(step {k};"):
        result = train(tiny_config(tmp_path / "run", *OPTS, "train.on_nonfinite=skip"),
                       dataset=_poisoned(), model=StandIn())  # fmt: skip
    assert result.skipped_steps == [k] and result.ema_updates == 1
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in lines if x.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["step"] == k and skipped[0]["module"] == "body.square"


def test_bf16_autocast_on_cpu_trains_with_finite_loss(tmp_path):
    result = train(tiny_config(tmp_path, "train.mixed_precision=bf16", "train.max_steps=3"),
                   dataset=ToyData())  # fmt: skip
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_fp16_on_cpu_falls_back_to_bf16_with_a_warning():
    with pytest.warns(UserWarning, match="needs CUDA.*using bf16"):
        prec = resolve_precision("fp16", torch.device("cpu"))
    assert prec.dtype == torch.bfloat16 and not prec.needs_scaler
