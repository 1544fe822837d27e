"""Early stopping on a validation metric, keeping the best weights.

Owns the patience counter (Prechelt 1998, "Early stopping — but when?": stop once the
watched metric has not improved for ``patience`` evaluations) and its checkpointable
state.  Lower is better for every watched metric (validation loss, FID, KID).
:meth:`EarlyStopping.observe` reads the metric from a validation / evaluation record and
writes the best weights (``best.safetensors``) when it improved.  Knows nothing of models
or data (the weights come as a state dict).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

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

    def observe(
        self, record: dict[str, Any], metric: str, step: int,
        weights: Callable[[], dict[str, Tensor]], run_dir: Path,
    ) -> bool:  # fmt: skip
        """:meth:`update` with ``record[metric]`` (a clear error when it was not measured);
        when it improved, ``weights()`` are written to ``run_dir / BEST_FILE``.  Returns
        whether patience ran out."""
        if metric not in record:
            raise ValueError(
                f"train.early_stop_metric={metric!r} is not among the measured metrics "
                f"({', '.join(k for k in record if k not in ('step', 'event'))}); add it "
                "to train.eval_metrics or choose another"
            )
        improved, stop = self.update(float(record[metric]), step)
        if improved:
            from safetensors.torch import save_file

            tmp = run_dir / (BEST_FILE + ".tmp")
            meta = {"step": str(step), metric: repr(self.best)}
            save_file(weights(), str(tmp), metadata=meta)
            tmp.replace(run_dir / BEST_FILE)
        return stop

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state (``inf`` as ``None``) for the checkpoint's meta."""
        best = self.best if math.isfinite(self.best) else None
        return {"best": best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.best_step, self.bad = int(state["best_step"]), int(state["bad"])
