"""Parametrizations: the one module that branches on eps / x0 / v.

Owns: conversions between the network's output and the clean-image estimate x̂0, the noise
estimate ε̂, the velocity v̂ (Salimans & Ho 2022, "Progressive distillation", §4) and the
score (∇log p = -ε/σ, Song et al. 2021); the split of a learned-variance output; and
``Denoiser``, which turns any ``model(x_t, t, **cond)`` into those predictions.

Knows nothing of samplers.  Everything else asks this module for x0, eps, v or the score.

All conversions take the VP coefficients α = √ᾱ_t and σ = √(1-ᾱ_t) (α² + σ² = 1) as
floats or tensors broadcastable to ``x`` and run in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload, runtime_checkable

import torch
from torch import Tensor

from ._validate import check_choice, unknown_message
from .schedules import NoiseSchedule

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")
Variance = Literal["fixedsmall", "fixedlarge", "learned", "learned_range"]
VARIANCES: tuple[str, ...] = ("fixedsmall", "fixedlarge", "learned", "learned_range")
Coef = float | Tensor

# ε̂ → x̂0 divides by α; at zero terminal SNR α = 0 and ε-prediction carries no information
# about x0 there.  As diffusers does for such schedules, α² = 0 is replaced by 2⁻²⁴ in that one
# division, so the first step stays finite (x̂0 is then dominated by the model's error).
_MIN_ALPHA = 2.0**-12


@runtime_checkable
class DenoiserNet(Protocol):
    """The model contract (docs/design.md): ``net(x_t [B, C, H, W], t [B], class_labels [B]
    | None, context [B, L, D] | None, context_mask [B, L] | None) -> [B, C', H, W]`` (C' = C,
    or 2C with learned variances).  Every network difflab ships honours it; samplers, the
    losses and the trainer take any such network."""

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor: ...


@overload
def append_dims(x: Tensor, ndim: int) -> Tensor: ...
@overload
def append_dims(x: float, ndim: int) -> float: ...
def append_dims(x: Coef, ndim: int) -> Coef:
    """Broadcast a per-sample coefficient ``[B]`` to ``[B, 1, ..., 1]``; floats pass through."""
    if isinstance(x, Tensor) and x.ndim > 0:
        return x.reshape(x.shape + (1,) * (ndim - x.ndim))
    return x


def _coefs(alpha: Coef, sigma: Coef, ndim: int) -> tuple[Coef, Coef]:
    return append_dims(alpha, ndim), append_dims(sigma, ndim)


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """x0 = (x_t - σ·ε)/α (Ho et al. 2020, eq. 4 solved for x0)."""
    a, s = _coefs(alpha, sigma, x_t.ndim)
    # Only an exact zero is floored: a tiny positive α (cosine's last step, α ≈ 5e-5) is kept,
    # so that x_t = α·x0 + σ·ε holds for every t > α = 0.
    if isinstance(a, Tensor):
        a = torch.where(a > 0, a, torch.full_like(a, _MIN_ALPHA))
    elif a <= 0:
        a = _MIN_ALPHA
    return (x_t - s * eps) / a


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """ε = (x_t - α·x0)/σ."""
    a, s = _coefs(alpha, sigma, x_t.ndim)
    return (x_t - a * x0) / s


def v_from(x0: Tensor, eps: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """v = α·ε - σ·x0 (Salimans & Ho 2022, §4)."""
    a, s = _coefs(alpha, sigma, x0.ndim)
    return a * eps - s * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """x0 = α·x_t - σ·v (uses α² + σ² = 1)."""
    a, s = _coefs(alpha, sigma, x_t.ndim)
    return a * x_t - s * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """ε = σ·x_t + α·v (uses α² + σ² = 1)."""
    a, s = _coefs(alpha, sigma, x_t.ndim)
    return s * x_t + a * v


def score_from_eps(eps: Tensor, sigma: Coef) -> Tensor:
    """∇_x log p_t(x) = -ε/σ (Song et al. 2021, score SDE)."""
    return -eps / append_dims(sigma, eps.ndim)


def eps_from_score(score: Tensor, sigma: Coef) -> Tensor:
    """ε = -σ·∇_x log p_t(x)."""
    return -score * append_dims(sigma, score.ndim)


def to_x0_eps(
    prediction: str, output: Tensor, x_t: Tensor, alpha: Coef, sigma: Coef
) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from a network output in its own parametrization."""
    if prediction == "eps":
        return x0_from_eps(x_t, output, alpha, sigma), output
    if prediction == "x0":
        return output, eps_from_x0(x_t, output, alpha, sigma)
    if prediction == "v":
        return x0_from_v(x_t, output, alpha, sigma), eps_from_v(x_t, output, alpha, sigma)
    raise ValueError(unknown_message("prediction", prediction, PREDICTIONS))


def from_x0_eps(prediction: str, x0: Tensor, eps: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """The network output in ``prediction`` parametrization that gives (x0, ε)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from(x0, eps, alpha, sigma)
    raise ValueError(unknown_message("prediction", prediction, PREDICTIONS))


def target(prediction: str, x0: Tensor, noise: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """The regression target for training (eps: ε, x0: x0, v: α·ε - σ·x0)."""
    check_choice("prediction", prediction, PREDICTIONS)
    return from_x0_eps(prediction, x0, noise, alpha, sigma)


def split_variance(output: Tensor, variance: str) -> tuple[Tensor, Tensor | None]:
    """Split a learned-variance output ``[B, 2C, ...]`` into (mean part, variance values)."""
    check_choice("variance", variance, VARIANCES)
    if variance in ("learned", "learned_range"):
        if output.shape[1] % 2:
            raise ValueError(
                f"variance={variance!r} needs a model with 2*C output channels, "
                f"got {output.shape[1]}"
            )
        mean, var = output.chunk(2, dim=1)
        return mean, var
    return output, None


@dataclass
class DenoiserOutput:
    """What a denoiser call yields: x̂0 and ε̂ in float32, the raw variance values if learned."""

    x0: Tensor
    eps: Tensor
    var_values: Tensor | None = None


class Denoiser:
    """Wraps ``model(x_t, t, **cond)`` (DESIGN.md's contract) into x̂0 / ε̂ predictions.

    ``denoiser(x_t, t, **cond)`` takes ``x_t`` on the model's input scale and a timestep
    ``t`` (host float, or float tensor ``[B]``) and returns a ``DenoiserOutput``.  The model
    runs in its own dtype; the conversion arithmetic runs in float32.

    :param model: any callable honouring the contract.
    :param schedule: the schedule the model was trained with.
    :param prediction: the model's parametrization: "eps", "x0" or "v".
    :param variance: "fixedsmall"/"fixedlarge" (C outputs) or "learned"/"learned_range" (2C).
    :param model_dtype: dtype the model's inputs are cast to (default: float32).
    """

    def __init__(
        self,
        model: DenoiserNet,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        variance: str = "fixedsmall",
        model_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.schedule = schedule
        self.prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.variance = check_choice("variance", variance, VARIANCES)
        self.model_dtype = model_dtype
        self.nfe = 0  # model evaluations so far (a batched CFG call counts once)

    def coefficients(self, t: float | Tensor, x: Tensor) -> tuple[Coef, Coef]:
        """(α, σ) at ``t``: host floats for a float ``t``, float32 ``[B]`` for a tensor."""
        if isinstance(t, Tensor):
            return self.schedule.alpha(t.to(x.device)), self.schedule.sigma(t.to(x.device))
        return self.schedule.alpha(t), self.schedule.sigma(t)

    def __call__(self, x_t: Tensor, t: float | Tensor, **cond: Any) -> DenoiserOutput:
        alpha, sigma = self.coefficients(t, x_t)
        return self.at(x_t, t, alpha, sigma, **cond)

    def at(
        self, x_t: Tensor, t: float | Tensor, alpha: Coef, sigma: Coef, **cond: Any
    ) -> DenoiserOutput:
        """Like ``__call__`` with (α, σ) given, so a sampler's own tables are used exactly."""
        b = x_t.shape[0]
        t_in = t if isinstance(t, Tensor) else torch.full((b,), float(t), device=x_t.device)
        dtype = self.model_dtype or torch.float32
        out = self.model(x_t.to(dtype), t_in.to(torch.float32), **cond).float()
        self.nfe += 1
        out, var_values = split_variance(out, self.variance)
        if out.shape != x_t.shape:
            raise ValueError(
                f"model output shape {tuple(out.shape)} does not match x_t {tuple(x_t.shape)}"
                + (
                    " (a learned-variance model needs variance='learned' or 'learned_range')"
                    if out.shape[1] == 2 * x_t.shape[1]
                    else ""
                )
            )
        x = x_t.float()
        x0, eps = to_x0_eps(self.prediction, out, x, alpha, sigma)
        return DenoiserOutput(x0=x0, eps=eps, var_values=var_values)
