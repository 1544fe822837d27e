"""``train.val_fraction`` / ``val_every``: held-out data and a comparable validation loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.models import UNet
from difflab.schedules import NoiseSchedule
from difflab.train import Trainer, train
from difflab.train.loop import _subseed
from difflab.train.validation import split_dataset, validation_timesteps

VAL = ["train.val_fraction=0.25", "train.val_every=2", "train.val_timesteps=3"]


class IndexedData(ToyData):
    """ToyData whose items also carry their index."""

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "index": i}


def test_split_is_deterministic_disjoint_and_complete():
    data = ToyData(40)
    train_a, val_a = split_dataset(data, 0.25, seed=3)
    train_b, val_b = split_dataset(data, 0.25, seed=3)
    assert val_a.indices == val_b.indices and len(val_a) == 10
    assert sorted(train_a.indices + val_a.indices) == list(range(40))
    assert split_dataset(data, 0.25, seed=4)[1].indices != val_a.indices
    same, none = split_dataset(data, 0.0, seed=3)
    assert same is data and none is None


def test_training_stream_never_yields_a_held_out_sample(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, *VAL), dataset=IndexedData(32), progress=False)
    held = set(trainer.val_set.indices)
    assert len(held) == 8
    seen = set()
    for _ in range(12):  # 4 epochs of the 24 training samples in batches of 8
        seen |= set(trainer.stream.next()["index"].tolist())
    trainer.close()
    assert seen == set(range(32)) - held


def test_logged_validation_loss_equals_an_independent_computation(tmp_path):
    cfg = tiny_config(tmp_path, *VAL, "model.dropout=0")
    data = ToyData(32)
    result = train(cfg, dataset=data, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("event") == "validation"]
    assert [r["step"] for r in logged] == [2, 4] and result.validation == logged

    # Recompute the last record from the saved weights, by hand.
    trainer = Trainer(cfg, dataset=data, progress=False)
    held = trainer.val_set.indices
    trainer.close()
    schedule = NoiseSchedule.from_config(cfg.diffusion.schedule)
    x0 = torch.stack([data[i]["image"] for i in held])
    labels = torch.tensor([data[i]["class_label"] for i in held])
    for key, file in (("val_loss", "model.safetensors"), ("val_loss_ema", "ema.safetensors")):
        net = UNet(cfg.resolve().model_config())
        net.load_state_dict(load_file(str(tmp_path / file)))
        net.eval()
        gen = torch.Generator().manual_seed(_subseed(cfg.seed, 51))
        losses = []
        with torch.no_grad():
            for t in validation_timesteps(schedule.num_timesteps, 3):
                eps = torch.randn(x0.shape, generator=gen)
                x_t = (
                    schedule.alpha(torch.tensor(float(t))) * x0
                    + schedule.sigma(torch.tensor(float(t))) * eps
                )
                pred = net(x_t, torch.full((len(x0),), float(t)), class_labels=labels)
                losses.append(((pred - eps) ** 2).mean(dim=(1, 2, 3)))
        want = float(torch.cat(losses).double().mean())
        assert logged[-1][key] == pytest.approx(want, rel=1e-5), key
    assert logged[-1]["val_loss"] != logged[-1]["val_loss_ema"]


def test_validation_does_not_change_training(tmp_path):
    with_val = train(tiny_config(tmp_path / "a", *VAL), dataset=ToyData(32), progress=False)
    split_only = ["train.val_fraction=0.25"]
    without = train(tiny_config(tmp_path / "b", *split_only), dataset=ToyData(32), progress=False)
    assert with_val.losses == without.losses and not without.validation


def test_bad_validation_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        tiny_config(tmp_path, "train.val_fraction=1.0")
    with pytest.raises(ValueError, match="val_fraction > 0"):
        tiny_config(tmp_path, "train.val_every=5")
    with pytest.raises(ValueError, match="val_timesteps"):
        tiny_config(tmp_path, "train.val_timesteps=0")
    with pytest.raises(ValueError, match="leaves no training data"):
        split_dataset(ToyData(4), 0.9, seed=0)
