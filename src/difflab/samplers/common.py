"""Helpers every sampler shares: per-sample noise, progress bars, callbacks.

Owns: ``randn`` (noise drawn from one generator per sample, so sample *i* of a batch equals
the same seed run alone), ``progress`` (a tqdm bar that switches off when stderr is not a
terminal; it lives in ``difflab._progress`` and is re-exported here), and the
``SamplerCallback`` signature.  Knows nothing of algorithms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._progress import progress
from ..parametrization import append_dims

__all__ = [
    "Generators",
    "SamplerCallback",
    "SamplerSpec",
    "append_dims",
    "progress",
    "randn",
    "randn_like",
]

Generators = torch.Generator | Sequence[torch.Generator] | None
# callback(i, t, x_t, x0_pred): called once per step i, right after the model is evaluated at
# the step's starting state: x_t is that state on the model's input scale (the contract's x_t,
# whatever internal variable the sampler uses), t its timestep, x0_pred the x̂0 predicted there.
SamplerCallback = Callable[[int, float, Tensor, Tensor | None], None]
def randn(
    shape: Sequence[int],
    generator: Generators = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise ``[B, ...]``; with a list of generators, row *i* uses the *i*-th.

    Noise is drawn on the generator's device (CPU generators give the same numbers on any
    machine) and moved to ``device``; to a GPU through pinned memory without blocking, so
    that an ancestral sampler's loop never waits for the device.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else device
        noise = torch.randn(tuple(shape), generator=generator, device=gdev, dtype=dtype)
        return _to_device(noise, device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(
            f"got {len(gens)} generators for a batch of {shape[0]}; pass one per sample"
        )
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gens]
    return _to_device(torch.stack(rows), device)


def _to_device(x: Tensor, device: torch.device | str | None) -> Tensor:
    target = torch.device(device) if device is not None else x.device
    if x.device.type == "cpu" and target.type == "cuda":
        # A pageable host-to-device copy waits for the GPU; a pinned one is queued.  The
        # caching host allocator keeps the pinned block until the copy has run.
        return x.pin_memory().to(target, non_blocking=True)
    return x.to(target)


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """``randn`` with the shape, device and (float) dtype of ``x``."""
    return randn(x.shape, generator, device=x.device, dtype=torch.float32).to(x.dtype)


def expand_t(t: float, x: Tensor) -> Tensor:
    """A host-float timestep as the contract's float tensor ``[B]``."""
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function and what ``dl.sample`` needs to know about it.

    :param name: canonical name (``dpmpp_2m``).
    :param fn: ``fn(denoiser, x, levels, *, cond=None, callback=None, generator=None, **opts)``.
    :param order: global convergence order of the deterministic solver on the PF-ODE, as
        tests/samplers/test_convergence.py measures it (1 for DDIM/Euler, 2 for Heun, 2 for
        PNDM/PLMS whose 4th-order weights assume a grid uniform in σ/α).
    :param stochastic: True when it injects fresh noise (ancestral/SDE): needs ``generator``.
    :param nfe: model evaluations for N steps (``lambda n: 2 * n - 1`` for Heun).
    :param default_spacing: the spacing ``dl.sample`` uses when none is given.
    :param aliases: other names (A1111 / ComfyUI display names) that mean this algorithm,
        with the spacing they imply, e.g. ``{"DPM++ 2M Karras": "karras"}`` (None = default).
    :param paper: the citation.
    """

    name: str
    fn: Callable[..., Tensor]
    order: int
    stochastic: bool
    nfe: Callable[[int], int]
    default_spacing: str = "trailing"
    aliases: dict[str, str | None] = field(default_factory=dict)
    paper: str = ""
