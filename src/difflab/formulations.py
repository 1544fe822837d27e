"""Diffusion formulations other than DDPM's discrete VP process: EDM and rectified flow.

Owns, for each formulation, what training and sampling need to know about it:

- training: the noise-level distribution (``draw_levels``, its inverse CDF ``quantile`` and
  the fixed ``validation_levels`` it gives), the network's input scaling and time
  conditioning, the regression target and the loss weight (``training_loss``);
- likelihood: the probability-flow ODE in the formulation's own frame (``ode_drift`` over
  ``ode_span``, prior N(0, ``prior_std``²·I)) that ``difflab.eval.ode_likelihood`` solves;
- sampling: the exact conversion of the network's output into the x̂0 / ε̂ that every
  difflab sampler consumes (``FormulationDenoiser``), and a ``NoiseSchedule`` whose table
  spans the formulation's noise range, so every spacing and sampler walks it unchanged
  (``Formulation.schedule``).

``ddpm`` (the default) is the discrete VP process of ``schedules`` / ``losses`` /
``parametrization`` and has no object here: ``formulation_from_config("ddpm")`` is None.

The samplers work in the VP frame x = α·x0 + σ·ε (α² + σ² = 1).  A formulation state maps to
it by one scale factor (docs/maths.md, "Formulations"):

- EDM (Karras et al. 2022): x_EDM = x0 + σ_e·ε with σ_e = σ/α, so x = α·x_EDM.
- flow (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024): x_flow = (1-t)·x0 + t·ε with
  t = σ/(α+σ), so x = x_flow/√((1-t)² + t²) = (α+σ)·x_flow and λ = 2·log((1-t)/t).

Knows nothing of samplers' algorithms, optimisers or data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ._validate import check_choice, unknown_message
from .diffusion import mean_flat
from .parametrization import Coef, Denoiser, DenoiserNet, DenoiserOutput, append_dims
from .schedules import NoiseSchedule

__all__ = [
    "EDM",
    "FORMULATIONS",
    "FLOW_TIMESTEP_SAMPLINGS",
    "Flow",
    "Formulation",
    "FormulationDenoiser",
    "FormulationLoss",
    "FormulationSchedule",
    "formulation_from_config",
    "resolution_shift",
    "shift_for_resolution",
]

FORMULATIONS: tuple[str, ...] = ("ddpm", "edm", "flow")
FlowTimestepSampling = Literal["uniform", "logit_normal", "mode"]
FLOW_TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal", "mode")
# Labels of the sampling schedule (its "timesteps"): the network never sees them, the
# denoiser conditions it on the exact level (α, σ) a sampler passes.
_TABLE_SIZE = 1000


@dataclass
class FormulationLoss:
    """One batch's loss: ``loss`` = mean of ``per_sample`` = ``weights``·``mse`` ``[B]``."""

    loss: Tensor  # scalar
    per_sample: Tensor  # [B]
    mse: Tensor  # [B]: unweighted MSE in the space the weight applies to
    weights: Tensor  # [B]


class FormulationSchedule(NoiseSchedule):
    """A ``NoiseSchedule`` whose T levels span a formulation's noise range (built from ᾱ).

    Samplers read levels from it (every spacing works); its integer "timesteps" are labels
    only.  ``to_config`` names the formulation instead of listing T betas.
    """

    def __init__(self, alphas_cumprod: Tensor, formulation: Formulation):
        ab = alphas_cumprod.to(torch.float64)
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        betas = 1 - ab / prev
        if ab[-1] == 0:
            betas[-1] = 1.0  # zero terminal SNR (flow's t = 1)
        super().__init__(betas, name="custom")
        self.formulation = formulation

    def to_config(self) -> dict[str, Any]:
        return {"formulation": self.formulation.to_config()}

    def __repr__(self) -> str:
        return f"FormulationSchedule({self.formulation!r})"


def _per_sample(v: Coef, x: Tensor) -> Tensor:
    """A level coefficient (host float or ``[B]``) as float32 ``[B]`` on ``x``'s device."""
    t = torch.as_tensor(v, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t.to(torch.float32)


class Formulation:
    """Base of EDM and Flow: options are dataclass fields; see the module docstring."""

    name: ClassVar[str]
    prediction: ClassVar[str] = "x0"  # the space CFG rescale works in (guidance)

    # --------------------------------------------------------------- config
    def to_config(self) -> dict[str, Any]:
        """``{name: ..., <options>}``; ``formulation_from_config`` inverts it."""
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]

    # --------------------------------------------------------------- training
    def draw_levels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` training noise levels in the formulation's own units, float32 ``[n]``."""
        raise NotImplementedError

    def training_loss(
        self,
        model: DenoiserNet,
        x0: Tensor,
        levels: Tensor,
        noise: Tensor,
        cond: Mapping[str, Any] | None = None,
    ) -> FormulationLoss:
        """The weighted regression loss of one batch ``x0 [B, C, ...]`` at ``levels [B]``."""
        raise NotImplementedError

    def quantile(self, q: Tensor) -> Tensor:
        """The inverse CDF of ``draw_levels``' distribution at ``q ∈ (0, 1)``, float64.

        Validation scores a model at the fixed levels ``quantile((i + ½)/k)``, i < k
        (``validation_levels``), so its loss is comparable from call to call.
        """
        raise NotImplementedError

    def validation_levels(self, k: int) -> Tensor:
        """``k`` fixed training levels, the mid-quantiles of the level distribution ``[k]``."""
        if k < 1:
            raise ValueError(f"validation needs at least one noise level, got {k}")
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        return self.quantile(q).to(torch.float32)

    # ----------------------------------------------- probability-flow ODE (likelihood)
    # The ODE in the formulation's own frame: d x / d u = ``ode_drift`` for u from
    # ``ode_span()[0]`` (data) to ``ode_span()[1]`` (noise), prior N(0, ``prior_std``²·I).
    prior_std: ClassVar[float] = 1.0

    def ode_span(self) -> tuple[float, float]:
        """(u at the data end, u at the prior end) of the probability-flow ODE."""
        raise NotImplementedError

    def ode_drift(self, model: DenoiserNet, x: Tensor, u: float, cond: Mapping[str, Any]) -> Tensor:
        """d x / d u of the probability-flow ODE at the native state ``x [B, ...]``."""
        raise NotImplementedError

    # --------------------------------------------------------------- sampling
    def log_snr(self, levels: Tensor) -> Tensor:
        """λ = log(α²/σ²) of native levels, float64 for the schedule table."""
        raise NotImplementedError

    def schedule_levels(self) -> Tensor:
        """The native levels of the sampling table, cleanest first, float64 ``[T]``."""
        raise NotImplementedError

    @property
    def schedule(self) -> FormulationSchedule:
        """The sampling schedule (built once)."""
        cached = self.__dict__.get("_schedule")
        if cached is None:
            lam = self.log_snr(self.schedule_levels())
            cached = FormulationSchedule(torch.sigmoid(lam), self)
            self.__dict__["_schedule"] = cached
        return cached

    def network_inputs(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(network input, network time ``[B]``) for a VP state ``x`` at (α, σ) ``[B]``."""
        raise NotImplementedError

    def to_x0_eps(
        self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(x̂0, ε̂) from the network output ``out`` at the VP state ``x``, level (α, σ)."""
        raise NotImplementedError

    def denoiser(
        self, model: DenoiserNet, model_dtype: torch.dtype | None = None
    ) -> FormulationDenoiser:
        """``model`` as the x̂0 / ε̂ denoiser every sampler takes."""
        return FormulationDenoiser(model, self, model_dtype)


# ------------------------------------------------------------------------------------ EDM
@dataclass(frozen=True)
class EDM(Formulation):
    """Karras et al. 2022 ("Elucidating the design space"), Table 1, "Ours" column.

    :param sigma_data: σ_data, the data's standard deviation (0.5 for images in [-1, 1]).
    :param p_mean: P_mean of the log-normal training levels ln σ ~ N(P_mean, P_std²).
    :param p_std: P_std.
    :param sigma_min: smallest σ of the sampling table (EDM's σ_min = 0.002).
    :param sigma_max: largest σ of the sampling table (EDM's σ_max = 80); ``spacing="karras"``
        with ρ = 7 walks EDM's grid (eq. 5) between these two.
    """

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    name: ClassVar[str] = "edm"

    def __post_init__(self) -> None:
        for key in ("sigma_data", "p_std", "sigma_min"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"edm option {key} must be a finite number > 0")
        if not self.sigma_max > self.sigma_min or not math.isfinite(self.sigma_max):
            raise ValueError(
                f"edm needs finite sigma_max > sigma_min, got {self.sigma_max} <= {self.sigma_min}"
            )

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at σ (Karras et al. 2022, Table 1; eq. 7)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = (σ² + σ_data²)/(σ·σ_data)² (Table 1), so λ(σ)·c_out(σ)² = 1."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def draw_levels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """σ = exp(P_mean + P_std·n), n ~ N(0, 1) (Table 1, "Noise distribution")."""
        return torch.exp(self.p_mean + self.p_std * torch.randn(n, generator=generator))

    def quantile(self, q: Tensor) -> Tensor:
        """σ at quantile q of the log-normal: exp(P_mean + P_std·Φ⁻¹(q))."""
        return torch.exp(self.p_mean + self.p_std * torch.special.ndtri(q.double()))

    def denoise(
        self,
        model: DenoiserNet,
        x: Tensor,
        sigma: Tensor,
        cond: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """D_θ(x; σ) = c_skip·x + c_out·F_θ(c_in·x; c_noise) (eq. 7), float32 ``[B, ...]``.

        ``sigma [B]``; the network's input is cast to ``model_dtype`` (default ``x.dtype``).
        """
        x = x.float()
        s = append_dims(sigma.to(x.device, torch.float32), x.ndim)
        c_skip, c_out, c_in, c_noise = self.precondition(s)
        net_in = (c_in * x).to(model_dtype or x.dtype)
        out = model(net_in, c_noise.reshape(-1), **(cond or {})).float()
        _check_output(out, x)
        return c_skip * x + c_out * out

    def training_loss(
        self,
        model: DenoiserNet,
        x0: Tensor,
        levels: Tensor,
        noise: Tensor,
        cond: Mapping[str, Any] | None = None,
    ) -> FormulationLoss:
        """E[λ(σ)·‖D_θ(x0 + σn; σ) - x0‖²] (eq. 8), D_θ = c_skip·x + c_out·F_θ(c_in·x; c_noise)."""
        y = x0.float()
        sigma = levels.to(y.device, torch.float32)
        x = y + append_dims(sigma, y.ndim) * noise.float()  # EDM eq. 2's noisy sample
        d = self.denoise(model, x, sigma, cond, model_dtype=x0.dtype)
        mse = mean_flat((d - y) ** 2)
        weights = self.loss_weight(sigma)
        per_sample = weights * mse
        return FormulationLoss(per_sample.mean(), per_sample, mse, weights)

    @property
    def prior_std(self) -> float:  # type: ignore[override]
        """σ_max: the ODE's prior is N(0, σ_max²·I) (eq. 1's p(x; σ_max))."""
        return self.sigma_max

    def ode_span(self) -> tuple[float, float]:
        """(ln σ_min, ln σ_max): the ODE runs in u = ln σ."""
        return math.log(self.sigma_min), math.log(self.sigma_max)

    def ode_drift(self, model: DenoiserNet, x: Tensor, u: float, cond: Mapping[str, Any]) -> Tensor:
        """dx/d ln σ = σ·dx/dσ = x - D(x; σ) (eq. 1 and 3 with σ(t) = t)."""
        sigma = torch.full((x.shape[0],), math.exp(u), device=x.device)
        return x - self.denoise(model, x, sigma, cond)

    def log_snr(self, levels: Tensor) -> Tensor:
        return -2 * torch.as_tensor(levels, dtype=torch.float64).log()  # λ = -2 ln σ

    def schedule_levels(self) -> Tensor:
        # Uniform in ln σ: λ is then exactly linear in the label, so the schedule's
        # interpolation between labels is exact and karras spacing gives eq. 5's σ exactly.
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.linspace(lo, hi, _TABLE_SIZE, dtype=torch.float64).exp()

    def network_inputs(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        sigma_e = sigma / alpha  # σ^VE; x_EDM = x/α
        _, _, c_in, c_noise = self.precondition(sigma_e)
        return x * append_dims(c_in / alpha, x.ndim), c_noise

    def to_x0_eps(
        self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        sigma_e = sigma / alpha
        c_skip, c_out, _, _ = self.precondition(sigma_e)
        x_e = x / append_dims(alpha, x.ndim)
        x0 = append_dims(c_skip, x.ndim) * x_e + append_dims(c_out, x.ndim) * out  # eq. 7
        eps = (x_e - x0) / append_dims(sigma_e, x.ndim)
        return x0, eps


# ----------------------------------------------------------------------------------- flow
def resolution_shift(t: Tensor | float, shift: float) -> Tensor | float:
    """Esser et al. 2024, eq. 23: t_m = √(m/n)·t_n / (1 + (√(m/n) - 1)·t_n), shift = √(m/n)."""
    return shift * t / (1 + (shift - 1) * t)


def shift_for_resolution(pixels: int, base_pixels: int) -> float:
    """The shift √(m/n) for m pixels (or latent cells) against a base resolution of n."""
    if pixels <= 0 or base_pixels <= 0:
        raise ValueError(f"pixel counts must be positive, got {pixels} and {base_pixels}")
    return math.sqrt(pixels / base_pixels)


@dataclass(frozen=True)
class Flow(Formulation):
    """Rectified flow / flow matching: x_t = (1-t)·x0 + t·ε, velocity target v = ε - x0
    (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024, "SD3", §2-3).

    :param timestep_sampling: training t ~ ``uniform``, ``logit_normal`` (t = sigmoid(m + s·n),
        SD3 eq. 19) or ``mode`` (t = 1 - u - s·(cos²(πu/2) - 1 + u), u ~ U(0, 1), SD3 eq. 20).
    :param logit_mean: m of logit-normal sampling.
    :param logit_std: s of logit-normal sampling.
    :param mode_scale: s of mode sampling, in [-1, 2/(π-2)].
    :param shift: resolution shift √(m/n) applied to training and sampling times (SD3
        eq. 23; 1 = none; ``shift_for_resolution`` computes it).
    :param time_scale: the network's time input is ``time_scale·t`` (1000: t on the scale
        of a 1000-step DDPM's timesteps, as SD3's diffusers models take it).
    """

    timestep_sampling: FlowTimestepSampling = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    time_scale: float = 1000.0

    name: ClassVar[str] = "flow"

    def __post_init__(self) -> None:
        check_choice("flow timestep_sampling", self.timestep_sampling, FLOW_TIMESTEP_SAMPLINGS)
        for key in ("logit_std", "shift", "time_scale"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"flow option {key} must be a finite number > 0")
        if not -1 <= self.mode_scale <= 2 / (math.pi - 2):
            raise ValueError(
                f"flow option mode_scale must lie in [-1, 2/(pi-2) = 1.752], got {self.mode_scale}"
            )

    def draw_levels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training times t ∈ [0, 1] (SD3 §3.1), then the resolution shift (eq. 23)."""
        if self.timestep_sampling == "uniform":
            t = torch.rand(n, generator=generator)
        elif self.timestep_sampling == "logit_normal":
            normal = torch.randn(n, generator=generator)
            t = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        else:  # mode: f_mode(u; s)
            t = self._f_mode(torch.rand(n, generator=generator))
        return resolution_shift(t, self.shift)  # type: ignore[return-value]

    def _f_mode(self, u: Tensor) -> Tensor:
        """SD3 eq. 20: f_mode(u; s) = 1 - u - s·(cos²(πu/2) - 1 + u), decreasing in u."""
        return 1 - u - self.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)

    def quantile(self, q: Tensor) -> Tensor:
        """t at quantile q of ``draw_levels``' distribution (monotone maps of U or N(0, 1))."""
        q = q.double()
        if self.timestep_sampling == "uniform":
            t = q
        elif self.timestep_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(q))
        else:  # f_mode decreases on [0, 1] for s in [-1, 2/(π-2)]: quantile q is f_mode(1-q)
            t = self._f_mode(1 - q)
        return resolution_shift(t, self.shift)  # type: ignore[return-value]

    def velocity(
        self,
        model: DenoiserNet,
        x_t: Tensor,
        t: Tensor,
        cond: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """v_θ(x_t, t), the network's velocity, float32 ``[B, ...]`` (``t [B]`` in [0, 1])."""
        out = model(x_t, self.time_scale * t.to(x_t.device, torch.float32), **(cond or {}))
        _check_output(out, x_t)
        return out.float()

    def ode_span(self) -> tuple[float, float]:
        """(0, 1): the ODE runs in t from the data to N(0, I) (x_1 = ε exactly)."""
        return 0.0, 1.0

    def ode_drift(self, model: DenoiserNet, x: Tensor, u: float, cond: Mapping[str, Any]) -> Tensor:
        """dx/dt = v(x, t) (Lipman et al. 2023 eq. 1; Liu et al. 2023)."""
        return self.velocity(model, x, torch.full((x.shape[0],), u), cond)

    def training_loss(
        self,
        model: DenoiserNet,
        x0: Tensor,
        levels: Tensor,
        noise: Tensor,
        cond: Mapping[str, Any] | None = None,
    ) -> FormulationLoss:
        """‖v_θ(x_t, t) - (ε - x0)‖², x_t = (1-t)·x0 + t·ε (SD3 eq. 1 and §2, "RF")."""
        y, eps = x0.float(), noise.float()
        t = levels.to(y.device, torch.float32)
        tt = append_dims(t, y.ndim)
        x_t = (1 - tt) * y + tt * eps
        out = self.velocity(model, x_t.to(x0.dtype), t, cond)
        mse = mean_flat((out - (eps - y)) ** 2)
        weights = torch.ones_like(mse)
        return FormulationLoss(mse.mean(), mse, mse, weights)

    def log_snr(self, levels: Tensor) -> Tensor:
        t = torch.as_tensor(levels, dtype=torch.float64)
        return 2 * (torch.log1p(-t) - torch.log(t))  # λ = 2 log((1-t)/t); -inf at t = 1

    def schedule_levels(self) -> Tensor:
        # Label k is t = shift((k+1)/T): "trailing" spacing walks SD3's shifted uniform grid,
        # and the last label is pure noise (t = 1, zero terminal SNR).
        u = torch.arange(1, _TABLE_SIZE + 1, dtype=torch.float64) / _TABLE_SIZE
        return resolution_shift(u, self.shift)  # type: ignore[return-value]

    def network_inputs(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        k = alpha + sigma  # x_flow = x/(α+σ), t = σ/(α+σ)
        return x / append_dims(k, x.ndim), self.time_scale * (sigma / k)

    def to_x0_eps(
        self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        k = append_dims(alpha + sigma, x.ndim)
        t = append_dims(sigma, x.ndim) / k
        x_f = x / k
        return x_f - t * out, x_f + (1 - t) * out  # x0 = x_t - t·v, ε = x_t + (1-t)·v


def _check_output(out: Tensor, x0: Tensor) -> None:
    if out.shape != x0.shape:
        raise ValueError(
            f"model output {tuple(out.shape)} does not fit x0 {tuple(x0.shape)} "
            "(edm and flow networks output C channels; no learned variance)"
        )


_CLASSES: dict[str, type[Formulation]] = {"edm": EDM, "flow": Flow}


def formulation_from_config(
    name: str | Formulation | None = "ddpm", options: Mapping[str, Any] | None = None
) -> Formulation | None:
    """The formulation ``name`` (ddpm | edm | flow) with ``options``; None for ddpm.

    An unknown option raises a ValueError that lists the formulation's options.
    """
    if isinstance(name, Formulation):
        return name
    check_choice("diffusion.formulation", "ddpm" if name is None else name, FORMULATIONS)
    opts = dict(options or {})
    opts.pop("name", None)
    if name in (None, "ddpm"):
        if opts:
            raise ValueError(
                f"diffusion.formulation_options {sorted(opts)} apply to edm or flow, not ddpm"
            )
        return None
    cls = _CLASSES[name]
    allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for key in opts:
        if key not in allowed:
            raise ValueError(unknown_message(f"{name} formulation option", key, allowed))
    return cls(**opts)


class FormulationDenoiser(Denoiser):
    """A formulation's network as the x̂0 / ε̂ denoiser of every sampler (VP frame).

    ``at(x, t, α, σ)`` ignores the label ``t``: the network's input scale and time come from
    the exact level (α, σ), so intermediate and churned levels are exact too.
    """

    def __init__(
        self,
        model: DenoiserNet,
        formulation: Formulation,
        model_dtype: torch.dtype | None = None,
    ):
        super().__init__(model, formulation.schedule, formulation.prediction, "fixedsmall",
                         model_dtype)  # fmt: skip
        self.formulation = formulation

    def at(
        self, x_t: Tensor, t: float | Tensor, alpha: Coef, sigma: Coef, **cond: Any
    ) -> DenoiserOutput:
        x = x_t.float()
        a, s = _per_sample(alpha, x), _per_sample(sigma, x)
        net_x, net_t = self.formulation.network_inputs(x, a, s)
        dtype = self.model_dtype or torch.float32
        out = self.model(net_x.to(dtype), net_t.to(torch.float32), **cond).float()
        self.nfe += 1
        _check_output(out, x)
        x0, eps = self.formulation.to_x0_eps(out, x, a, s)
        return DenoiserOutput(x0=x0, eps=eps)
