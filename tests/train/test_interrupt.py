"""Ctrl-C and SIGTERM during training: the step finishes, a checkpoint is saved, the command
says how to resume and exits 128 + signal without a traceback; the resume says where from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from train_helpers import one_thread  # noqa: F401

from difflab.cli import main
from difflab.train import Trainer, load_checkpoint

ROOT = Path(__file__).parents[2]
TINY = ["model.preset=tiny", "model.model_channels=16", "model.norm_groups=4",
        "train.batch_size=8", "train.device=cpu", "train.sample_every=0", "train.log_every=1",
        "train.plot_metrics=false", "train.tensorboard=false", "train.warmup_steps=1"]  # fmt: skip


def _argv(run_dir: Path, steps: int) -> list[str]:
    """``difflab train`` of a tiny U-Net on 16 random 8x8 images (an ``.npz`` beside the run)."""
    data = run_dir.parent / "data.npz"
    if not data.is_file():
        images = np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8)
        np.savez(data, images=images, labels=np.arange(16) % 10)
    sets = [f"run_dir={run_dir}", *TINY, f"train.max_steps={steps}", "data.source=npz",
            f"data.path={data}"]  # fmt: skip
    return ["train", str(ROOT / "configs" / "digits.yaml"), *[f"--set={o}" for o in sets]]


def test_ctrl_c_saves_the_step_and_resume_continues_exactly(tmp_path, capsys, monkeypatch):
    assert main(_argv(tmp_path / "full", 4)) == 0
    real_step = Trainer.train_step

    def ctrl_c_during_step_2(self):
        rec = real_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-run, as a keypress would
        return rec

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_during_step_2)
    argv = _argv(tmp_path / "cut", 4)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("difflab train: stopped by SIGINT at step 2: checkpoint saved in ")
    assert line.endswith(f"resume with: difflab {' '.join(argv)} --resume")
    assert load_checkpoint(tmp_path / "cut").meta["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert f"resuming {tmp_path / 'cut'} from step 2" in capsys.readouterr().out
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert b.meta["step"] == 4
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)


def test_sigterm_saves_a_checkpoint_and_exits_143_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "difflab.cli", *_argv(tmp_path, 100_000)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and '"loss"' in metrics.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    assert b"Traceback" not in err
    assert b"stopped by SIGTERM at step" in err and b"--resume" in err
    step = load_checkpoint(tmp_path).meta["step"]
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert step >= 1 and logged[-1] == step  # the checkpoint is the last step trained
