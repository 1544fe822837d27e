"""Finding where a NaN/inf came from, only after one has been seen.

Owns :class:`NonFiniteError` and the diagnosis: the offending micro-batch is re-run with
forward hooks on every module that check ``torch.isfinite(out).all()``; hooks fire in
execution order with children before parents, so the first module reported is the
innermost, earliest one whose output is non-finite.  If the forward pass is clean, the first
parameter with a non-finite gradient is named instead.  The normal training step pays
nothing for this.  Knows nothing of data or optimisers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NonFiniteError", "first_nonfinite_grad", "first_nonfinite_module"]


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient at optimiser step ``step`` (1-based).

    :param step: the optimiser step that produced it.
    :param what: "loss" or "gradient".
    :param module: name of the first module whose output was non-finite (``""`` for the
        model's top level), or ``param:<name>`` for the first non-finite gradient, or None.
    """

    def __init__(self, step: int, what: str, module: str | None) -> None:
        self.step, self.what, self.module = step, what, module
        where = f" first produced by module {module!r}" if module is not None else ""
        super().__init__(f"non-finite {what} at step {step}{where}")


def _first_tensor_nonfinite(out: Any) -> bool:
    if isinstance(out, Tensor):
        return out.is_floating_point() and not bool(torch.isfinite(out).all())
    if isinstance(out, (tuple, list)):
        return any(_first_tensor_nonfinite(o) for o in out)
    if isinstance(out, dict):
        return any(_first_tensor_nonfinite(o) for o in out.values())
    return False


def first_nonfinite_module(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """Call ``run()`` (a forward pass of ``model``) with hooks; name the first bad module.

    :return: the qualified module name (``named_modules``), ``""`` for ``model`` itself, or
        None when every output was finite.
    """
    found: list[str] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not found and _first_tensor_nonfinite(out):
                found.append(name)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """``param:<name>`` of the first parameter whose gradient holds a NaN/inf, else None."""
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"param:{name}"
    return None
