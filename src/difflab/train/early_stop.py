"""Early stopping on a validation metric, keeping the best weights.

Owns the patience counter (Prechelt 1998, "Early stopping — but when?": stop once the
watched metric has not improved for ``patience`` evaluations) and its checkpointable
state.  Lower is better for every watched metric (validation loss, FID, KID).  The caller
writes the best weights (``best.safetensors``) when :meth:`EarlyStopping.update` says the
metric improved.  Knows nothing of models or data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["BEST_FILE", "EarlyStopping"]

BEST_FILE = "best.safetensors"  # the EMA weights of the best evaluation so far


@dataclass
class EarlyStopping:
    """Patience counter over a lower-is-better metric.

    :param patience: evaluations without improvement before stopping (>= 1).
    :param min_delta: an improvement must lower the best value by more than this.
    :param best: best value so far (``inf`` before the first evaluation).
    :param best_step: the step of ``best``.
    :param bad: evaluations since the last improvement.
    """

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int = -1
    bad: int = 0

    def update(self, value: float, step: int) -> tuple[bool, bool]:
        """Record the metric at ``step``; returns ``(improved, stop)``.

        A non-finite value never improves.
        """
        if math.isfinite(value) and value < self.best - self.min_delta:
            self.best, self.best_step, self.bad = float(value), int(step), 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state (``inf`` as ``None``) for the checkpoint's meta."""
        best = self.best if math.isfinite(self.best) else None
        return {"best": best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.best_step, self.bad = int(state["best_step"]), int(state["bad"])
