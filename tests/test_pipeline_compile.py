"""``Pipeline.compile`` (``difflab sample --compile``): the sampling loop's network runs
compiled, and the images equal the eager ones to float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.cli import build_parser
from difflab.models.layers import timestep_embedding
from difflab.pipeline import Pipeline
from difflab.schedules import NoiseSchedule

pytestmark = pytest.mark.compile  # 15-40 s on one busy core: inductor compiles a forward


class SmallNet(nn.Module):
    """``conv(silu(conv(x) + emb(t)))``, the model contract in a few kernels."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv_in = nn.Conv2d(1, 8, 3, padding=1)
            self.emb = nn.Linear(8, 8)
            self.conv_out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.emb(timestep_embedding(t, 8))[:, :, None, None]  # (B, 8, 1, 1)
        return self.conv_out(F.silu(self.conv_in(x) + emb))


def _pipe() -> Pipeline:
    return Pipeline(SmallNet(), NoiseSchedule.linear(100), image_shape=(1, 8, 8))


def test_compiled_sampling_equals_eager():
    eager = _pipe()(n=2, sampler="ddim", steps=4, seed=3)
    pipe = _pipe().compile()
    compiled = pipe(n=2, sampler="ddim", steps=4, seed=3)
    assert pipe.model._compiled_call_impl is not None  # nn.Module.compile, in place
    assert list(pipe.model.state_dict()) == list(SmallNet().state_dict())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_sample_has_a_compile_flag():
    args = build_parser().parse_args(["sample", "RUN", "--compile"])
    assert args.compile is True
    assert build_parser().parse_args(["sample", "RUN"]).compile is False
