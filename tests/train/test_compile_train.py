"""``train.compile: true``: compiled training equals eager training to float rounding, logs
its compilation time once, fills the run's inductor cache (``RUN/compile_cache``), and a
compiled run cut off and resumed equals the uncut compiled run bit for bit.

The network is a small one built from difflab's layers (timestep embedding, GroupNorm,
``layers.Dropout``): inductor compiles its forward and backward in about 20 s on one busy
CPU core, where even a one-level U-Net takes 95 s (its tracing without graph breaks is
``tests/models/test_compile.py``'s job).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_helpers import ToyData, one_thread, tiny_config  # noqa: F401

from difflab.models.layers import Dropout, group_norm, timestep_embedding
from difflab.train import Trainer, load_checkpoint
from difflab.train.compiled import COMPILE_CACHE

pytestmark = pytest.mark.compile  # part of the default suite; `-m "not compile"` skips it

OPTS = ["train.max_steps=3"]


class SmallNet(nn.Module):
    """``conv(drop(silu(norm(conv(x)) + emb(t))))``: the model contract in a few kernels."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv_in = nn.Conv2d(1, 8, 3, padding=1)
            self.emb = nn.Linear(8, 8)
            self.norm = group_norm(8, 4)
            self.drop = Dropout(dropout)
            self.conv_out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, **_: Tensor) -> Tensor:
        emb = self.emb(timestep_embedding(t, 8))[:, :, None, None]  # (B, 8, 1, 1)
        return self.conv_out(self.drop(F.silu(self.norm(self.conv_in(x)) + emb)))


def _run(run_dir, dropout, *extra, stop_at=None, resume=False):
    trainer = Trainer.from_config(tiny_config(run_dir, *OPTS, *extra), dataset=ToyData(16),
                      model=SmallNet(dropout))  # fmt: skip
    try:
        return trainer.run(stop_at=stop_at, resume=resume)
    finally:
        trainer.close()


def _events(run_dir, name):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == name]


def test_compiled_training_matches_eager_and_resumes_exactly(tmp_path):
    eager = _run(tmp_path / "eager", 0.0)  # no dropout: inductor draws its own masks
    compiled = _run(tmp_path / "compiled", 0.0, "train.compile=true")
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-5, atol=1e-7)
    a, b = load_checkpoint(tmp_path / "eager"), load_checkpoint(tmp_path / "compiled")
    assert a.model.keys() == b.model.keys()  # the module's own keys, not the wrapper's
    for key in a.model:
        torch.testing.assert_close(b.model[key], a.model[key], rtol=1e-5, atol=1e-6)
    (event,) = _events(tmp_path / "compiled", "compile")  # reported once, at step 1
    assert event["step"] == 1 and event["seconds"] > 0
    cache = tmp_path / "compiled" / COMPILE_CACHE
    assert any((cache / "fxgraph").rglob("*"))
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(cache)  # restored by close()

    # Exact resume, dropout on: inductor's masks come from the global RNG, which the
    # checkpoint saves and restores.
    full = _run(tmp_path / "full", 0.1, "train.compile=true")
    _run(tmp_path / "cut", 0.1, "train.compile=true", stop_at=2)
    torch.manual_seed(1234)  # the caller's global RNG must not matter
    rest = _run(tmp_path / "cut", 0.1, "train.compile=true", resume=True)
    assert rest.losses == full.losses[2:] and full.losses != compiled.losses
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
        assert torch.equal(a.ema[key], b.ema[key]), key
    assert len(_events(tmp_path / "cut", "compile")) == 2  # once per start of the trainer


def test_compile_is_a_train_config_key(tmp_path):
    assert tiny_config(tmp_path, "train.compile=true").train.compile is True
    assert tiny_config(tmp_path).train.compile is False
    with pytest.raises(ValueError, match="compile"):
        tiny_config(tmp_path, "train.compile=maybe")
