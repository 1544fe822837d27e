"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

Owns :class:`TrainingInterrupted` (raised after the step's checkpoint is saved) and
:func:`stop_on_signals`, the handlers installed while the loop runs.  Knows nothing of
models or checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["TrainingInterrupted", "stop_on_signals"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped training after a step; its checkpoint is saved.

    :param step: the step saved (``--resume`` continues from it).
    :param signum: the signal received.
    :param run_dir: the run directory holding the checkpoint.
    """

    def __init__(self, step: int, signum: int, run_dir: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: checkpoint saved in {run_dir}")
        self.step, self.signum, self.run_dir = step, signum, run_dir


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """While training: SIGINT (Ctrl-C) and SIGTERM append their number to the yielded list,
    which the loop reads after each step (then saves and stops); a second Ctrl-C interrupts
    at once.  The previous handlers come back on exit; off the main thread, nothing changes."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum: int, frame: Any) -> None:
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)
        name = signal.Signals(signum).name
        note = f"\n{name}: saving a checkpoint after this step (Ctrl-C again stops at once)\n"
        with contextlib.suppress(OSError, ValueError, AttributeError):  # e.g. no real stderr
            os.write(sys.stderr.fileno(), note.encode())

    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for sig, old in before.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
