"""``train.val_fraction`` / ``val_every``: held-out data and a comparable validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ToyData, eps_mse_by_hand, one_thread, tiny_config  # noqa: F401

from difflab.data import ArrayDataset
from difflab.models import UNet
from difflab.schedules import NoiseSchedule
from difflab.train import DiffusionConfig, Trainer, train
from difflab.train.loop import _subseed
from difflab.train.validation import split_dataset, validation_loss, validation_timesteps

VAL = ["train.val_fraction=0.25", "train.val_every=3", "train.val_timesteps=3"]


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
    trainer = Trainer.from_config(
        tiny_config(tmp_path, *VAL), dataset=IndexedData(32), progress=False
    )
    held = set(trainer.val_set.indices)
    assert len(held) == 8
    seen = set()
    for _ in range(12):  # 4 epochs of the 24 training samples in batches of 8
        seen |= set(trainer.stream.next()["index"].tolist())
    trainer.close()
    assert seen == set(range(32)) - held


def test_validation_timesteps_are_evenly_spaced():
    assert validation_timesteps(1000, 10) == [111 * i for i in range(10)]
    assert validation_timesteps(100, 3) == [0, 50, 99]
    assert validation_timesteps(100, 1) == [50]
    assert validation_timesteps(5, 8) == [0, 1, 2, 3, 4]  # more than T: every timestep


@pytest.mark.parametrize(
    "prediction,weighting", [("eps", "none"), ("v", "min_snr")], ids=["eps", "v-min_snr"]
)
def test_logged_validation_loss_equals_an_independent_computation(tmp_path, prediction, weighting):
    opts = [f"diffusion.prediction={prediction}", f"diffusion.weighting={weighting}"]
    cfg = tiny_config(tmp_path, *VAL, *opts, "diffusion.snr_gamma=2.0", "model.dropout=0")
    data = ToyData(32)
    result = train(cfg, dataset=data, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("event") == "validation"]
    assert [r["step"] for r in logged] == [3, 4] and result.validation == logged

    # Recompute the last record from the saved weights, by hand.
    trainer = Trainer.from_config(cfg, dataset=data, progress=False)
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
                a = schedule.alpha(torch.tensor(float(t)))
                s = schedule.sigma(torch.tensor(float(t)))
                pred = net(a * x0 + s * eps, torch.full((len(x0),), float(t)), class_labels=labels)
                if prediction == "eps":  # L_simple of Ho et al. 2020, weight 1
                    target, weight = eps, 1.0
                else:  # v = α·ε − σ·x0 (Salimans & Ho 2022), weight min(SNR, γ)/(SNR + 1)
                    snr = a**2 / s**2
                    target, weight = a * eps - s * x0, min(float(snr), 2.0) / float(snr + 1)
                losses.append(weight * ((pred - target) ** 2).mean(dim=(1, 2, 3)))
        want = float(torch.cat(losses).double().mean())
        assert logged[-1][key] == pytest.approx(want, rel=1e-5), key
    assert logged[-1]["val_loss"] != logged[-1]["val_loss_ema"]


def test_validation_does_not_change_training(tmp_path):
    with_val = train(tiny_config(tmp_path / "a", *VAL), dataset=ToyData(32), progress=False)
    split_only = ["train.val_fraction=0.25"]
    without = train(tiny_config(tmp_path / "b", *split_only), dataset=ToyData(32), progress=False)
    assert with_val.losses == without.losses and not without.validation


def test_resumed_run_holds_out_the_same_data_and_logs_the_same_validation(tmp_path):
    data = ToyData(32)
    full = train(tiny_config(tmp_path / "full", *VAL), dataset=data, progress=False)
    cfg = tiny_config(tmp_path / "split", *VAL)
    first = Trainer.from_config(cfg, dataset=data, progress=False)
    try:
        first.run(stop_at=2)
    finally:
        first.close()
    rest = train(cfg, dataset=data, resume=True, progress=False)
    assert rest.losses == full.losses[2:]
    assert rest.validation == full.validation  # steps 3 and 4, bit for bit


def test_validation_sees_the_same_flips_and_leaves_the_data_generator_alone():
    gen = torch.Generator().manual_seed(5)
    data = ArrayDataset(ToyData(12).images, random_flip=True, generator=gen)
    _, val_set = split_dataset(data, 0.5, seed=0)
    net = UNet(tiny_config(Path("unused"), "model.num_classes=null").resolve().model_config())
    schedule = NoiseSchedule.from_config({"name": "cosine", "T": 100})
    before = gen.get_state()
    kw = dict(timesteps=2, seed=1, batch_size=4, device="cpu")
    first = validation_loss(net, val_set, schedule, DiffusionConfig(), **kw)
    assert validation_loss(net, val_set, schedule, DiffusionConfig(), **kw) == first
    assert torch.equal(gen.get_state(), before) and net.training
    other = validation_loss(net, val_set, schedule, DiffusionConfig(), **{**kw, "seed": 2})
    assert other != first  # the seed fixes the noise (and the flips)


def test_bad_validation_settings_name_the_key(tmp_path):
    for value in ("1.0", "-0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            tiny_config(tmp_path, f"train.val_fraction={value}")
    with pytest.raises(ValueError, match="val_every"):
        tiny_config(tmp_path, "train.val_fraction=0.1", "train.val_every=-1")
    with pytest.raises(ValueError, match="val_fraction > 0"):
        tiny_config(tmp_path, "train.val_every=5")
    with pytest.raises(ValueError, match="val_timesteps"):
        tiny_config(tmp_path, "train.val_timesteps=0")
    with pytest.raises(ValueError, match="leaves no training data"):
        split_dataset(ToyData(4), 0.9, seed=0)


def test_text_run_validation_scores_the_true_captions(tmp_path):
    """A text run's validation feeds each held-out image its own caption's tokens."""
    from difflab.models import TextConditionedUNet, TextTransformer, WordTokenizer

    text = ["model.num_classes=null", "data.source=digits", "text.encoder=transformer",
            "text.width=16", "text.heads=2", "text.layers=1", "text.max_length=8"]  # fmt: skip
    cfg = tiny_config(tmp_path, *VAL, *text, "model.dropout=0", "train.val_fraction=0.01")
    train(cfg, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if r.get("event") == "validation"][-1]

    trainer = Trainer.from_config(cfg, progress=False)
    held, data = trainer.val_set.indices, trainer.val_set.dataset
    trainer.close()
    tokenizer = WordTokenizer.load(tmp_path / "tokenizer.json")
    resolved = cfg.resolve()
    net = TextConditionedUNet(UNet(resolved.model_config()),
                              TextTransformer(len(tokenizer), resolved.text))  # fmt: skip
    net.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    net.eval()
    x0 = torch.stack([data[i]["image"] for i in held])
    ids, mask = tokenizer.encode([data[i]["text"] for i in held])
    schedule = NoiseSchedule.from_config(cfg.diffusion.schedule)
    cond = {"input_ids": ids, "attention_mask": mask}
    want = eps_mse_by_hand(net, schedule, x0, cond, _subseed(cfg.seed, 51), 3, 8)
    assert last["val_loss"] == pytest.approx(want, rel=1e-5)
