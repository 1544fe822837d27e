"""Run configs: did-you-mean errors, YAML round trips, typed --set overrides, LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from difflab.train import TrainConfig, load_config, lr_factor, save_config


def test_unknown_keys_raise_with_a_suggestion():
    with pytest.raises(ValueError, match=r"'lrr'; did you mean 'lr'\?"):
        TrainConfig.from_dict({"train": {"lrr": 1e-4}})
    with pytest.raises(ValueError, match=r"did you mean 'diffusion'\?"):
        TrainConfig.from_dict({"difusion": {}})
    with pytest.raises(ValueError, match=r"did you mean 'dropout'"):
        load_config(None, ["model.dropot=0.1"])
    # schedule options are checked when the config loads, not at the first training step
    schedule = "diffusion.schedule={name: linear, T: 1000, rescale_zero_terminal_snr: true}"
    with pytest.raises(ValueError, match=r"diffusion.schedule.*did you mean 'zero_terminal_snr'"):
        load_config(None, [schedule])
    with pytest.raises(ValueError, match=r"'cosine' schedule 'beta_end'.*choices: T, max_beta"):
        TrainConfig.from_dict({"diffusion": {"schedule": {"name": "cosine", "beta_end": 0.02}}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.mixed_precision=fp32", "unknown mixed_precision 'fp32'"),
        ("diffusion.prediction=epsilon", "did you mean 'eps'"),
        ("train.on_nonfinite=ignore", "choices: skip, stop"),
        ("train.max_steps=lots", "must be int"),
        ("train.max_steps=0", r"'train.max_steps' must be >= 1"),
        ("diffusion.cond_drop_prob=1.5", r"must be in \[0.0, 1.0\]"),
        ("model.learn_sigma=true", "contradicts diffusion.variance"),
        ("model.in_channels=3", "must match"),
        ("train.device=gpu0", "must be a torch device such as 'cpu', 'cuda'"),
    ],
)
def test_closed_choices_and_types_are_checked_at_load(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_set_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",  # YAML 1.1 reads this as a string; the float field converts it
            "train.max_steps=10",
            "train.ema_warmup=false",
            "model.channel_mult=[1, 2]",
            "diffusion.schedule.T=50",
            "data.path=null",
            "seed=3",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 10 and cfg.train.ema_warmup is False
    assert cfg.model["channel_mult"] == [1, 2]
    assert cfg.diffusion.schedule == {"name": "cosine", "T": 50}  # merged, not replaced
    assert cfg.seed == 3 and cfg.data.path is None


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "diffusion.variance=learned_range", "seed=5"])
    save_config(cfg, tmp_path / "a.yaml")
    assert load_config(tmp_path / "a.yaml") == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    resolved = cfg.resolve()
    assert "preset" not in resolved.model and resolved.model["learn_sigma"] is True
    save_config(resolved, tmp_path / "b.yaml")
    assert load_config(tmp_path / "b.yaml") == resolved
    assert resolved.model_config() == cfg.model_config()


def test_file_and_overrides_combine(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"train": {"batch_size": 8}, "seed": 1}))
    cfg = load_config(tmp_path / "c.yaml", ["train.grad_accum=2"])
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.seed) == (8, 2, 1)
    assert cfg.train.lr == TrainConfig().train.lr  # untouched keys keep their defaults


def test_lr_schedule_warmup_then_cosine():
    kw = dict(warmup_steps=4, max_steps=12)
    assert [lr_factor(s, schedule="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(8, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(12, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_factor(11, schedule="constant", **kw) == 1.0


def test_optimizer_is_fused_adamw_with_the_plain_adamw_update(tmp_path):
    import torch

    from difflab.train.optim import build_optimizer

    overrides = ["train.lr=1e-2", "train.weight_decay=0.1", "train.warmup_steps=0"]
    cfg = load_config(None, [f"run_dir={tmp_path}", *overrides])
    gen = torch.Generator().manual_seed(0)
    ours = torch.nn.Linear(6, 4)
    plain = torch.nn.Linear(6, 4)
    plain.load_state_dict(ours.state_dict())
    opt, _ = build_optimizer(ours, cfg.train)
    assert opt.param_groups[0]["fused"]  # this torch has the CPU kernel (>= 2.4)
    ref = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        x = torch.randn(5, 6, generator=gen)
        for net, o in ((ours, opt), (plain, ref)):
            o.zero_grad()
            net(x).square().sum().backward()
            o.step()
    for a, b in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error seen without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(tmp_path):
    from train_helpers import ToyData, tiny_config

    from difflab.train import Trainer

    with pytest.raises(ValueError, match="'cuda' was asked for but torch sees no CUDA"):
        Trainer.from_config(tiny_config(tmp_path, "train.device=cuda"), dataset=ToyData())


def test_device_cpu_is_honoured(tmp_path):
    from train_helpers import ToyData, tiny_config

    from difflab.train import Trainer

    trainer = Trainer.from_config(tiny_config(tmp_path, "train.device=cpu"), dataset=ToyData())
    try:
        assert trainer.device == torch.device("cpu")
        assert next(trainer.model.parameters()).device.type == "cpu"
    finally:
        trainer.close()
