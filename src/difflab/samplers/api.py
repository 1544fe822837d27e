"""The front door: ``dl.sample`` and ``dl.img2img``.

Owns: turning user arguments (model, schedule, sampler name or alias, steps, spacing,
guidance, inpainting, thresholding, noise, generators, callback, progress) into one explicit
``NoiseLevels`` sequence, one denoiser (with its guidance wrappers) and one call of the
sampler function.  Knows nothing of the algorithms' maths (they live in their modules and
are found through the registry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..parametrization import Denoiser, DenoiserNet
from ..schedules import NoiseLevels, NoiseSchedule
from .common import Generators, SamplerCallback, SamplerSpec, randn
from .common import progress as progress_bar
from .guidance import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClipX0,
    DynamicThresholding,
    InpaintX0,
    check_apg_options,
    check_guidance_interval,
)
from .registry import SAMPLERS, check_options

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_SAMPLER",
    "DEFAULT_SPACING",
    "DEFAULT_SPACING_OPTIONS",
    "DEFAULT_STEPS",
    "Img2ImgResult",
    "img2img",
    "sample",
]

# ``sampler=None``: the configuration with the lowest probability-flow-ODE error at NFE 10
# and 20 in bench/samplers.py (exact denoiser of a Gaussian mixture; docs/samplers.md):
# UniPC-3 on Karras et al.'s eq. 5 grid with ρ = -10, i.e. uniform in σ^(-1/10) = SNR^(1/20).
# Negative ρ puts the same steps as ``logsnr`` (the limit ρ -> ±∞) a little further apart at
# high noise, where x̂0 barely changes, and closer together where it does; at NFE 10 it
# halves UniPC-3's error against ``logsnr`` on the benchmark (docs/samplers.md).  The
# spacing options apply only when ``spacing`` is not given.  A sampler named explicitly
# uses its own defaults (spacing: ``spec.default_spacing``).
DEFAULT_SAMPLER = "unipc"
DEFAULT_SPACING = "karras"
DEFAULT_SPACING_OPTIONS: dict[str, Any] = {"rho": -10.0}
DEFAULT_OPTIONS: dict[str, Any] = {"order": 3, "variant": "bh1"}
DEFAULT_STEPS = 20

# Options of ``NoiseSchedule.timesteps`` that may be passed through ``**sampler_options``.
_SPACING_OPTIONS = ("rho", "sigma_min", "sigma_max", "steps_offset")
# Samplers whose last step may end at a timestep's noise level instead of the clean one
# (``final_timestep``; diffusers' DDPM/DDIM/PNDM schedulers with ``set_alpha_to_one=False``).
_FINAL_TIMESTEP_SAMPLERS = frozenset({"ddpm", "ddim", "pndm", "plms"})


@dataclass
class _Plan:
    spec: SamplerSpec
    denoiser: Any
    levels: NoiseLevels
    options: dict[str, Any]


def _plan(
    model: DenoiserNet,
    *,
    schedule: NoiseSchedule | None,
    sampler: str | SamplerSpec | None,
    steps: int | None,
    prediction: str,
    variance: str,
    spacing: str | Sequence[float] | NoiseLevels | None,
    eta: float | None,
    guidance_scale: float,
    guidance_rescale: float,
    guidance_interval: tuple[float, float] | None,
    apg: Mapping[str, float] | None,
    inpaint: tuple[Tensor | None, Tensor | None],
    uncond: Mapping[str, Any] | None,
    dynamic_threshold: float | None,
    clip_x0: bool | float | None,
    model_dtype: torch.dtype | None,
    sampler_options: dict[str, Any],
    formulation: Any = None,
) -> _Plan:
    """Resolve every argument into (spec, wrapped denoiser, levels, sampler options)."""
    from ..formulations import formulation_from_config

    form = formulation_from_config(formulation)
    if schedule is None and form is not None:
        schedule = form.schedule
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if sampler is None:  # the recommended configuration; explicit arguments still win
        spec, implied = SAMPLERS.resolve(DEFAULT_SAMPLER)
        implied = DEFAULT_SPACING if spacing is None else None
        options = {**DEFAULT_OPTIONS, **sampler_options}
        if spacing is None:
            options = {**DEFAULT_SPACING_OPTIONS, **options}
    else:
        spec, implied = SAMPLERS.resolve(sampler)
        options = dict(sampler_options)
    spacing_kwargs = {k: options.pop(k) for k in _SPACING_OPTIONS if k in options}
    final_timestep = options.pop("final_timestep", None)
    if final_timestep is not None and spec.name not in _FINAL_TIMESTEP_SAMPLERS:
        raise ValueError(
            f"final_timestep applies to {', '.join(sorted(_FINAL_TIMESTEP_SAMPLERS))} (diffusers' "
            f"set_alpha_to_one=False), not to {spec.name!r}"
        )
    if eta is not None:
        # eta = 0 asks for exactly what a deterministic sampler without ``eta`` does.
        if "eta" in _accepted(spec) or eta != 0 or spec.stochastic:
            options["eta"] = eta
    check_options(spec, options)

    if isinstance(spacing, NoiseLevels):  # explicit levels: model times and λ given apart
        if spacing_kwargs or final_timestep is not None:
            named = sorted(spacing_kwargs) + ([] if final_timestep is None else ["final_timestep"])
            raise ValueError(
                f"{named} apply to named spacings or timestep lists, not to explicit NoiseLevels"
            )
        if steps is not None and steps != len(spacing):
            raise ValueError(f"steps={steps} but the NoiseLevels have {len(spacing)} steps")
        levels = spacing
    elif isinstance(spacing, str) or spacing is None:
        if spacing is not None and implied is not None and spacing != implied:
            raise ValueError(
                f"sampler {sampler!r} implies spacing {implied!r} but spacing={spacing!r} "
                f"was given; pass the plain sampler name {spec.name!r} with your spacing"
            )
        chosen = spacing or implied or spec.default_spacing
        n = DEFAULT_STEPS if steps is None else steps
        timesteps = schedule.timesteps(n, chosen, **spacing_kwargs)
    else:
        if spacing_kwargs:
            raise ValueError(
                f"{sorted(spacing_kwargs)} apply to named spacings, not a custom timestep list"
            )
        timesteps = schedule.timesteps(steps, list(spacing))  # checks order and length
    if not isinstance(spacing, NoiseLevels):
        levels = schedule.noise_levels(timesteps, final_timestep=final_timestep)

    if isinstance(model, Denoiser):
        den: Any = model
    elif form is not None:  # an edm / flow network: its own input scaling and output
        den = form.denoiser(model, model_dtype)
    else:
        den = Denoiser(model, schedule, prediction, variance, model_dtype)
    if guidance_scale != 1.0:
        if uncond is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs uncond= (the unconditional / negative "
                "conditioning, e.g. {'class_labels': null_class})"
            )
        if apg is not None and guidance_rescale != 0.0:
            raise ValueError("guidance_rescale applies to plain CFG; pass it or apg, not both")
        if apg is not None:
            den = AdaptiveProjectedGuidance(
                den, guidance_scale, uncond, interval=guidance_interval, **apg
            )
        else:
            den = ClassifierFreeGuidance(
                den, guidance_scale, uncond, rescale=guidance_rescale, interval=guidance_interval
            )
    else:  # w = 1 is the conditional prediction at every level: nothing to rescale or limit
        if guidance_rescale != 0.0 and not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
        check_guidance_interval(guidance_interval)
        if apg is not None:
            check_apg_options(apg)
    image, mask = inpaint
    if (image is None) != (mask is None):
        raise ValueError("inpainting needs both inpaint_image and inpaint_mask")
    if image is not None:
        den = InpaintX0(den, image, mask)  # type: ignore[arg-type]
    if dynamic_threshold is not None and clip_x0:
        raise ValueError("pass either dynamic_threshold or clip_x0, not both")
    if dynamic_threshold is not None:
        den = DynamicThresholding(den, float(dynamic_threshold))
    elif clip_x0:
        den = ClipX0(den, 1.0 if clip_x0 is True else float(clip_x0))
    return _Plan(spec, den, levels, options)


def _accepted(spec: SamplerSpec) -> set[str]:
    from .registry import sampler_options

    accepted = sampler_options(spec)
    return set() if accepted is None else set(accepted)


def _device_of(model: Any, noise: Tensor | None) -> torch.device:
    if noise is not None:
        return noise.device
    inner = getattr(model, "model", model)
    params = getattr(inner, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _run(
    plan: _Plan,
    x: Tensor,
    *,
    cond: Mapping[str, Any] | None,
    callback: SamplerCallback | None,
    generator: Generators,
    progress: bool | None,
) -> Tensor:
    """Call the sampler once over ``plan.levels``, with a progress bar fed by the callback."""
    bar = progress_bar(
        range(len(plan.levels)),
        total=len(plan.levels),
        desc=plan.spec.name,
        disable=None if progress is None else not progress,
    )

    def step(i: int, t: float, x_t: Tensor, x0: Tensor | None) -> None:
        bar.update(1)  # type: ignore[attr-defined]
        if callback is not None:
            callback(i, t, x_t, x0)

    try:
        return plan.spec.fn(
            plan.denoiser,
            x,
            plan.levels,
            cond=dict(cond) if cond else None,
            callback=step,
            generator=generator,
            **plan.options,
        )
    finally:
        bar.close()  # type: ignore[attr-defined]


def _check_generator(generator: Generators, batch: int) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        gens = list(generator)
        if len(gens) != batch:
            raise ValueError(
                f"got {len(gens)} generators for a batch of {batch}; pass one per sample"
            )


def sample(
    model: DenoiserNet,
    shape: Sequence[int] | None = None,
    *,
    schedule: NoiseSchedule | None = None,
    sampler: str | SamplerSpec | None = None,
    steps: int | None = None,
    prediction: str = "eps",
    variance: str = "fixedsmall",
    spacing: str | Sequence[float] | NoiseLevels | None = None,
    eta: float | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    apg: Mapping[str, float] | None = None,
    inpaint_image: Tensor | None = None,
    inpaint_mask: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    noise: Tensor | None = None,
    generator: Generators = None,
    callback: SamplerCallback | None = None,
    dynamic_threshold: float | None = None,
    clip_x0: bool | float | None = None,
    progress: bool | None = None,
    model_dtype: torch.dtype | None = None,
    enable_grad: bool = False,
    formulation: Any = None,
    **sampler_options: Any,
) -> Tensor:
    """Draw samples ``[B, ...]`` from ``model`` (DESIGN.md's contract) with a named sampler.

    The start state is ``noise`` (unit variance; drawn from ``generator`` if not given, one
    generator per sample for a list) at the first level of ``schedule.timesteps(steps,
    spacing)``, as DDPM/DDIM do; the result is the clean sample.

    :param model: ``model(x_t, t, **cond)`` or a ready ``Denoiser``.
    :param shape: batch shape ``[B, C, ...]``; optional when ``noise`` is given.
    :param sampler: a name in ``dl.SAMPLERS`` or an alias ("DPM++ 2M Karras", "Euler a");
        None: the benchmark's best (``DEFAULT_SAMPLER`` with ``DEFAULT_OPTIONS``, on
        ``DEFAULT_SPACING`` with ``DEFAULT_SPACING_OPTIONS`` unless ``spacing`` is given).
    :param steps: number of steps (None: 20, or the length of a custom ``spacing`` list).
    :param spacing: a spacing name or a strictly decreasing timestep list; None: the spacing
        the alias implies, else the sampler's default.  Or explicit ``NoiseLevels``, whose
        model timesteps and noise levels are given apart (diffusers' Karras sigmas at rounded
        timesteps; ``difflab.interop.scheduler.sampling_plan`` builds them).
    :param eta: stochasticity, only for samplers that take it (DDIM, ancestral, SDE);
        ``eta=0`` is also accepted by deterministic samplers.
    :param guidance_scale: CFG weight w (1 = plain conditional); needs ``uncond`` if not 1.
    :param guidance_rescale: φ of Lin et al. 2023 (0 = off).
    :param guidance_interval: ``(σ_lo, σ_hi)``: guide only at noise levels σ_lo < σ/α <= σ_hi
        (Kynkäänniemi et al. 2024), the conditional prediction alone elsewhere; None: every
        level.
    :param apg: adaptive projected guidance in place of plain CFG (Sadat et al. 2025):
        ``{}`` for the defaults or any of ``eta``, ``momentum``, ``norm_threshold``
        (``AdaptiveProjectedGuidance``); None: plain CFG.
    :param inpaint_image: with ``inpaint_mask``: inpainting by x̂0 replacement (DDNM, Wang et
        al. 2023): the sample keeps ``inpaint_image`` where the mask is 0 and generates
        where it is 1 (``[B or 1, 1 or C, ...]``), with any sampler.
    :param dynamic_threshold: Imagen's percentile p (e.g. 0.995), or None.
    :param clip_x0: True (clip x̂0 to [-1, 1]), a float limit, or None.
    :param progress: force the progress bar on/off (None: on when stderr is a terminal).
    :param formulation: ``"ddpm"`` / None (the default: ``model`` is a ``prediction``
        network of ``schedule``), ``"edm"``, ``"flow"`` or a ``difflab.formulations``
        object: the network is converted exactly into the x̂0 / ε̂ denoiser every sampler
        takes (``FormulationDenoiser``), and ``schedule`` defaults to the formulation's
        sampling schedule (``spacing="karras"`` walks EDM's σ grid, ``trailing`` a flow's
        shifted uniform time grid).
    :param enable_grad: differentiate through sampling (gradients reach the model's weights,
        ``noise`` and the conditioning); off by default, so no autograd graph is kept over
        the steps, as k-diffusion's and diffusers' samplers do.
    :param sampler_options: options of the sampler function (``s_churn=`` ...) and of the
        spacing (``rho``, ``sigma_min``, ``sigma_max``, ``steps_offset``), and
        ``final_timestep`` (DDPM/DDIM/PNDM end at that timestep's noise level instead of
        the clean one, as diffusers' schedulers do with ``set_alpha_to_one=False``); unused
        ones raise.
    """
    if noise is None and shape is None:
        raise ValueError("pass shape= or noise=")
    if noise is not None and shape is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={tuple(shape)}")
    plan = _plan(
        model,
        schedule=schedule,
        sampler=sampler,
        steps=steps,
        prediction=prediction,
        variance=variance,
        spacing=spacing,
        eta=eta,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        guidance_interval=guidance_interval,
        apg=apg,
        inpaint=(inpaint_image, inpaint_mask),
        uncond=uncond,
        dynamic_threshold=dynamic_threshold,
        clip_x0=clip_x0,
        model_dtype=model_dtype,
        sampler_options=sampler_options,
        formulation=formulation,
    )
    if noise is None:
        assert shape is not None
        x = randn(shape, generator, device=_device_of(model, None))
    else:
        x = noise.float()
    _check_generator(generator, x.shape[0])
    with torch.set_grad_enabled(enable_grad):
        return _run(plan, x, cond=cond, callback=callback, generator=generator, progress=progress)


@dataclass
class Img2ImgResult:
    """What ``img2img`` returns: the images and the timesteps actually denoised through."""

    images: Tensor
    timesteps: list[float]


def img2img(
    model: DenoiserNet,
    x0: Tensor,
    *,
    strength: float,
    schedule: NoiseSchedule | None = None,
    sampler: str | SamplerSpec | None = None,
    steps: int | None = None,
    prediction: str = "eps",
    variance: str = "fixedsmall",
    spacing: str | Sequence[float] | NoiseLevels | None = None,
    eta: float | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    apg: Mapping[str, float] | None = None,
    inpaint_image: Tensor | None = None,
    inpaint_mask: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    noise: Tensor | None = None,
    generator: Generators = None,
    callback: SamplerCallback | None = None,
    dynamic_threshold: float | None = None,
    clip_x0: bool | float | None = None,
    progress: bool | None = None,
    model_dtype: torch.dtype | None = None,
    enable_grad: bool = False,
    formulation: Any = None,
    **sampler_options: Any,
) -> Img2ImgResult:
    """SDEdit-style image-to-image (Meng et al. 2022): noise ``x0`` part-way, then denoise.

    Of the ``steps`` levels of the full sequence, the last ``int(steps·strength)`` are used
    (diffusers' rule: t_start = steps - int(steps·strength)).  ``x0`` is noised to exactly
    the first used level, x = α_k·x0 + σ_k·ε (Ho et al. 2020, eq. 4, at that level's α, σ),
    so the starting noise level equals the first denoising step's.  Returns the images and
    the timesteps used.  Other arguments as in ``sample``.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    plan = _plan(
        model,
        schedule=schedule,
        sampler=sampler,
        steps=steps,
        prediction=prediction,
        variance=variance,
        spacing=spacing,
        eta=eta,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        guidance_interval=guidance_interval,
        apg=apg,
        inpaint=(inpaint_image, inpaint_mask),
        uncond=uncond,
        dynamic_threshold=dynamic_threshold,
        clip_x0=clip_x0,
        model_dtype=model_dtype,
        sampler_options=sampler_options,
        formulation=formulation,
    )
    n = len(plan.levels)
    used = min(int(n * strength), n)
    if used < 1:
        raise ValueError(
            f"strength={strength} with {n} steps leaves no denoising step "
            f"(int({n}·{strength}) = 0); raise strength or steps"
        )
    plan.levels = plan.levels.tail(n - used)
    x0 = x0.float()
    if noise is None:
        noise = randn(x0.shape, generator, device=x0.device)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}")
    _check_generator(generator, x0.shape[0])
    alpha, sigma = plan.levels.alpha[0], plan.levels.sigma[0]
    x = alpha * x0 + sigma * noise.float()  # Ho et al. 2020, eq. 4 at the first used level
    with torch.set_grad_enabled(enable_grad):
        images = _run(plan, x, cond=cond, callback=callback, generator=generator,
                      progress=progress)  # fmt: skip
    return Img2ImgResult(images=images, timesteps=list(plan.levels.t))
