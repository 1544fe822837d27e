"""Guidance as denoiser wrappers: classifier-free guidance, CFG rescale, guidance interval,
x̂0 thresholding, inpainting by x̂0 replacement.

Owns: ``ClassifierFreeGuidance`` (cond and uncond in one batched forward; w = 0 is exactly
the unconditional prediction and w = 1 exactly the conditional one; optional guidance
rescale φ, Lin et al. 2023 §3.4; optional guidance interval, Kynkäänniemi et al. 2024),
``AdaptiveProjectedGuidance`` (APG, Sadat et al. 2025), ``check_guidance_interval``,
``InpaintX0`` (DDNM's data consistency for a mask, Wang et al. 2023),
``DynamicThresholding`` (Saharia et al. 2022, Imagen §2.3) and ``ClipX0`` (static clipping
of x̂0). Each wraps anything with the ``Denoiser.at`` method and is itself one, so they
compose:
``ClipX0(ClassifierFreeGuidance(Denoiser(model, sched), 5.0, uncond))``.

Knows nothing of samplers; asks ``parametrization`` for every eps/x0/v conversion, so ε̂ is
always recomputed consistently with a modified x̂0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..parametrization import (
    Coef,
    DenoiserOutput,
    append_dims,
    eps_from_x0,
    from_x0_eps,
    to_x0_eps,
)

__all__ = [
    "APG_DEFAULTS",
    "AdaptiveProjectedGuidance",
    "ClassifierFreeGuidance",
    "ClipX0",
    "DenoiserWrapper",
    "DynamicThresholding",
    "InpaintX0",
    "check_apg_options",
    "check_guidance_interval",
    "dynamic_threshold",
    "rescale_cfg",
]


def rescale_cfg(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, "Common diffusion noise schedules...", eq. 15-16).

    x_rescaled = x_cfg·std(x_pos)/std(x_cfg) (eq. 15); x_final = φ·x_rescaled + (1-φ)·x_cfg
    (eq. 16); std over every dimension but the batch.  Same maths as diffusers'
    ``rescale_noise_cfg``.  ``guided``/``cond``: ``[B, ...]`` model outputs.
    """
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_cfg = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_cfg)
    return phi * rescaled + (1 - phi) * guided


def dynamic_threshold(x0: Tensor, percentile: float, max_value: float | None = None) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3) of x̂0 ``[B, ...]``.

    s = max(p-th percentile of |x̂0| per sample, 1) (at most ``max_value`` if given);
    x̂0 ← clamp(x̂0, -s, s)/s.
    """
    b = x0.shape[0]
    s = torch.quantile(x0.abs().reshape(b, -1).float(), percentile, dim=1)  # (B,)
    s = s.clamp(min=1.0, max=max_value)
    s = s.reshape((b,) + (1,) * (x0.ndim - 1)).to(x0.dtype)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def check_guidance_interval(interval: Any) -> tuple[float, float] | None:
    """``(σ_lo, σ_hi)`` with 0 <= σ_lo < σ_hi (σ_hi may be ``inf``) as floats, or None.

    :raises ValueError: for anything else, saying what is allowed.
    """
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance_interval must be two noise levels (sigma_lo, sigma_hi), got {interval!r}"
        ) from None
    if not 0.0 <= lo < hi:  # NaN fails every comparison
        raise ValueError(
            f"guidance_interval needs 0 <= sigma_lo < sigma_hi (sigma_hi may be inf), got "
            f"({lo}, {hi})"
        )
    return lo, hi


def _ve_sigma(alpha: Coef, sigma: Coef) -> Coef:
    """σ/α, the noise level in variance-exploding units (k-diffusion's and EDM's σ)."""
    if isinstance(alpha, Tensor) or isinstance(sigma, Tensor):
        return torch.as_tensor(sigma) / torch.as_tensor(alpha)  # α = 0 gives inf
    return float(sigma) / float(alpha) if alpha else float("inf")


class DenoiserWrapper:
    """Base for wrappers: forwards every attribute (``nfe``, ``schedule``, ``prediction``...)
    to the wrapped denoiser and implements ``__call__`` through ``at``."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (e.g. during unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, x_t: Tensor, t: float | Tensor, **cond: Any) -> DenoiserOutput:
        alpha, sigma = self.inner.coefficients(t, x_t)
        return self.at(x_t, t, alpha, sigma, **cond)

    def at(
        self, x_t: Tensor, t: float | Tensor, alpha: Coef, sigma: Coef, **cond: Any
    ) -> DenoiserOutput:
        """x̂0 / ε̂ at ``x_t`` whose level is (α, σ); see ``Denoiser.at``."""
        raise NotImplementedError


def _twice(v: Coef | float | Tensor) -> Coef | float | Tensor:
    """A per-sample value ``[B]`` repeated for the doubled batch; host floats pass through."""
    if isinstance(v, Tensor) and v.ndim > 0:
        return torch.cat([v, v])
    return v


def _batch_conds(
    cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int
) -> dict[str, Any] | None:
    """cond and uncond stacked along the batch (cond first), or None when they can't be.

    Tensors are concatenated (an uncond tensor of batch 1 is expanded, e.g. one negative
    prompt for the whole batch); equal non-tensor values pass through once.
    """
    if set(cond) != set(uncond):
        return None
    out: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Tensor) and isinstance(u, Tensor):
            if c.ndim == 0 or u.ndim == 0 or c.shape[0] != batch:
                return None
            if u.shape[0] == 1 and batch > 1:
                u = u.expand(batch, *u.shape[1:])
            if u.shape != c.shape or u.dtype != c.dtype:
                return None
            out[key] = torch.cat([c, u.to(c.device)])
        elif isinstance(c, Tensor) or isinstance(u, Tensor):
            return None
        else:
            try:
                same = bool(c == u)
            except Exception:  # noqa: BLE001 - anything not comparable is not batchable
                return None
            if not same:
                return None
            out[key] = c
    return out


class ClassifierFreeGuidance(DenoiserWrapper):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) in one batched model call.

    ε̃ = ε̂(x, ∅) + w·(ε̂(x, c) - ε̂(x, ∅)); with x̂0 and ε̂ both affine in the network output
    at fixed x_t, the same combination is applied to x̂0, so they stay consistent.  w = 0
    returns the unconditional prediction and w = 1 the conditional one, each from a single
    un-batched call (bit-exact).  Cond and uncond run as one forward over the doubled batch
    (tensor values in the cond dicts concatenated, cond first) when their keys and shapes
    match, else as two calls.  A learned variance is taken from the conditional half.

    :param inner: a ``Denoiser`` (or wrapper).
    :param scale: w.
    :param uncond: the unconditional / negative conditioning dict (e.g. the null class).
    :param rescale: φ ∈ [0, 1] of guidance rescale (Lin et al. 2023, eq. 16), applied to the
        model output in its own parametrization, as diffusers does.
    :param interval: ``(σ_lo, σ_hi)``: guide only at noise levels σ_lo < σ <= σ_hi, with σ =
        σ_VP/α_VP in variance-exploding units (Kynkäänniemi et al. 2024, "Applying guidance in
        a limited interval improves sample and distribution quality in diffusion models",
        eq. 2; their EDM2 ImageNet-512 interval is (0.28, 5.42]); elsewhere the conditional
        prediction alone, from one un-batched call. ``None``: guide at every level.
    """

    def __init__(
        self,
        inner: Any,
        scale: float,
        uncond: Mapping[str, Any] | None = None,
        *,
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
    ):
        super().__init__(inner)
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {rescale}")
        self.scale = float(scale)
        self.uncond = dict(uncond or {})
        self.rescale = float(rescale)
        self.interval = check_guidance_interval(interval)

    def at(
        self, x_t: Tensor, t: float | Tensor, alpha: Coef, sigma: Coef, **cond: Any
    ) -> DenoiserOutput:
        w: float | Tensor = self.scale
        if self.interval is not None:
            lo, hi = self.interval
            level = _ve_sigma(alpha, sigma)
            if not isinstance(level, Tensor):  # a host level: skip the unconditional call
                if not lo < level <= hi:
                    return self.inner.at(x_t, t, alpha, sigma, **cond)
            else:  # per-sample levels: w inside the interval, 1 (conditional) outside
                inside = (level > lo) & (level <= hi)
                w = append_dims(torch.where(inside, self.scale, 1.0).to(x_t.device), x_t.ndim)
        if isinstance(w, float) and w == 1.0:
            return self.inner.at(x_t, t, alpha, sigma, **cond)
        if isinstance(w, float) and w == 0.0:
            return self.inner.at(x_t, t, alpha, sigma, **self.uncond)
        b = x_t.shape[0]
        both = _batch_conds(cond, self.uncond, b)
        if both is not None:
            out = self.inner.at(
                torch.cat([x_t, x_t]), _twice(t), _twice(alpha), _twice(sigma), **both
            )
            c = DenoiserOutput(out.x0[:b], out.eps[:b], _half(out.var_values, b))
            u = DenoiserOutput(out.x0[b:], out.eps[b:], None)
        else:
            c = self.inner.at(x_t, t, alpha, sigma, **cond)
            u = self.inner.at(x_t, t, alpha, sigma, **self.uncond)
        return self._combine(c, u, w, x_t, alpha, sigma)

    def _combine(
        self,
        c: DenoiserOutput,
        u: DenoiserOutput,
        w: float | Tensor,
        x_t: Tensor,
        alpha: Coef,
        sigma: Coef,
    ) -> DenoiserOutput:
        """The guided prediction from the conditional and unconditional ones."""
        x0 = u.x0 + w * (c.x0 - u.x0)
        eps = u.eps + w * (c.eps - u.eps)
        if self.rescale > 0.0:
            pred = self.inner.prediction
            guided = from_x0_eps(pred, x0, eps, alpha, sigma)
            guided = rescale_cfg(guided, from_x0_eps(pred, c.x0, c.eps, alpha, sigma), self.rescale)
            x0, eps = to_x0_eps(pred, guided, x_t.float(), alpha, sigma)
        return DenoiserOutput(x0=x0, eps=eps, var_values=c.var_values)


def _half(v: Tensor | None, b: int) -> Tensor | None:
    return None if v is None else v[:b]


# η = 0 as the paper recommends; no momentum and no norm cap by default: the paper's β = -0.5
# needs a cap r on schedules whose first level is very noisy (x̂0 differences there are large and
# negative momentum carries them into every later step; measured in docs/evaluation.md).
APG_DEFAULTS: dict[str, float] = {"eta": 0.0, "momentum": 0.0, "norm_threshold": 0.0}


def check_apg_options(apg: Mapping[str, Any]) -> dict[str, float]:
    """APG's options with ``APG_DEFAULTS`` filled in, as floats.

    :raises ValueError: for an unknown key or a negative ``norm_threshold``.
    """
    unknown = sorted(set(apg) - set(APG_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown APG option(s) {unknown}; allowed: {', '.join(sorted(APG_DEFAULTS))}"
        )
    opts = {k: float(v) for k, v in {**APG_DEFAULTS, **apg}.items()}
    if opts["norm_threshold"] < 0:
        raise ValueError(f"APG norm_threshold must be >= 0 (0 = off), got {opts['norm_threshold']}")
    return opts


class AdaptiveProjectedGuidance(ClassifierFreeGuidance):
    """Adaptive projected guidance, APG (Sadat, Hilliges & Weber 2025, "Eliminating
    oversaturation and artifacts of high guidance scales in diffusion models", Alg. 1).

    In the denoised (x̂0) space, with Δ = x̂0(c) - x̂0(∅) per sample:
    momentum Δ ← Δ + β·Δ_prev (a running sum over the calls of one sampling run; the paper
    uses β = -0.5); the norm of Δ capped at r (r = 0: no cap); Δ split into Δ∥, its projection on
    x̂0(c), and Δ⊥ = Δ - Δ∥; then x̂0 = x̂0(c) + (w - 1)·(Δ⊥ + η·Δ∥) and ε̂ recomputed.
    η = 1, β = 0, r = 0 is classifier-free guidance exactly (up to rounding); the default η = 0
    drops the parallel part, which the paper finds drives the oversaturation of high w.
    Norms and projections run over all dimensions but the batch, in float32.  Keeps the
    guidance interval of :class:`ClassifierFreeGuidance`; guidance rescale is an alternative.

    :param apg: ``eta`` (η), ``momentum`` (β), ``norm_threshold`` (r); missing keys take
        ``APG_DEFAULTS``.
    """

    def __init__(
        self,
        inner: Any,
        scale: float,
        uncond: Mapping[str, Any] | None = None,
        *,
        interval: tuple[float, float] | None = None,
        **apg: float,
    ):
        super().__init__(inner, scale, uncond, interval=interval)
        opts = check_apg_options(apg)
        self.eta, self.momentum = opts["eta"], opts["momentum"]
        self.norm_threshold = opts["norm_threshold"]
        self._running: Tensor | None = None

    def _combine(
        self,
        c: DenoiserOutput,
        u: DenoiserOutput,
        w: float | Tensor,
        x_t: Tensor,
        alpha: Coef,
        sigma: Coef,
    ) -> DenoiserOutput:
        diff = (c.x0 - u.x0).float()
        if self.momentum != 0.0 and self._running is not None:
            diff = diff + self.momentum * self._running
        self._running = diff
        dims = list(range(1, diff.ndim))
        if self.norm_threshold > 0:
            norm = torch.linalg.vector_norm(diff, dim=dims, keepdim=True)
            diff = diff * (self.norm_threshold / norm).clamp(max=1.0)
        unit = torch.nn.functional.normalize(c.x0.float().flatten(1), dim=1).view_as(diff)
        parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit
        update = (diff - parallel) + self.eta * parallel
        x0 = c.x0 + (w - 1) * update
        return DenoiserOutput(x0, eps_from_x0(x_t.float(), x0, alpha, sigma), c.var_values)


class DynamicThresholding(DenoiserWrapper):
    """Imagen's dynamic thresholding of x̂0 (Saharia et al. 2022, §2.3), ε̂ recomputed.

    :param percentile: p in (0, 1], the per-sample percentile of |x̂0| (Imagen: 0.995).
    :param max_value: optional upper bound on s (diffusers' ``sample_max_value``).
    """

    def __init__(self, inner: Any, percentile: float = 0.995, max_value: float | None = None):
        super().__init__(inner)
        if not 0.0 < percentile <= 1.0:
            raise ValueError(f"dynamic_threshold percentile must lie in (0, 1], got {percentile}")
        if max_value is not None and max_value < 1.0:
            raise ValueError(f"dynamic threshold max_value must be >= 1, got {max_value}")
        self.percentile = float(percentile)
        self.max_value = max_value

    def at(
        self, x_t: Tensor, t: float | Tensor, alpha: Coef, sigma: Coef, **cond: Any
    ) -> DenoiserOutput:
        out = self.inner.at(x_t, t, alpha, sigma, **cond)
        x0 = dynamic_threshold(out.x0, self.percentile, self.max_value)
        return DenoiserOutput(x0, eps_from_x0(x_t.float(), x0, alpha, sigma), out.var_values)


class ClipX0(DenoiserWrapper):
    """Static clipping of x̂0 to [-limit, limit] (Ho et al. 2020's sampler), ε̂ recomputed."""

    def __init__(self, inner: Any, limit: float = 1.0):
        super().__init__(inner)
        if not limit > 0:
            raise ValueError(f"clip_x0 limit must be positive, got {limit}")
        self.limit = float(limit)

    def at(
        self, x_t: Tensor, t: float | Tensor, alpha: Coef, sigma: Coef, **cond: Any
    ) -> DenoiserOutput:
        out = self.inner.at(x_t, t, alpha, sigma, **cond)
        x0 = out.x0.clamp(-self.limit, self.limit)
        return DenoiserOutput(x0, eps_from_x0(x_t.float(), x0, alpha, sigma), out.var_values)


class InpaintX0(DenoiserWrapper):
    """Inpainting with any sampler by replacing x̂0 outside the hole:
    x̂0 ← (1 - m)·y + m·x̂0, ε̂ recomputed.

    This is the data-consistency step of DDNM (Wang et al. 2023, "Zero-shot image
    restoration using denoising diffusion null-space model", eq. 13) for the masking
    operator A = 1 - m: A†y is the kept pixels of ``image`` and (I - A†A)·x̂0 the prediction
    inside the hole.  Along the sampler's path the kept region then stays x = α·y + σ·ε on
    the start noise's own trajectory, and the result reproduces it exactly.

    :param image: y, ``[B or 1, C, ...]``: the pixels (or latents) to keep.
    :param mask: ``[B or 1, 1 or C, ...]`` in [0, 1]: 1 where to generate, 0 where to keep
        (the convention of diffusers' and A1111's inpainting); values between blend.
    :raises ValueError: when the mask leaves [0, 1] or the two do not broadcast.
    """

    def __init__(self, inner: Any, image: Tensor, mask: Tensor):
        super().__init__(inner)
        if not isinstance(image, Tensor) or not isinstance(mask, Tensor):
            raise ValueError("inpainting needs inpaint_image and inpaint_mask tensors")
        image, mask = image.float(), mask.float()
        try:
            torch.broadcast_shapes(image.shape, mask.shape)
        except RuntimeError:
            raise ValueError(
                f"inpaint_mask of shape {tuple(mask.shape)} does not broadcast against "
                f"inpaint_image {tuple(image.shape)}; use [B or 1, 1 or C, H, W]"
            ) from None
        if mask.numel() and not bool(((mask >= 0) & (mask <= 1)).all()):  # once, before sampling
            raise ValueError("inpaint_mask must lie in [0, 1] (1 = generate, 0 = keep)")
        self.image, self.mask = image, mask
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _image_and_mask(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(image, mask)`` on ``device``, copied there once (not in every step)."""
        if device not in self._on:
            self._on[device] = (self.image.to(device), self.mask.to(device))
        return self._on[device]

    def at(
        self, x_t: Tensor, t: float | Tensor, alpha: Coef, sigma: Coef, **cond: Any
    ) -> DenoiserOutput:
        out = self.inner.at(x_t, t, alpha, sigma, **cond)
        image, mask = self._image_and_mask(x_t.device)
        keep = 1 - mask
        # x̂0 and ε̂ are both affine in x̂0 at fixed x_t, so each takes the same blend; written
        # this way the hole (m = 1) keeps the network's own output bit for bit.
        x0 = mask * out.x0 + keep * image
        eps = mask * out.eps + keep * eps_from_x0(x_t.float(), image, alpha, sigma)
        return DenoiserOutput(x0, eps, out.var_values)
