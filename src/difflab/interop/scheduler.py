"""diffusers scheduler configs (``scheduler/scheduler_config.json``) -> difflab sampling.

Owns: ``schedule_from_diffusers`` (the betas of a diffusers config as a ``NoiseSchedule``),
``prediction_from_diffusers`` (its ``prediction_type``), ``default_sampler`` (the difflab
sampler that its ``_class_name`` runs) and ``sampling_plan``: the keyword arguments of
``dl.sample`` that reproduce what diffusers does when the user picks a sampler by name and
diffusers builds that sampler's scheduler class with ``SchedulerClass.from_config(config)``
(keys the class does not know are dropped, keys the config lacks take the class's
defaults — e.g. SD 1.5's config has no ``timestep_spacing``, so DDIM gets "leading" and
Euler "linspace").  The per-class defaults and timestep rules below are written from the
diffusers 0.2x-0.4x constructors and ``set_timesteps`` methods; the tests run the diffusers
schedulers side by side.

Knows nothing of models.  What diffusers does that difflab reproduces here:

- the timesteps of each class's "leading" / "trailing" / "linspace" spacing, with its own
  rounding (DPM-Solver and UniPC space N+1 points and drop the last), always passed as an
  explicit list so that no difflab spacing formula has to agree with diffusers';
- fractional timesteps of the k-diffusion-style classes read linearly in σ^VE
  (``NoiseSchedule(interpolation="sigma")``);
- Karras sigmas (``use_karras_sigmas``, or a "... Karras" sampler name), with each class's
  σ_min/σ_max (the spaced sigmas' ends for Euler/Heun/LMS, the full table for DPM/UniPC)
  and model times from log-σ interpolation, rounded for DPM-Solver and UniPC — as
  ``NoiseLevels`` where the model time and the noise level are given apart;
- ``set_alpha_to_one=False`` (DDIM/PNDM end at ᾱ_0: ``final_timestep=0``), ``clip_sample``,
  ``rescale_betas_zero_snr`` (and the 2⁻²⁴ that Euler, Euler ancestral, DPM-Solver and
  UniPC put in place of ᾱ_{T-1} = 0; Heun, LMS and PNDM do not take the option at all, so
  diffusers runs them on the unrescaled betas, and so does the plan).

Not reproduced (the plan is difflab's nearest behaviour, said here once):

- DDIM and PNDM step from t to t - ⌊T/N⌋ whatever the spacing; with "linspace" or
  "trailing" spacings whose gaps are not ⌊T/N⌋ they land between the listed timesteps (and
  evaluate the model at a level other than the one they stepped to).  The plan walks the
  listed timesteps consistently.  "leading" spacing (SD's) is exact.
- DDIM's ``clip_sample`` clips x̂0 but keeps the raw ε̂ (unless the pipeline passes
  ``use_clipped_model_output=True``); difflab's ``clip_x0`` recomputes ε̂ from the clipped
  x̂0, i.e. reproduces ``use_clipped_model_output=True``.  DDPM and Heun are exact.
- PNDM's Runge–Kutta midpoint is t - ⌊⌊T/N⌋/2⌋ in diffusers, the exact midpoint in difflab:
  equal when ⌊T/N⌋ is even.  PNDM/PLMS with v-prediction: diffusers combines the raw
  v-outputs (difflab's pndm.py docstring).
- Initial noise: diffusers' pipelines start from ``latents·init_noise_sigma``; the
  k-diffusion-style classes with "linspace"/"trailing" spacing use σ_max, not √(σ_max²+1),
  so their start state on the model's scale is σ_max/√(σ_max²+1)·z rather than z.
  ``initial_noise_scale`` gives that factor; ``dl.sample(noise=scale·z, ...)`` then starts
  where diffusers does.
- Options raising ValueError: exponential / beta / Lu-lambda / flow sigmas, continuous
  timesteps, ``interpolation_type="log_linear"``, dynamic shifting, DPM-Solver's non-"++"
  algorithms, ``final_sigmas_type="sigma_min"`` outside Euler, UniPC with
  ``predict_x0=False`` or a partial ``disable_corrector``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._validate import unknown_message
from ..samplers.registry import SAMPLERS
from ..schedules import NoiseLevels, NoiseSchedule

__all__ = [
    "default_sampler",
    "initial_noise_sigma",
    "initial_noise_scale",
    "prediction_from_diffusers",
    "sampling_plan",
    "schedule_from_diffusers",
]

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_VARIANCES = {
    "fixed_small": "fixedsmall",
    "fixed_small_log": "fixedsmall",
    "fixed_large": "fixedlarge",
    "fixed_large_log": "fixedlarge",
    "learned": "learned",
    "learned_range": "learned_range",
}
_ZERO_SNR_ALPHA_BAR = 2.0**-24  # what the k-diffusion-style classes put in place of ᾱ = 0

# Defaults of the keys read here, per diffusers class; a key a class lacks is one it drops.
_COMMON: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}
_CLIP = {"clip_sample": True, "clip_sample_range": 1.0}
_THRESH = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {
        "timestep_spacing": "leading",
        "set_alpha_to_one": True,
        "rescale_betas_zero_snr": False,
        **_CLIP,
        **_THRESH,
    },
    "DDPMScheduler": {
        "timestep_spacing": "leading",
        "variance_type": "fixed_small",
        "rescale_betas_zero_snr": False,
        **_CLIP,
        **_THRESH,
    },
    "PNDMScheduler": {
        "timestep_spacing": "leading",
        "set_alpha_to_one": False,
        "skip_prk_steps": False,
    },
    "EulerDiscreteScheduler": {
        "timestep_spacing": "linspace",
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "sigma_min": None,
        "sigma_max": None,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        **_SIGMAS,
    },
    "EulerAncestralDiscreteScheduler": {
        "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False,
    },
    "HeunDiscreteScheduler": {
        "timestep_spacing": "linspace",
        "clip_sample": False,
        "clip_sample_range": 1.0,
        **_SIGMAS,
    },
    "LMSDiscreteScheduler": {"timestep_spacing": "linspace", **_SIGMAS},
    "DPMSolverMultistepScheduler": {
        "timestep_spacing": "linspace",
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "rescale_betas_zero_snr": False,
        **_SIGMAS,
        **_THRESH,
    },
    "UniPCMultistepScheduler": {
        "timestep_spacing": "linspace",
        "solver_order": 2,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "final_sigmas_type": "zero",
        "sigma_min": None,
        "sigma_max": None,
        "rescale_betas_zero_snr": False,
        **_SIGMAS,
        **_THRESH,
    },
}
# Classes that read fractional timesteps by np.interp on their sigmas (linear in σ^VE) and
# replace ᾱ_{T-1} = 0 by 2⁻²⁴ under rescale_betas_zero_snr.
_SIGMA_CLASSES = frozenset(
    {
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "LMSDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    }
)
_KDIFFUSION = frozenset(
    {
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "LMSDiscreteScheduler",
    }
)

# difflab sampler -> (the diffusers class that runs it, config keys its name fixes).
_SAMPLER_CLASS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": False}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# diffusers class -> difflab sampler (``default_sampler``).
_CLASS_SAMPLER = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "KDPM2DiscreteScheduler": "dpm_2",
    "KDPM2AncestralDiscreteScheduler": "dpm_2_ancestral",
    "DPMSolverSDEScheduler": "dpmpp_sde",
    "UniPCMultistepScheduler": "unipc",
}


# ---------------------------------------------------------------------- schedule & prediction
def schedule_from_diffusers(config: Mapping[str, Any]) -> NoiseSchedule:
    """The training schedule of a diffusers scheduler config (Ho et al. 2020 notation).

    Reads ``num_train_timesteps``, ``beta_schedule`` ("linear": β linear; "scaled_linear":
    √β linear, SD's; "squaredcos_cap_v2": Nichol & Dhariwal 2021's cosine, β ≤ 0.999),
    ``beta_start``/``beta_end``, ``trained_betas`` (wins over the schedule) and
    ``rescale_betas_zero_snr`` (Lin et al. 2023, Alg. 1: ᾱ_{T-1} = 0 exactly).  Missing
    keys take diffusers' defaults (1000, "linear", 1e-4, 0.02).
    """
    cfg = {**_COMMON, "rescale_betas_zero_snr": False, **dict(config)}
    T = cfg["num_train_timesteps"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise ValueError(
            f"scheduler config: num_train_timesteps must be an integer >= 2, got {T!r}"
        )
    if cfg["trained_betas"] is not None:
        betas = [float(b) for b in cfg["trained_betas"]]
        if len(betas) != T:
            raise ValueError(
                f"scheduler config: trained_betas has {len(betas)} values but "
                f"num_train_timesteps is {T}"
            )
        sched = NoiseSchedule.from_betas(betas)
    else:
        kind = cfg["beta_schedule"]
        if kind not in _BETA_SCHEDULES:
            raise ValueError(
                unknown_message("scheduler config beta_schedule", kind, _BETA_SCHEDULES)
            )
        start, end = float(cfg["beta_start"]), float(cfg["beta_end"])
        if kind == "linear":
            sched = NoiseSchedule.linear(T, start, end)
        elif kind == "scaled_linear":
            sched = NoiseSchedule.scaled_linear(T, start, end)
        else:  # diffusers' betas_for_alpha_bar: s = 0.008, max_beta = 0.999
            sched = NoiseSchedule.cosine(T)
    return sched.rescale_zero_terminal_snr() if cfg["rescale_betas_zero_snr"] else sched


def prediction_from_diffusers(config: Mapping[str, Any]) -> str:
    """difflab's parametrization for ``prediction_type``: "epsilon" -> "eps",
    "v_prediction" -> "v" (Salimans & Ho 2022), "sample" -> "x0"; missing: "eps"."""
    kind = config.get("prediction_type", "epsilon")
    if kind not in _PREDICTIONS:
        raise ValueError(unknown_message("scheduler config prediction_type", kind, _PREDICTIONS))
    return _PREDICTIONS[kind]


def default_sampler(config: Mapping[str, Any]) -> str:
    """The difflab sampler that the config's ``_class_name`` runs by default.

    PNDMScheduler is "plms" with ``skip_prk_steps`` (SD's configs) and "pndm" without;
    DPMSolverMultistepScheduler is "dpmpp_2m" / "dpmpp_3m" / "dpmpp_2m_sde" /
    "dpmpp_3m_sde" by ``solver_order`` and ``algorithm_type``.
    """
    name = config.get("_class_name")
    if name == "PNDMScheduler":
        return "plms" if config.get("skip_prk_steps", False) else "pndm"
    if name == "DPMSolverMultistepScheduler":
        order = int(config.get("solver_order", 2))
        sde = config.get("algorithm_type", "dpmsolver++") == "sde-dpmsolver++"
        return f"dpmpp_{3 if order >= 3 else 2}m" + ("_sde" if sde else "")
    if name not in _CLASS_SAMPLER:
        known = [*_CLASS_SAMPLER, "PNDMScheduler", "DPMSolverMultistepScheduler"]
        raise ValueError(unknown_message("scheduler config _class_name", name, known))
    return _CLASS_SAMPLER[name]


# ---------------------------------------------------------------------- timesteps
def _class_config(config: Mapping[str, Any], cls: str, fixed: Mapping[str, Any]) -> dict:
    """What ``cls.from_config(config)`` holds: the class's defaults, overridden by the keys
    of ``config`` it knows, then by ``fixed`` (what the sampler's name implies)."""
    defaults = {**_COMMON, **_DEFAULTS[cls]}
    cfg = {k: config.get(k, v) for k, v in defaults.items()}
    cfg.update(fixed)
    if cfg["timestep_spacing"] not in ("leading", "trailing", "linspace"):
        raise ValueError(
            unknown_message(
                "scheduler config timestep_spacing",
                cfg["timestep_spacing"],
                ("leading", "trailing", "linspace"),
            )
        )
    return cfg


def _timesteps(cfg: dict, n: int, rule: str, last: int | None = None) -> np.ndarray:
    """Descending timesteps of diffusers' spacing ``cfg["timestep_spacing"]`` for N steps.

    ``rule``: "int" (DDIM/DDPM/PNDM: rounded), "float" (Euler/Heun/LMS: float32, linspace
    not rounded) or "plus_one" (DPM-Solver/UniPC: N+1 points, the last dropped, up to
    ``last``).
    """
    T, spacing, offset = cfg["num_train_timesteps"], cfg["timestep_spacing"], cfg["steps_offset"]
    if rule == "plus_one":
        top = T if last is None else last
        if spacing == "linspace":
            ts = np.linspace(0, top - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ratio = top // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + offset
        else:
            ts = np.arange(top, 0, -T / n).round() - 1
        return ts.astype(np.int64).astype(np.float64)
    if spacing == "linspace":
        if rule == "float":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.float64)
    if spacing == "leading":
        return ((np.arange(0, n) * (T // n)).round()[::-1] + offset).astype(np.float64)
    ts = np.arange(T, 0, -T / n).round() - 1
    return ts.astype(np.float32 if rule == "float" else np.int64).astype(np.float64)


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(N-1)·(σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [float(s) for s in (hi + ramp * (lo - hi)) ** rho]


def _check_supported(cfg: dict, cls: str, karras: bool) -> None:
    """ValueError for the options this module does not reproduce (module docstring)."""
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                "use_dynamic_shifting"):  # fmt: skip
        if cfg.get(key):
            raise ValueError(f"scheduler config: {key}=true ({cls}) is not supported by difflab")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise ValueError(
            f"scheduler config: timestep_type={cfg['timestep_type']!r} is not supported"
        )
    if cfg.get("interpolation_type", "linear") != "linear":
        raise ValueError(
            f"scheduler config: interpolation_type={cfg['interpolation_type']!r} is not "
            "supported (only 'linear')"
        )
    final = cfg.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min") or (
        final == "sigma_min" and cls != "EulerDiscreteScheduler"
    ):
        raise ValueError(
            f"scheduler config: final_sigmas_type={final!r} with {cls} is not supported "
            "(only 'zero'; 'sigma_min' with EulerDiscreteScheduler)"
        )
    if karras and "use_karras_sigmas" not in cfg:
        raise ValueError(f"{cls} has no Karras sigmas (use_karras_sigmas)")


def _schedule_for(cfg: dict, cls: str) -> NoiseSchedule:
    """The schedule as ``cls`` builds it: its own zero-SNR handling and interpolation."""
    sched = schedule_from_diffusers(cfg)  # cfg holds rescale_betas_zero_snr only if cls takes it
    if cls in _SIGMA_CLASSES:
        if sched.zero_terminal_snr:
            ab = sched.alphas_cumprod.clone()
            ab[-1] = _ZERO_SNR_ALPHA_BAR
            sched = NoiseSchedule.from_alphas_cumprod(ab)
        sched = sched.with_interpolation("sigma")
    return sched


def _levels(
    sched: NoiseSchedule, ts: list[float], sigmas: list[float] | None, final_log_snr: float
) -> NoiseLevels:
    """NoiseLevels at model times ``ts``, at noise levels ``sigmas`` (σ^VE; None: σ(t))."""
    if sigmas is None:
        lams = [float(sched.log_snr(t)) for t in ts]
    else:
        lams = [-2.0 * math.log(s) for s in sigmas]
    return NoiseLevels(t=[float(t) for t in ts], log_snr=[*lams, final_log_snr])


def _x0_limits(cfg: dict) -> dict[str, Any]:
    """``clip_x0`` / ``dynamic_threshold`` for ``clip_sample`` / ``thresholding``."""
    if cfg.get("thresholding"):
        if cfg["sample_max_value"] == 1.0:  # s is clamped to [1, 1]: plain clipping at 1
            return {"clip_x0": 1.0}
        return {"dynamic_threshold": float(cfg["dynamic_thresholding_ratio"])}
    if cfg.get("clip_sample"):
        return {"clip_x0": float(cfg["clip_sample_range"])}
    return {}


# ---------------------------------------------------------------------- the plan
def has_plan(sampler: str) -> bool:
    """Whether :func:`sampling_plan` reproduces a diffusers scheduler for ``sampler``."""
    spec, implied = SAMPLERS.resolve(sampler)
    return spec.name in _SAMPLER_CLASS and implied in (None, "karras")


def sampling_plan(config: Mapping[str, Any], sampler: str, steps: int) -> dict[str, Any]:
    """Keyword arguments for ``dl.sample`` that reproduce diffusers' scheduler for ``sampler``.

    ``sampler`` is a difflab name or alias ("DPM++ 2M Karras", "Euler a",
    "DPMSolverMultistepScheduler"); a "Karras" alias sets ``use_karras_sigmas``.  The plan
    holds ``schedule``, ``prediction``, ``sampler``, ``spacing`` (an explicit timestep list,
    or ``NoiseLevels`` where diffusers' model time and noise level disagree) and the
    sampler's options (``final_timestep``, ``clip_x0``, ``order``, ...), so
    ``dl.sample(model, noise=initial_noise_scale(config, sampler, steps)·z, **plan)``
    starts from diffusers' latents ``z`` and walks diffusers' levels.  Exactness and its
    limits: the module docstring.  Supported samplers: ddim, ddpm, pndm, plms, euler,
    euler_ancestral, heun, lms, dpmpp_2m, unipc.

    :param config: the parsed ``scheduler_config.json`` (any diffusers class).
    :param steps: the number of inference steps N (``num_inference_steps``).
    """
    spec, implied = SAMPLERS.resolve(sampler)
    if spec.name not in _SAMPLER_CLASS:
        raise ValueError(unknown_message("sampler for a diffusers plan", spec.name, _SAMPLER_CLASS))
    if implied not in (None, "karras"):
        raise ValueError(f"sampler {sampler!r} implies {implied!r} sigmas, which have no plan")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    cls, fixed = _SAMPLER_CLASS[spec.name]
    cfg = _class_config(config, cls, fixed)
    karras = implied == "karras" or bool(cfg.get("use_karras_sigmas"))
    _check_supported(cfg, cls, karras)
    sched = _schedule_for(cfg, cls)
    plan: dict[str, Any] = {
        "schedule": sched,
        "prediction": prediction_from_diffusers(cfg),
        "sampler": spec.name,
    }
    if cls in ("DDIMScheduler", "PNDMScheduler"):
        plan.update(_ddim_like(cfg, steps))
    elif cls == "DDPMScheduler":
        plan["spacing"] = _timesteps(cfg, steps, "int").tolist()
        variance = cfg["variance_type"]
        if variance not in _VARIANCES:
            raise ValueError(unknown_message("DDPM variance_type", variance, _VARIANCES))
        plan["variance"] = _VARIANCES[variance]
    elif cls in _KDIFFUSION:
        plan["spacing"] = _kdiffusion_levels(cfg, cls, sched, steps, karras)
    else:
        plan["spacing"] = _multistep_levels(cfg, cls, sched, steps, karras)
    plan.update(_x0_limits(cfg))
    plan.update(_solver_options(cfg, cls, spec.name, steps))
    if cls == "DPMSolverMultistepScheduler" and cfg["solver_type"] == "heun":
        plan["sampler"] = "dpmpp_2m_sde"  # its η = 0 is DPM-Solver++(2M) with either solver_type
    return plan


def _ddim_like(cfg: dict, n: int) -> dict[str, Any]:
    """DDIM/PNDM: rounded timesteps; ``set_alpha_to_one=False`` ends at ᾱ_0."""
    ts = _timesteps(cfg, n, "int").tolist()
    out: dict[str, Any] = {}
    if not cfg["set_alpha_to_one"]:
        if ts[-1] == 0:  # the last step goes from ᾱ_0 to ᾱ_0: the identity for DDIM and PNDM
            ts = ts[:-1]
        if ts:
            out["final_timestep"] = 0
    if not ts:
        raise ValueError("one step from t = 0 with set_alpha_to_one=False does nothing")
    out["spacing"] = ts
    return out


def _kdiffusion_levels(
    cfg: dict, cls: str, sched: NoiseSchedule, n: int, karras: bool
) -> list[float] | NoiseLevels:
    """Euler/Heun/LMS: float timesteps, σ linear in t; Karras σ from the spaced σ's ends."""
    ts = _timesteps(cfg, n, "float").tolist()
    final = (
        sched.log_snr_table[0].item() if cfg.get("final_sigmas_type") == "sigma_min" else math.inf
    )
    if not karras:
        return ts if final == math.inf else _levels(sched, ts, None, final)
    spaced = [math.exp(-0.5 * float(sched.log_snr(t))) for t in ts]
    smin, smax = cfg.get("sigma_min"), cfg.get("sigma_max")
    smin = spaced[-1] if smin is None else smin
    smax = spaced[0] if smax is None else smax
    sigmas = _karras(float(smin), float(smax), n)
    by_log = sched.with_interpolation("log_snr")  # diffusers' _sigma_to_t: linear in log σ
    return _levels(sched, [by_log.t_from_sigma_ve(s) for s in sigmas], sigmas, final)


def _multistep_levels(
    cfg: dict, cls: str, sched: NoiseSchedule, n: int, karras: bool
) -> list[float] | NoiseLevels:
    """DPM-Solver/UniPC: N+1-point integer timesteps; Karras σ over the full table with
    model times rounded (not for cosine betas in DPM-Solver)."""
    last = None
    clip = cfg.get("lambda_min_clipped", -math.inf)
    if clip > -math.inf:  # drop the timesteps whose half-log-SNR λ/2 lies below the clip
        lam_half = (0.5 * sched.log_snr_table).tolist()
        last = sched.num_timesteps - sum(1 for v in lam_half if v < clip)
    if not karras:
        return _timesteps(cfg, n, "plus_one", last).tolist()
    table = sched.sigmas_ve.tolist()
    smin, smax = cfg.get("sigma_min"), cfg.get("sigma_max")
    smin = table[0] if smin is None else smin
    smax = table[-1] if smax is None else smax
    sigmas = _karras(float(smin), float(smax), n)
    by_log = sched.with_interpolation("log_snr")
    ts = [by_log.t_from_sigma_ve(s) for s in sigmas]
    if not (cls == "DPMSolverMultistepScheduler" and cfg["beta_schedule"] == "squaredcos_cap_v2"):
        ts = [float(np.round(t)) for t in ts]
    return _levels(sched, ts, sigmas, math.inf)


def _solver_options(cfg: dict, cls: str, name: str, n: int) -> dict[str, Any]:
    """The sampler options that diffusers' step fixes (difflab's defaults differ)."""
    if cls == "HeunDiscreteScheduler":
        return {"max_ratio": math.inf}  # every step second order, as diffusers
    if cls == "DPMSolverMultistepScheduler":
        algo = cfg["algorithm_type"]
        if algo != "dpmsolver++":
            raise ValueError(
                f"DPMSolverMultistepScheduler algorithm_type={algo!r} has no plan for {name!r} "
                "(only 'dpmsolver++')"
            )
        if cfg["variance_type"] is not None:
            raise ValueError("DPMSolverMultistepScheduler variance_type (learned) is not supported")
        if cfg["solver_type"] == "heun":
            return {"eta": 0.0, "solver_type": "heun"}
        return {}
    if cls == "UniPCMultistepScheduler":
        if not cfg["predict_x0"]:
            raise ValueError("UniPC with predict_x0=false (noise prediction) is not supported")
        disabled = set(cfg["disable_corrector"] or [])
        if disabled and not set(range(n)) <= disabled:
            raise ValueError(
                f"UniPC disable_corrector={sorted(disabled)} switches the corrector off at some "
                "steps only; difflab's corrector is on or off for the whole run"
            )
        return {
            "order": int(cfg["solver_order"]),
            "variant": cfg["solver_type"],
            "corrector": not disabled,
            "lower_order_final": bool(cfg["lower_order_final"]),
        }
    return {}


def initial_noise_sigma(config: Mapping[str, Any], sampler: str, steps: int) -> float:
    """diffusers' ``scheduler.init_noise_sigma`` after ``set_timesteps(steps)``: the factor
    its pipelines multiply unit latents by (1 for the VP-scale classes)."""
    spec, implied = SAMPLERS.resolve(sampler)
    cls, fixed = _SAMPLER_CLASS.get(spec.name, ("", {}))
    if cls not in _KDIFFUSION:
        return 1.0
    plan = sampling_plan(config, sampler, steps)
    spacing = plan["spacing"]
    levels = spacing if isinstance(spacing, NoiseLevels) else plan["schedule"].noise_levels(spacing)
    sigma_max = max(s for s in levels.sigma_ve)
    spaced = _class_config(config, cls, fixed)["timestep_spacing"]
    if spaced in ("linspace", "trailing"):
        return sigma_max  # diffusers' init_noise_sigma for these spacings
    return math.sqrt(sigma_max**2 + 1)


def initial_noise_scale(config: Mapping[str, Any], sampler: str, steps: int) -> float:
    """The factor c with ``dl.sample(noise=c·z, **sampling_plan(...))`` starting where a
    diffusers pipeline starts from latents ``z``: init_noise_sigma/√(σ_0² + 1) for the
    k-diffusion-style classes (VE scale -> the model's scale), 1 otherwise."""
    init = initial_noise_sigma(config, sampler, steps)
    spec, _ = SAMPLERS.resolve(sampler)
    if _SAMPLER_CLASS.get(spec.name, ("",))[0] not in _KDIFFUSION:
        return init
    plan = sampling_plan(config, sampler, steps)
    spacing = plan["spacing"]
    levels = spacing if isinstance(spacing, NoiseLevels) else plan["schedule"].noise_levels(spacing)
    return init / math.sqrt(levels.sigma_ve[0] ** 2 + 1)
