"""Elastic restarts: ``torchrun --max-restarts 1 ... difflab train CONFIG --resume``.

The documented recipe (docs/training.md, "Several nodes and elastic restarts") run as written
with one node of 2 gloo ranks: rank 1 is SIGKILLed in the middle of step 5 of 8 (checkpoints
every 2 steps), torchrun tears the group down and starts it again, the same command line's
``--resume`` continues from step 4, and the run ends with the weights (raw and EMA) of the
same command run without a kill, bit for bit.

The kill comes from a ``sitecustomize.py`` that the test puts on the workers' ``PYTHONPATH``
(library code has no fault-injection switch): in the first attempt
(``TORCHELASTIC_RESTART_COUNT=0``) rank 1 sends itself SIGKILL before its sixth forward pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torchrun_helpers import free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

SRC = Path(__file__).resolve().parents[2] / "src"
CONFIG = {  # the tiny U-Net of tests/train/train_helpers.py on the embedded digits
    "model": {"preset": "tiny", "image_size": 8, "model_channels": 16, "norm_groups": 4,
              "num_classes": 10, "dropout": 0.0},
    "data": {"image_size": 8},
    "diffusion": {"schedule": {"T": 100}},
    "train": {"device": "cpu", "plot_metrics": False, "tensorboard": False, "batch_size": 8,
              "warmup_steps": 2, "max_steps": 8, "save_every": 2, "log_every": 1,
              "sample_every": 0},
    "sample": {"steps": 3, "num_images": 4},
}  # fmt: skip
KILL_AT = 5  # rank 1 dies in step 5: the last checkpoint is step 4, step 5 is lost

FAULT = """
import os
if os.environ.get("DIFFLAB_TEST_KILL_AT") and os.environ.get("RANK") == "1" \\
        and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import signal
    from difflab.train import loop

    _at, _step = int(os.environ["DIFFLAB_TEST_KILL_AT"]), loop.Trainer.train_step

    def train_step(self):
        if self.step + 1 == _at:  # the step about to run
            os.kill(os.getpid(), signal.SIGKILL)
        return _step(self)

    loop.Trainer.train_step = train_step
"""


def _command(config: Path, run_dir: Path) -> list[str]:
    """docs/training.md's elastic command (``torchrun`` is ``python -m torch.distributed.run``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", run_dir.name,
            "--max-restarts", "1",
            "-m", "difflab.cli", "train", str(config), "--set", f"run_dir={run_dir}",
            "--resume"]  # fmt: skip


def test_killed_rank_restarts_from_checkpoint_and_ends_like_uninterrupted_run(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(textwrap.dedent(FAULT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # see docs/training.md
           "PYTHONPATH": os.pathsep.join([str(fault), str(SRC)])}  # fmt: skip
    runs = {"killed": tmp_path / "killed", "whole": tmp_path / "whole"}
    procs = {  # both at once: the waits of one (imports, the restart) overlap the other
        name: subprocess.Popen(
            _command(config, run_dir),
            env={**env, "DIFFLAB_TEST_KILL_AT": str(KILL_AT)} if name == "killed" else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, run_dir in runs.items()
    }
    out = {name: p.communicate(timeout=300) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, (name, out[name][1][-3000:])
    # The first attempt really lost rank 1 and torchrun really restarted the group.
    assert "exitcode: -9" in out["killed"][1] and "exitcode: -9" not in out["whole"][1]
    assert f"resuming {runs['killed']} from step 4" in out["killed"][0]
    assert "resuming" not in out["whole"][0]  # --resume with no checkpoint: a fresh start
    events = [json.loads(line) for line in (runs["killed"] / "metrics.jsonl").open()]
    assert [e for e in events if "event" in e] == [
        {"event": "start", "step": 0}, {"event": "resume", "step": 4}]  # fmt: skip
    assert [e["step"] for e in events if "loss" in e] == list(range(1, 9))  # step 5 once
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(runs["killed"] / name), load_file(runs["whole"] / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
