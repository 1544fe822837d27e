"""The trainer's seed streams and the caller's global RNG.

Owns :func:`subseed` (distinct, reproducible generator seeds derived from ``config.seed``,
one per independent stream: shared noise 0, per-rank aux ``1 + 2·rank`` and data
``2 + 2·rank``, importance sampler 3, text encoder init 4, adapter init 5, validation split
50 and noise 51, data mixture 60, dropout ``100 + rank``), :class:`RunGenerators` (the
generators built from them) and :func:`preserve_global_rng`.
Knows nothing of models or of the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["RunGenerators", "preserve_global_rng", "subseed"]


def subseed(seed: int, stream: int) -> int:
    """Distinct, reproducible generator seeds for the trainer's independent streams."""
    return (seed * 1_000_003 + 7919 * stream) % (2**63)


@dataclass
class RunGenerators:
    """A run's generators: ``shared`` by every rank (condition dropout, timesteps, noise of
    the global batch), and per rank ``aux`` (offset noise, input perturbation) and ``data``
    (data flips)."""

    shared: torch.Generator
    aux: torch.Generator
    data: torch.Generator

    @classmethod
    def from_seed(cls, seed: int, rank: int) -> RunGenerators:
        """The generators of ``rank`` in a run seeded with ``seed``."""
        return cls(
            torch.Generator().manual_seed(subseed(seed, 0)),
            torch.Generator().manual_seed(subseed(seed, 1 + 2 * rank)),
            torch.Generator().manual_seed(subseed(seed, 2 + 2 * rank)),
        )


@contextlib.contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Restore torch's global RNG state (CPU and every CUDA device) on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
