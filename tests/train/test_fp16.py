"""fp16 autocast with a GradScaler (Micikevicius et al. 2018): the trainer's loss-scaling path.

``mixed_precision: fp16`` falls back to bf16 on CPU for speed (oneDNN's fp16 convolutions
run a reference kernel there), so these tests force the real fp16 path on CPU, where
``torch.amp.GradScaler("cpu")`` runs the same code as on CUDA: overflowing steps are skipped
and halve the scale, the EMA waits for a real step, and the scale survives a resume.
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.train import Trainer, load_checkpoint, train
from difflab.train import loop as train_loop
from difflab.train.amp import Precision

INIT_SCALE = 2.0**28  # far above what fp16 activation gradients can carry


@pytest.fixture
def real_fp16(monkeypatch):
    """Make ``mixed_precision=fp16`` mean fp16 + GradScaler on CPU, starting at INIT_SCALE."""

    def scaler(self):
        return torch.amp.GradScaler(self.device_type, init_scale=INIT_SCALE, enabled=True)

    monkeypatch.setattr(Precision, "grad_scaler", scaler)
    monkeypatch.setattr(train_loop, "resolve_precision", lambda mode, device: Precision(
        mode, torch.device(device).type))  # fmt: skip


OPTS = ["train.mixed_precision=fp16", "diffusion.cond_drop_prob=0", "train.grad_clip=0"]


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_overflowing_steps_are_skipped_and_halve_the_scale(tmp_path, real_fp16):
    trainer = Trainer.from_config(
        tiny_config(tmp_path, *OPTS, "train.max_steps=40"), dataset=ToyData()
    )
    try:
        assert trainer.precision.needs_scaler and trainer.scaler.is_enabled()
        skipped = 0
        while True:
            raw, ema = _params(trainer.model), _params(trainer.ema.model)
            record = trainer.train_step()
            if not record.get("fp16_overflow"):
                break
            skipped += 1
            assert skipped < 30, "the scale never came down"
            # A skipped step leaves weights, optimiser and EMA untouched.
            assert all(torch.equal(a, b) for a, b in zip(raw, _params(trainer.model)))
            assert all(torch.equal(a, b) for a, b in zip(ema, _params(trainer.ema.model)))
            assert trainer.ema.num_updates == 0
            steps = [float(st["step"]) for st in trainer.optimizer.state.values()]
            assert steps == [0.0] * len(steps)  # fused AdamW may create its state, not step
            assert trainer.scaler.get_scale() == INIT_SCALE / 2**skipped
        assert skipped >= 1  # INIT_SCALE really overflows fp16
        # The first finite step updates everything, at the scale it ran with.
        assert trainer.scaler.get_scale() == INIT_SCALE / 2**skipped
        names = [n for n, _ in trainer.model.named_parameters()]
        changed = {
            n for n, a, b in zip(names, raw, _params(trainer.model)) if not torch.equal(a, b)
        }
        # A fresh U-Net's output conv is zero, so its first step moves only that conv.
        assert changed == {"conv_out.weight", "conv_out.bias"}
        assert trainer.ema.num_updates == 1 and torch.isfinite(torch.tensor(record["loss"]))
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    finally:
        trainer.close()


def test_fp16_resume_restores_the_scale_bit_for_bit(tmp_path, real_fp16):
    """2N steps equal N + resume + N with the scaler's state in the checkpoint."""
    opts = [*OPTS, "train.max_steps=12"]
    data = ToyData(24)
    full = train(tiny_config(tmp_path / "full", *opts), dataset=data)

    cfg = tiny_config(tmp_path / "split", *opts)
    first = Trainer.from_config(cfg, dataset=data)
    try:
        first.run(stop_at=6)
        cut_scale = first.scaler.get_scale()
    finally:
        first.close()
    assert cut_scale < INIT_SCALE  # the first half did skip steps
    rest = train(cfg, dataset=data, resume=True)

    assert rest.losses == full.losses[6:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert a.meta["scaler"] == b.meta["scaler"] and a.meta["scaler"]["scale"] < INIT_SCALE
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for k in a.ema:
        assert torch.equal(a.ema[k], b.ema[k]), k
    assert a.meta["ema_updates"] == b.meta["ema_updates"] < 12  # skipped steps: no EMA update
