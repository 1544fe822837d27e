"""Runs whose output goes to a file print a plain line per logged step instead of a progress
bar (USER_NEEDS 24); the lines agree with ``metrics.jsonl``, which ``metrics.png`` draws."""

from __future__ import annotations

import json

import pytest
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.train import train
from difflab.train.monitor import log_line, plot_metrics


def _step_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("step ")]


def test_output_to_a_file_gets_one_line_per_logged_step_matching_the_metrics(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", "train.max_steps=6", "train.log_every=2")
    train(cfg, dataset=ToyData())  # progress=None: pytest's capture is not a terminal
    lines = _step_lines(capsys.readouterr().out)
    records = [
        r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]  # fmt: skip
    assert [r["step"] for r in records] == [2, 4, 6]
    assert len(lines) == 3
    for line, rec in zip(lines, records):
        assert line.startswith(f"step {rec['step']}/6 ")
        assert f"loss {rec['loss']:.4f}" in line and f"lr {rec['lr']:.2e}" in line
    assert "eta" in lines[0] and "eta" not in lines[-1]  # nothing left at the last step


def test_no_lines_when_progress_is_switched_off(tmp_path, capsys):
    train(tiny_config(tmp_path, "train.max_steps=2", "train.log_every=1"), dataset=ToyData(),
          progress=False)  # fmt: skip
    assert _step_lines(capsys.readouterr().out) == []


def test_log_line_reads_well_and_extrapolates_the_time_left():
    rec = {"step": 40, "loss": 0.51379, "lr": 8e-4, "grad_norm": 1.2707, "imgs_per_s": 1479.7,
           "epoch": 2, "ema_decay": 0.82, "loss_prior": None}  # fmt: skip
    # 30 steps since a resume at step 10 took 90 s: 3 s/step, 3,960 steps (11,880 s) left
    line = log_line(rec, 4000, 90.0, start_step=10)
    assert line == (
        "step 40/4000 (1%)  loss 0.5138  lr 8.00e-04  grad 1.27  1480 img/s  epoch 2  "
        "ema 0.820  eta 3:18:00"
    )


def test_metrics_png_has_a_panel_per_logged_quantity(tmp_path):
    """``metrics.png`` at each checkpoint: training loss, learning rate and, with validation,
    its loss: three panels of 3.4 in at 100 dpi. Switched off, none is drawn."""
    from PIL import Image

    run = tmp_path / "run"
    cfg = tiny_config(run, "train.max_steps=4", "train.log_every=1", "train.plot_metrics=true",
                      "train.val_fraction=0.25", "train.val_every=2")  # fmt: skip
    train(cfg, dataset=ToyData(), progress=False)
    with Image.open(run / "metrics.png") as img:
        assert img.format == "PNG" and img.size[0] == 3 * 340
    assert plot_metrics(run, tmp_path / "again.png") == tmp_path / "again.png"
    (run / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    assert plot_metrics(run, tmp_path / "none.png") is None  # no training step logged yet
    off = tmp_path / "off"
    train(tiny_config(off, "train.max_steps=2"), dataset=ToyData(), progress=False)
    assert not (off / "metrics.png").exists()


def test_a_failing_plot_warns_and_training_goes_on(tmp_path, monkeypatch):
    from difflab.train import loop

    def broken(run_dir):
        raise OSError("disk full")

    monkeypatch.setattr(loop, "plot_metrics", broken)
    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.plot_metrics=true")
    with pytest.warns(UserWarning, match="metrics.png not drawn: OSError"):
        result = train(cfg, dataset=ToyData(), progress=False)
    assert result.step == 2 and (tmp_path / "ema.safetensors").is_file()
