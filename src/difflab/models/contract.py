"""The model contract's input checks, shared by every network difflab ships.

Owns ``check_model_inputs``: ``model(x_t, t, class_labels=None, context=None,
context_mask=None)`` validated against the network's config (``in_channels``,
``downsample_factor``, ``num_classes``, ``context_dim``) with messages that say what was
wrong and what is allowed; :class:`DenoiserNet`, that contract as a ``Protocol``, is
defined with the code that calls such networks (:mod:`difflab.parametrization`) and
re-exported here.  Knows nothing of any
architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..parametrization import DenoiserNet

__all__ = ["DenoiserNet", "check_model_inputs"]


def check_model_inputs(
    name: str,
    config: Any,
    x: Tensor,
    t: Tensor | float,
    class_labels: Tensor | None,
    context: Tensor | None,
    context_mask: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Validate the model contract's inputs against ``config`` (``in_channels``,
    ``downsample_factor``, ``num_classes``, ``context_dim``); return ``t [B]``, the class
    labels (the null label ``num_classes`` when a conditional model gets ``None``) and a
    boolean mask, on ``x``'s device. ``name`` is the network's name in the messages."""
    if x.ndim != 4 or x.shape[1] != config.in_channels:
        raise ValueError(
            f"{name} expects x of shape [B, {config.in_channels}, H, W], got {tuple(x.shape)}"
        )
    b, f = x.shape[0], config.downsample_factor
    if x.shape[2] % f or x.shape[3] % f:
        raise ValueError(f"{name}: spatial size {tuple(x.shape[2:])} must be divisible by {f}")
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"t must be a scalar or of shape [{b}], got {tuple(t.shape)}")
    if config.num_classes is None:
        if class_labels is not None:
            raise ValueError(f"class_labels given to an unconditional {name} (num_classes=None)")
    elif class_labels is None:
        class_labels = torch.full((b,), config.num_classes, dtype=torch.long, device=x.device)
    elif class_labels.shape != (b,) or class_labels.is_floating_point():
        raise ValueError(
            f"class_labels must be an integer tensor of shape [{b}], "
            f"got {class_labels.dtype} {tuple(class_labels.shape)}"
        )
    if config.context_dim is None:
        if context is not None or context_mask is not None:
            raise ValueError(
                f"context given to a {name} without cross-attention (context_dim=None)"
            )
        return t, class_labels, None
    if context is None:
        raise ValueError(f"this {name} needs context [B, L, {config.context_dim}]")
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != config.context_dim:
        raise ValueError(
            f"context must have shape [{b}, L, {config.context_dim}], got {tuple(context.shape)}"
        )
    if context_mask is not None:
        if context_mask.shape != context.shape[:2]:
            raise ValueError(
                f"context_mask must have shape {tuple(context.shape[:2])}, "
                f"got {tuple(context_mask.shape)}"
            )
        context_mask = context_mask.to(torch.bool)
    return t, class_labels, context_mask
