"""EMA: decay warm-up, the update rule, one update per optimiser step."""

from __future__ import annotations

import pytest
import torch
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.train import EMA, Trainer, ema_decay_at


def test_decay_warmup_formula():
    assert ema_decay_at(0, 0.999) == pytest.approx(1 / 10)
    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999) == 0.999  # capped at the target decay
    assert ema_decay_at(0, 0.999, warmup=False) == 0.999


def test_update_rule_matches_closed_form():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.5, warmup=False)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)
    ema.update(net)
    # two updates towards the constant 1: e = 0.25·e0 + 0.75·1
    torch.testing.assert_close(ema.model.weight, 0.25 * start + 0.75)
    assert ema.num_updates == 2
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_one_ema_update_per_optimizer_step_under_accumulation(tmp_path):
    cfg = tiny_config(tmp_path, "train.grad_accum=3", "train.ema_decay=0.9")
    trainer = Trainer.from_config(cfg, dataset=ToyData())
    try:
        expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        for n in range(4):
            trainer.train_step()
            d = ema_decay_at(n, 0.9)
            raw = trainer.model.state_dict()
            expected = {k: d * expected[k] + (1 - d) * raw[k] for k in raw}
        assert trainer.ema.num_updates == 4
        for k, v in trainer.ema.model.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7)
        raw = dict(trainer.model.named_parameters())
        differs = [not torch.equal(p, raw[k]) for k, p in trainer.ema.model.named_parameters()]
        assert any(differs)  # raw and EMA weights are both kept, and they differ
    finally:
        trainer.close()
