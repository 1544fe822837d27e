"""Exact resume: 2N steps in one go equal N steps + resume + N steps, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import ToyData, one_thread, tiny_config, train_with_a_cut  # noqa: F401

from difflab.images import read_png_params
from difflab.train import Trainer, load_checkpoint, load_config, train


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "extra",
    [
        [],  # eps, uniform timesteps
        ["diffusion.variance=learned_range", "diffusion.timestep_sampler=importance"],
    ],
    ids=["eps", "hybrid-importance"],
)
def test_resume_is_bit_exact(tmp_path, extra):
    opts = ["train.max_steps=6", "train.grad_accum=2", "diffusion.cond_drop_prob=0.3", *extra]
    data = ToyData(24)  # 3 global batches per epoch: the run crosses epoch boundaries
    full = train(tiny_config(tmp_path / "full", *opts), dataset=data)

    cfg = tiny_config(tmp_path / "split", *opts)
    first = Trainer.from_config(cfg, dataset=data)  # the same run, cut off after step 3
    try:
        first.run(stop_at=3)
    finally:
        first.close()
    torch.manual_seed(1234)  # the caller's global RNG must not matter
    rest = train(cfg, dataset=data, resume=True)

    assert rest.step == full.step == 6
    assert rest.final_loss == full.final_loss
    assert rest.losses == full.losses[3:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    _same_state(a.model, b.model)
    _same_state(a.ema, b.ema)
    assert a.meta["ema_updates"] == b.meta["ema_updates"] == 6
    assert a.meta["data_position"] == b.meta["data_position"]
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    for pid, st in a.optimizer["state"].items():
        _same_state(st, b.optimizer["state"][pid])
    assert a.meta["timestep_sampler"] == b.meta["timestep_sampler"]


def test_train_restores_callers_rng_and_writes_run_dir(tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.sample_every=2")
    result = train(cfg, dataset=ToyData())
    assert torch.equal(torch.rand(3), expected)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "model.safetensors", "ema.safetensors", "train_state"} <= names
    written = load_config(tmp_path / "config.yaml")
    assert written == cfg.resolve() and "preset" not in written.model
    assert [p.name for p in result.grids] == ["step_000002_raw.png", "step_000002_ema.png"]
    assert {p.name for p in (tmp_path / "samples").iterdir()} == {p.name for p in result.grids}
    assert read_png_params(result.grids[1])["seed"] == cfg.seed
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]


def test_fresh_train_refuses_existing_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=1")
    train(cfg, dataset=ToyData())
    with pytest.raises(ValueError, match="resume=True"):
        train(cfg, dataset=ToyData())


def test_memory_flags_and_workers_do_not_change_the_gradients(tmp_path):
    flags = ["train.num_workers=1", "train.grad_checkpointing=true", "train.channels_last=true"]
    grads, losses = [], []
    for name, opts in (("base", []), ("flags", flags)):
        trainer = Trainer.from_config(tiny_config(tmp_path / name, *opts), dataset=ToyData())
        try:
            losses.append(trainer.train_step()["loss"])
            grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        finally:
            trainer.close()
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6)


def test_resume_warns_about_changed_config(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=1"), dataset=ToyData())
    with pytest.warns(UserWarning, match="train.max_steps"):
        assert (
            train(tiny_config(tmp_path, "train.max_steps=2"), dataset=ToyData(), resume=True).step
            == 2
        )


def test_keys_a_newer_difflab_added_at_their_defaults_are_no_change(tmp_path):
    """A run written before a config key existed (its config.yaml lacks it) resumes without
    a warning about it; a real change is still named."""
    import warnings

    import yaml

    train(tiny_config(tmp_path, "train.max_steps=1"), dataset=ToyData())
    path = tmp_path / "config.yaml"
    old = yaml.safe_load(path.read_text())
    for key in ("formulation", "formulation_options"):  # keys this stop added
        old["diffusion"].pop(key, None)
    old["train"].pop("max_time", None)
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the resume
        assert train(tiny_config(tmp_path, "train.max_steps=1"), dataset=ToyData(),
                     resume=True).step == 1  # fmt: skip
    with pytest.warns(UserWarning, match=r"changed config keys: train.max_steps$"):
        train(tiny_config(tmp_path, "train.max_steps=2"), dataset=ToyData(), resume=True)


def test_resume_is_bit_exact_with_channels_last(tmp_path):
    opts = ["train.max_steps=2", "train.channels_last=true"]
    data = ToyData(16)
    full = train(tiny_config(tmp_path / "full", *opts), dataset=data)
    rest = train_with_a_cut(tiny_config(tmp_path / "split", *opts), 1, dataset=data)
    assert rest.losses == full.losses[1:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    _same_state(a.model, b.model)
    _same_state(a.ema, b.ema)
    for pid, st in a.optimizer["state"].items():
        _same_state(st, b.optimizer["state"][pid])


def test_resume_logs_each_step_once_in_metrics_jsonl(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.save_every=2")
    real_save = Trainer.save

    def killed_at_step_4(self):
        if self.step == 4:
            raise KeyboardInterrupt  # steps 3 and 4 are logged, their checkpoint never written
        real_save(self)

    monkeypatch.setattr(Trainer, "save", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, dataset=ToyData(), progress=False)
    monkeypatch.undo()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": 0.')  # a line cut short by the kill
    train(cfg, dataset=ToyData(), resume=True, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert [(x["event"], x["step"]) for x in lines if "event" in x] == [("start", 0), ("resume", 2)]
