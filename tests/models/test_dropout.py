"""``layers.Dropout``: PyTorch's dropout with a cheaper CPU mask, and the same contract."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.models.layers import Dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drops_a_fraction_p_and_keeps_the_expectation(p):
    x = torch.full((400_000,), 2.0)
    torch.manual_seed(0)
    y = Dropout(p).train()(x)
    p_used = round(p * 65536) / 65536  # p on the mask's 16-bit grid
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p_used) < 5 * math.sqrt(p * (1 - p) / x.numel())  # binomial, 5 sigma
    kept = y[y != 0]
    assert torch.equal(kept, torch.full_like(kept, 2.0 / (1 - p_used)))  # inverted scaling
    assert abs(y.double().mean().item() - 2.0) < 5 * 2.0 * math.sqrt(p / (1 - p) / x.numel())


def test_gradient_is_the_same_mask_and_draws_follow_the_global_generator():
    """The trainer checkpoints the global generator, as for nn.Dropout: the same seed gives
    the same mask (so a resumed run draws the same masks), another seed another one."""
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    torch.manual_seed(3)
    y = Dropout(0.25).train()(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(y != 0, 1 / 0.75, 0.0))
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.25).train()(x), y)
    torch.manual_seed(4)
    assert not torch.equal(Dropout(0.25).train()(x), y)


def test_identity_in_eval_at_p_0_and_bf16_stays_bf16():
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    xb = x.bfloat16()
    yb = Dropout(0.5).train()(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb[yb != 0], (xb * 2)[yb != 0])  # 1/(1 - 0.5) = 2 exactly
    assert torch.equal(Dropout(1.0 - 1e-9).train()(x), torch.zeros_like(x))  # all dropped
