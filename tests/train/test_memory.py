"""The per-rank memory report (difflab.train.memory): known answers."""

from __future__ import annotations

import torch
from torch import nn

from difflab.models.unet import UNet, UNetConfig
from difflab.train.memory import activation_bytes, memory_report


def test_activation_bytes_counts_what_autograd_saves():
    """Linear(10, 20) -> ReLU -> Linear(20, 1) on 4 rows saves the input (4x10) and the
    ReLU output (4x20, shared by ReLU and the second Linear): 60 + 80 floats = 480 bytes;
    the weights (and their transposed views) are not activations."""
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))
    assert activation_bytes(lambda: net(torch.randn(4, 10)).sum()) == 480


def test_fsdp_divides_model_state_by_ranks():
    """Under FSDP each rank holds ceil(1/N) of params, grads, AdamW moments and EMA; DDP
    holds them whole: 4 bytes each for params, grads, EMA and 8 for AdamW per parameter."""
    with torch.device("meta"):
        unet = UNet(UNetConfig.preset("tiny"))
    n = sum(p.numel() for p in unet.parameters())
    ddp = memory_report(unet, parallel="ddp", world_size=4)
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.ema) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert ddp.gathered == 0
    for ranks in (2, 4):
        fsdp = memory_report(unet, parallel="fsdp", world_size=ranks)
        assert fsdp.model_state == sum(-(-b // ranks) for b in (4 * n, 4 * n, 8 * n, 4 * n))
        assert 0 < fsdp.gathered < 2 * 4 * n  # one unit's params + grads, not the model's
    assert "one process" in memory_report(unet, parallel="fsdp", world_size=1).format()
