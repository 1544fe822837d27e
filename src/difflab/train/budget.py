"""A run's time budget (``train.max_time``) and the progress the schedules follow.

Owns the parsing of durations (``90s``, ``15m``, ``2h``, ``1h30m``), the training time spent
(carried across resumes in the checkpoint) and the *effective step*: the step a
step-budgeted run would be at after the same fraction of its budget,
``max(step, elapsed / max_time * max_steps)``.  The learning-rate warm-up and decay read
the effective step, so a run stopped by the clock ends annealed (LR factor 0 under cosine)
exactly as one stopped by ``max_steps`` does; without ``max_time`` the effective step is the
step and nothing changes.  The clock is injected (``time.monotonic`` by default) so tests are
deterministic.  Knows nothing of models or data.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

__all__ = ["TimeBudget", "format_duration", "parse_duration"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value``: a number of seconds or ``<n><unit>...`` with units s, m, h, d.

    >>> parse_duration("1h30m"), parse_duration("90s"), parse_duration(15)
    (5400.0, 90.0, 15.0)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = _PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(
                f"config key 'train.max_time' must be a duration such as 90s, 15m, 2h or "
                f"1h30m (or a number of seconds), got {value!r}"
            )
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"config key 'train.max_time' must be > 0 seconds, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (rounded to whole seconds)."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class TimeBudget:
    """Training time spent against ``max_time`` seconds.

    :param max_time: the budget in seconds.
    :param max_steps: the step budget the effective step is measured in.
    :param clock: seconds from any origin (``time.monotonic``); injected by tests.
    :param spent: seconds already spent by earlier sessions (a resumed run).
    """

    def __init__(
        self,
        max_time: float,
        max_steps: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        spent: float = 0.0,
    ) -> None:
        self.max_time, self.max_steps = float(max_time), int(max_steps)
        self.clock = clock
        self.spent = float(spent)
        self._start: float | None = None

    def start(self, spent: float | None = None) -> None:
        """Start (or restart after a resume, with the saved ``spent``) the clock."""
        if spent is not None:
            self.spent = float(spent)
        self._start = self.clock()

    @property
    def elapsed(self) -> float:
        """Seconds of training so far, earlier sessions included."""
        now = 0.0 if self._start is None else self.clock() - self._start
        return self.spent + now

    @property
    def fraction(self) -> float:
        """Share of the time budget used, in [0, 1]."""
        return min(1.0, self.elapsed / self.max_time)

    @property
    def exhausted(self) -> bool:
        """True once the budget is spent."""
        return self.elapsed >= self.max_time

    @property
    def remaining(self) -> float:
        """Seconds left."""
        return max(0.0, self.max_time - self.elapsed)

    def effective_step(self, step: float) -> float:
        """``max(step, fraction * max_steps)``: where the schedules stand."""
        return max(float(step), self.fraction * self.max_steps)
