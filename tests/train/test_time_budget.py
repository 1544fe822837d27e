"""train.max_time: the run stops at the budget with a checkpoint, its LR schedule follows the
share of the budget used (ending annealed), and a resume keeps the remaining budget."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.train import Trainer, load_checkpoint, lr_factor
from difflab.train.budget import TimeBudget, format_duration, parse_duration

SECONDS_PER_STEP = 2.0
BUDGET = ["train.max_time=10s", "train.max_steps=100", "train.warmup_steps=2"]


def _trainer(cfg) -> Trainer:
    """A trainer whose clock advances 2 s with every optimiser update (deterministic)."""
    updates = [0]
    trainer = Trainer.from_config(
        cfg, dataset=ToyData(), clock=lambda: updates[0] * SECONDS_PER_STEP
    )
    trainer.optimizer.register_step_post_hook(lambda *args: updates.__setitem__(0, updates[0] + 1))
    return trainer


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("1h30m", 5400.0), (45, 45.0), ("1.5m", 90.0)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["15 minutes", "m", "", "0s", -3, "1x"])
def test_parse_duration_rejects_with_the_key(bad):
    with pytest.raises(ValueError, match="train.max_time"):
        parse_duration(bad)


def test_effective_step_is_the_larger_share():
    t = [0.0]
    budget = TimeBudget(100.0, 1000, clock=lambda: t[0])
    budget.start()
    t[0] = 25.0  # a quarter of the time: a step-budgeted run would be at step 250
    assert budget.effective_step(10) == 250.0 and budget.effective_step(400) == 400.0
    assert budget.remaining == 75.0 and format_duration(3725) == "1:02:05"


def test_budget_stops_with_a_checkpoint_and_annealed_lr(tmp_path):
    cfg = tiny_config(tmp_path / "run", *BUDGET)
    trainer = _trainer(cfg)
    try:
        result = trainer.run()
        lr_after = trainer.optimizer.param_groups[0]["lr"]
    finally:
        trainer.close()
    # 2 s a step against 10 s: the budget is spent after step 5, long before max_steps.
    assert result.step == 5 and result.stop_reason == "time budget"
    assert load_checkpoint(tmp_path / "run").meta["step"] == 5
    # The LR of step k was set after step k-1, at the effective step max(k-1, (k-1)*20):
    # the time budget's share times max_steps=100; cosine after 2 warm-up steps.
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "loss" in r]
    want = [
        cfg.train.lr * lr_factor(max(k - 1, (k - 1) * 20.0), warmup_steps=2, max_steps=100,
                                 schedule="cosine")
        for k in range(1, 6)
    ]  # fmt: skip
    assert lrs == pytest.approx(want, rel=1e-6)
    assert lr_after == 0.0  # annealed: the budget is used up, cosine factor 0


def test_resume_keeps_the_remaining_budget(tmp_path):
    whole = _trainer(tiny_config(tmp_path / "whole", *BUDGET))
    try:
        whole.run()
        want = {k: v.clone() for k, v in whole.model.state_dict().items()}
    finally:
        whole.close()
    cfg = tiny_config(tmp_path / "cut", *BUDGET)
    first = _trainer(cfg)
    try:
        first.run(stop_at=3)  # killed after step 3: 6 of 10 s spent
    finally:
        first.close()
    assert load_checkpoint(tmp_path / "cut").meta["train_time"] == 6.0
    second = _trainer(cfg)
    try:
        result = second.run(resume=True)  # 4 s left: steps 4 and 5
        got = second.model.state_dict()
    finally:
        second.close()
    assert result.step == 5 and result.stop_reason == "time budget"
    for key in want:
        assert torch.equal(got[key], want[key]), key
    spent = _trainer(cfg)
    try:
        again = spent.run(resume=True)  # nothing left: no step is trained
    finally:
        spent.close()
    assert (again.step, again.losses, again.stop_reason) == (5, [], "time budget")
