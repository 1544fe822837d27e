"""The small, typed interfaces through which the trainer talks to its parts.

Owns the ``Protocol``s :class:`ConditioningPart`, :class:`HooksPart`, :class:`FinetunePart`
and :class:`StepTask` (what the core loop :func:`difflab.train.loop.run_steps` drives).
The network itself is a :class:`difflab.models.contract.DenoiserNet`.  Knows nothing of
how a part is built (:mod:`difflab.train.parts`) or of the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["ConditioningPart", "FinetunePart", "HooksPart", "StepTask"]


@runtime_checkable
class ConditioningPart(Protocol):
    """Batch -> network inputs: (latent) images and the ``cond`` dict (class labels, text)."""

    vae: Any  # the frozen autoencoder of a latent run (None in pixel space)
    grid_prompts: list[str] | None

    def inputs(
        self, batch: dict[str, Any], gen: torch.Generator, B: int, rows: slice,
        null_label: int | None,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...  # fmt: skip

    def validation_inputs(
        self, images: Tensor, items: list[dict[str, Any]]
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def prompt_encoder(self, net: nn.Module) -> Any: ...

    def write(self, run_dir: Path) -> None: ...

    def check_resume(self, run_dir: Path) -> None: ...


@runtime_checkable
class FinetunePart(Protocol):
    """The fine-tuning set-up: what it publishes at each checkpoint (nothing when off)."""

    def save(self, ema_model: nn.Module, run_dir: Path, step: int) -> None: ...


@runtime_checkable
class HooksPart(Protocol):
    """What the loop calls to look at the run: grids, validation, periodic evaluation."""

    def grids(self, step: int, model: nn.Module, ema_model: nn.Module) -> list[Path]: ...

    def validation(self, step: int, model: nn.Module, ema_model: nn.Module) -> dict[str, Any]: ...

    def periodic_eval(self, step: int, ema_model: nn.Module) -> dict[str, Any]: ...


@runtime_checkable
class StepTask(Protocol):
    """What :func:`difflab.train.loop.run_steps` drives: one optimiser step at a time.

    ``train_step`` advances ``step`` and returns the step's record; ``after_step`` runs the
    task's logging and hooks and returns the (possibly earlier) last step; ``save`` writes a
    checkpoint; ``stopping`` says whether a stop signal arrived (on any rank).
    """

    step: int
    run_dir: Path

    def train_step(self) -> dict[str, Any]: ...

    def after_step(self, record: dict[str, Any], last: int) -> int: ...

    def save(self) -> None: ...

    def stopping(self, stop: list[int]) -> bool: ...
