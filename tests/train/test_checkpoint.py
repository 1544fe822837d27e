"""Checkpoints: safetensors + JSON round trips, atomic writes, crash safety."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.train import (
    Checkpoint,
    Trainer,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train,
)
from difflab.train import checkpoint as ckpt_mod
from difflab.train.checkpoint import flatten_optimizer_state, unflatten_optimizer_state


def _adamw_after_steps(n: int = 2) -> torch.optim.AdamW:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(n):
        net(torch.ones(4, 3)).square().sum().backward()
        opt.step()
    return opt


def test_optimizer_state_flattens_to_tensors_and_json_and_back():
    opt = _adamw_after_steps()
    sd = opt.state_dict()
    tensors, index = flatten_optimizer_state(sd)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.dumps(index)  # the non-tensor part is plain JSON
    back = unflatten_optimizer_state(tensors, json.loads(json.dumps(index)), like=sd)
    assert back["param_groups"] == sd["param_groups"]  # betas is a tuple again
    for pid, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][pid][k], v)
    opt.load_state_dict(back)  # accepted by the optimiser


def test_save_load_round_trip_and_published_weights(tmp_path):
    opt = _adamw_after_steps()
    model = {"w": torch.randn(3, 2), "b": torch.arange(4.0)}
    ema = {"w": torch.zeros(3, 2), "b": torch.ones(4)}
    rng = {"rank0.torch_cpu": torch.get_rng_state()}
    meta = {"step": 7, "ema_updates": 7, "loss": 0.5, "data_position": {"epoch": 1, "index": 8}}
    save_checkpoint(tmp_path, Checkpoint(model, ema, opt.state_dict(), rng, meta))
    back = load_checkpoint(tmp_path, optimizer_like=opt.state_dict())
    for k in model:
        assert torch.equal(back.model[k], model[k]) and torch.equal(back.ema[k], ema[k])
    assert torch.equal(back.rng["rank0.torch_cpu"], rng["rank0.torch_cpu"])
    assert {k: back.meta[k] for k in meta} == meta
    with safe_open(str(tmp_path / "ema.safetensors"), "pt") as f:  # what Pipeline reads
        assert f.metadata()["step"] == "7" and f.metadata()["ema_updates"] == "7"
        assert torch.equal(f.get_tensor("b"), ema["b"])
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("train_state.old-*"))


def test_crash_while_writing_keeps_previous_checkpoint_resumable(tmp_path, monkeypatch):
    opts = ["train.max_steps=4", "train.save_every=2"]
    reference = train(tiny_config(tmp_path / "ref", *opts), dataset=ToyData())

    cfg = tiny_config(tmp_path / "run", *opts)
    real_write, calls = ckpt_mod._write_file, []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 8:  # the second save (step 4), third file: optimizer.safetensors
            raise OSError("disk full (simulated)")
        real_write(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_file", failing_write)
    with pytest.raises(OSError, match="simulated"):
        train(cfg, dataset=ToyData())
    monkeypatch.setattr(ckpt_mod, "_write_file", real_write)

    assert load_checkpoint(tmp_path / "run").meta["step"] == 2  # the previous one, intact
    assert not list((tmp_path / "run").glob("train_state.tmp-*"))  # half-written one removed
    resumed = train(cfg, dataset=ToyData(), resume=True)
    assert resumed.step == 4 and resumed.final_loss == reference.final_loss
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(tmp_path / "run")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_crash_between_renames_falls_back_to_the_previous_state(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_steps=2")
    trainer = Trainer.from_config(cfg, dataset=ToyData())
    try:
        trainer.run(stop_at=1)
        real_rename, calls = ckpt_mod.os.rename, []

        def failing_rename(src, dst):
            calls.append(src)
            if len(calls) == 2:  # old checkpoint moved aside, new one not yet moved in
                raise OSError("power cut (simulated)")
            real_rename(src, dst)

        monkeypatch.setattr(ckpt_mod.os, "rename", failing_rename)
        trainer.step = 2
        with pytest.raises(OSError, match="simulated"):
            trainer.save()
    finally:
        trainer.close()
    monkeypatch.undo()
    found = find_checkpoint(tmp_path)
    assert found is not None and found.name.startswith("train_state.old-")
    assert load_checkpoint(tmp_path).meta["step"] == 1
    assert train(cfg, dataset=ToyData(), resume=True).step == 2
    assert find_checkpoint(tmp_path) == tmp_path / "train_state"
    assert not list(tmp_path.glob("train_state.old-*"))


def _published_step(path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["step"]


def test_kill_between_publishing_model_and_ema_is_repaired_on_the_next_start(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.save_every=1")
    real_publish = ckpt_mod._publish

    def killed_before_ema(src, dst):
        if dst.name == "ema.safetensors" and '"step": 2' in (src.parent / "state.json").read_text():
            raise KeyboardInterrupt  # the final save, killed after model.safetensors
        real_publish(src, dst)

    monkeypatch.setattr(ckpt_mod, "_publish", killed_before_ema)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, dataset=ToyData())
    monkeypatch.undo()
    assert _published_step(tmp_path / "model.safetensors") == "2"
    assert _published_step(tmp_path / "ema.safetensors") == "1"  # one save behind

    assert train(cfg, dataset=ToyData(), resume=True).step == 2  # nothing left to train
    ck = load_checkpoint(tmp_path)
    for name, weights in (("model", ck.model), ("ema", ck.ema)):
        assert _published_step(tmp_path / f"{name}.safetensors") == "2"
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            assert all(torch.equal(f.get_tensor(k), v) for k, v in weights.items())


def test_temp_files_of_killed_saves_are_removed_on_start(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=1")
    train(cfg, dataset=ToyData())
    (tmp_path / "samples").mkdir()
    left = [tmp_path / ".ema.safetensors.tmp-1a2b3c4d", tmp_path / ".config.yaml.tmp-00ff00ff",
            tmp_path / "samples" / ".step_000001_ema.png.k2j3h4.tmp"]  # fmt: skip
    for path in left:
        path.write_bytes(b"half a file")
    (tmp_path / "train_state.tmp-x1y2").mkdir()
    train(tiny_config(tmp_path, "train.max_steps=2"), dataset=ToyData(), resume=True)
    assert not any(path.exists() for path in left)
    assert not list(tmp_path.glob("train_state.tmp-*"))
    assert (tmp_path / "model.safetensors").is_file()
