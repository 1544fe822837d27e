"""Noise schedules and the noise-level sequences that samplers walk.

Owns: ``NoiseSchedule`` (betas -> alphas_cumprod in float64; linear, scaled_linear, cosine,
sigmoid, custom; the zero-terminal-SNR rescale), the continuous-time view of a discrete
schedule (``alpha(t)``, ``sigma(t)``, ``log_snr(t)`` for fractional ``t``, interpolated in
log-SNR or, with ``interpolation="sigma"``, linearly in σ^VE as diffusers' k-diffusion-style
schedulers do; and its inverse), and the sampling discretisations (leading, trailing, linspace,
karras, logsnr, exponential, custom) as ``NoiseLevels``.

Knows nothing of models or data.

Notation (Ho et al. 2020, "DDPM"): ``alphas_cumprod[t]`` is ᾱ_t, so that
x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε.  difflab writes α_t = √ᾱ_t and σ_t = √(1-ᾱ_t) (the VP
convention of Kingma et al. 2021), λ_t = log(α_t²/σ_t²) the log-SNR, and
σ^VE_t = σ_t/α_t the "k-diffusion sigma" (Karras et al. 2022).

Naming trap: the latent-diffusion (CompVis) config calls linear-in-√β betas "linear";
diffusers and difflab call that ``scaled_linear``.  difflab's ``linear`` is DDPM's linear
in β.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor

from ._validate import check_choice, unknown_message

ScheduleName = Literal["linear", "scaled_linear", "cosine", "sigmoid", "custom"]
Spacing = Literal["leading", "trailing", "linspace", "karras", "logsnr", "exponential"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace", "karras", "logsnr", "exponential")
# How λ(t) is read between integer timesteps (``NoiseSchedule(..., interpolation=...)``):
Interpolation = Literal["log_snr", "sigma"]
INTERPOLATIONS: tuple[str, ...] = (
    "log_snr",  # linear in λ (= linear in log σ^VE; k-diffusion's and diffusers' ``_sigma_to_t``)
    "sigma",  # linear in σ^VE (diffusers' Euler/Heun/LMS/DPM/UniPC: np.interp on their sigmas)
)
TimeLike = float | int | Tensor


def _sigmoid(x: float) -> float:
    if x == math.inf:
        return 1.0
    if x == -math.inf:
        return 0.0
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class NoiseSchedule:
    """A discrete variance-preserving schedule of ``T`` steps (Ho et al. 2020, eq. 4).

    ``betas`` and ``alphas_cumprod`` are float64 master tables of shape ``[T]``; the
    float32 views used on the hot path are ``table(name, device)``.

    ``interpolation`` says how fractional timesteps are read (``log_snr``, below): "log_snr"
    (default) or "sigma", linear in σ^VE = σ/α between integer timesteps, which is what
    diffusers' Euler, Heun, LMS, DPM-Solver and UniPC schedulers do for fractional timesteps
    (``np.interp(timesteps, arange(T), sigmas)``).  It changes nothing at integer timesteps.
    """

    def __init__(
        self,
        betas: Tensor | Sequence[float],
        *,
        name: str = "custom",
        interpolation: Interpolation = "log_snr",
        **params: Any,
    ):
        check_choice("timestep interpolation", interpolation, INTERPOLATIONS)
        self.interpolation: Interpolation = interpolation
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().clone().cpu()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(
                f"betas must be a 1-D sequence of at least 2 values, got {tuple(betas.shape)}"
            )
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            bad = betas[(betas <= 0) | (betas > 1) | ~torch.isfinite(betas)]
            raise ValueError(
                f"every beta must lie in (0, 1] (1 only for a zero-terminal-SNR last step); "
                f"got {bad[:4].tolist()}"
            )
        if (betas[:-1] >= 1).any():
            raise ValueError("only the last beta may equal 1 (zero terminal SNR)")
        self.name = name
        self.params = dict(params)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        if betas[-1] == 1:
            self.alphas_cumprod[-1] = 0.0
        ab = self.alphas_cumprod
        with torch.no_grad():
            self._log_snr = torch.log(ab) - torch.log1p(-ab)  # λ_t, float64 [T]; -inf at ᾱ=0
        self._log_snr_list = self._log_snr.tolist()
        self._cache: dict[tuple[str, str, torch.dtype], Tensor] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(
        cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """DDPM's schedule: β linear from ``beta_start`` to ``beta_end`` (Ho et al. 2020, §4)."""
        _check_T(T)
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(betas, name="linear", T=T, beta_start=beta_start, beta_end=beta_end)

    @classmethod
    def scaled_linear(
        cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> NoiseSchedule:
        """Stable Diffusion's schedule: √β linear (LDM calls this "linear")."""
        _check_T(T)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        return cls(betas, name="scaled_linear", T=T, beta_start=beta_start, beta_end=beta_end)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal 2021, eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T+s)/(1+s)·π/2).

        β_t = 1 - ᾱ_t/ᾱ_{t-1}, clipped at ``max_beta``.
        """
        _check_T(T)
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas, name="cosine", T=T, s=s, max_beta=max_beta)

    @classmethod
    def sigmoid(
        cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """GeoDiff's sigmoid schedule (Xu et al. 2022): β = sigmoid(linspace(-6, 6))·(b1-b0)+b0."""
        _check_T(T)
        betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
        betas = betas * (beta_end - beta_start) + beta_start
        return cls(betas, name="sigmoid", T=T, beta_start=beta_start, beta_end=beta_end)

    @classmethod
    def from_betas(cls, betas: Tensor | Sequence[float]) -> NoiseSchedule:
        """A custom schedule from explicit betas."""
        return cls(betas, name="custom")

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor | Sequence[float]) -> NoiseSchedule:
        """A custom schedule from ᾱ_t (strictly decreasing, in [0, 1))."""
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if (ab[1:] >= ab[:-1]).any() or ab[0] >= 1 or ab[-1] < 0:
            raise ValueError("alphas_cumprod must be strictly decreasing within [0, 1)")
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return cls(1 - ab / prev, name="custom")

    @classmethod
    def from_name(cls, name: str, T: int = 1000, **kwargs: Any) -> NoiseSchedule:
        """Build a named schedule: ``linear``, ``scaled_linear``, ``cosine`` or ``sigmoid``."""
        check_choice("noise schedule", name, SCHEDULE_NAMES)
        _check_options(name, kwargs)
        return getattr(cls, name)(T, **kwargs)

    def rescale_zero_terminal_snr(self) -> NoiseSchedule:
        """Lin et al. 2023, Alg. 1: shift and scale √ᾱ so that ᾱ_T = 0 exactly, ᾱ_0 kept."""
        a = self.alphas_cumprod.sqrt()
        a0, aT = a[0].clone(), a[-1].clone()
        a = (a - aT) * a0 / (a0 - aT)
        ab = a**2
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        betas = 1 - ab / prev
        betas[-1] = 1.0
        out = NoiseSchedule(betas, name=self.name, interpolation=self.interpolation, **self.params)
        out.params["zero_terminal_snr"] = True
        return out

    def with_interpolation(self, interpolation: Interpolation) -> NoiseSchedule:
        """The same tables, with fractional timesteps read by ``interpolation``."""
        return NoiseSchedule(self.betas, name=self.name, interpolation=interpolation, **self.params)

    # ------------------------------------------------------------------ config
    def to_config(self) -> dict[str, Any]:
        """A YAML-able description; ``from_config(to_config())`` rebuilds the same tables."""
        if self.name == "custom":
            cfg: dict[str, Any] = {"name": "custom", "betas": self.betas.tolist()}
        else:
            cfg = {"name": self.name, **self.params}
        if self.interpolation != "log_snr":  # the default is left out: older configs unchanged
            cfg["interpolation"] = self.interpolation
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Inverse of ``to_config``."""
        cfg = dict(config)
        name = cfg.pop("name", "linear")
        interpolation = cfg.pop("interpolation", "log_snr")
        if name == "custom":
            return cls(cfg["betas"], name="custom", interpolation=interpolation)
        zero_snr = cfg.pop("zero_terminal_snr", False)
        T = cfg.pop("T", 1000)
        if name in SCHEDULE_NAMES:  # zero_terminal_snr is a key of the config, not of a builder
            _check_options(name, cfg, extra=("zero_terminal_snr",))
        sched = cls.from_name(name, T, **cfg)
        if zero_snr:
            sched = sched.rescale_zero_terminal_snr()
        return sched.with_interpolation(interpolation) if interpolation != "log_snr" else sched

    def __repr__(self) -> str:
        items = dict(self.params)
        if self.interpolation != "log_snr":
            items["interpolation"] = self.interpolation
        extra = ", ".join(f"{k}={v}" for k, v in items.items())
        return f"NoiseSchedule.{self.name}({extra})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, NoiseSchedule)
            and self.interpolation == other.interpolation
            and torch.equal(self.betas, other.betas)
        )

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ tables
    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return int(self.betas.numel())

    @property
    def zero_terminal_snr(self) -> bool:
        """True when ᾱ_{T-1} = 0 (pure noise at the last step)."""
        return bool(self.alphas_cumprod[-1] == 0)

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        """ᾱ_{t-1} with ᾱ_{-1} = 1, float64 [T]."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    @property
    def sigmas_ve(self) -> Tensor:
        """σ^VE_t = √((1-ᾱ_t)/ᾱ_t), float64 [T] (k-diffusion's sigmas; ∞ at ᾱ=0)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def log_snr_table(self) -> Tensor:
        """λ_t = log(ᾱ_t/(1-ᾱ_t)) at integer t, float64 [T]."""
        return self._log_snr.clone()

    def table(
        self,
        name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """A cached copy of a float64 table (``betas``, ``alphas_cumprod``, ``log_snr``)."""
        check_choice("schedule table", name, ("betas", "alphas_cumprod", "log_snr"))
        src = lambda: self._log_snr if name == "log_snr" else getattr(self, name)  # noqa: E731
        return self.derived_table(name, src, device, dtype)

    def derived_table(
        self,
        key: str,
        build: Callable[[], Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """A cached device copy of a table computed from this schedule on the host (in
        float64) by ``build()`` on first use, e.g. the posterior coefficients per timestep.

        Per-step code gathers from it with device timesteps: no host read and no
        host-to-device copy per step (a pageable copy waits for the queued GPU work)."""
        cache_key = (key, str(device), dtype)
        if cache_key not in self._cache:
            self._cache[cache_key] = build().to(device=device, dtype=dtype)
        return self._cache[cache_key]

    # ------------------------------------------------------------------ continuous view
    @overload
    def log_snr(self, t: Tensor) -> Tensor: ...
    @overload
    def log_snr(self, t: float) -> float: ...
    def log_snr(self, t: TimeLike) -> TimeLike:
        """λ(t) for float ``t`` in [0, T-1]: exact at integers, linear in λ in between (or
        linear in σ^VE = exp(-λ/2) with ``interpolation="sigma"``).

        On a zero-terminal-SNR schedule the last interval ends at λ = -∞ (σ^VE = ∞), where
        neither rule has a meaning (linear in σ^VE would put all of (T-2, T-1) at σ^VE = ∞);
        with either interpolation α(t) falls linearly to 0 there instead, so every t < T-1
        keeps a finite λ and ``t_from_log_snr`` stays an exact inverse.  A float ``t``
        outside [0, T-1] raises; tensor ``t`` is clamped (checking it would synchronise the
        device).
        """
        if isinstance(t, Tensor):
            return self._log_snr_tensor(t)
        return self._log_snr_float(float(t))

    def _log_snr_tensor(self, t: Tensor) -> Tensor:
        lam = self.table("log_snr", t.device, torch.float32)
        tc = t.to(torch.float32).clamp(0, self.num_timesteps - 1)
        lo = tc.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        frac = tc - lo
        a, b = lam[lo], lam[hi]
        if self.interpolation == "sigma":  # linear in σ^VE = exp(-λ/2)
            sa, sb = torch.exp(-0.5 * a), torch.exp(-0.5 * b)
            inner = -2.0 * torch.log(sa + frac * (sb - sa))
        else:
            inner = a + frac * (b - a)
        # Zero terminal SNR: the last interval ends at λ = -∞; there α falls linearly to 0.
        alpha_end = (1 - frac) * torch.sigmoid(a).sqrt()
        end = 2 * torch.log(alpha_end) - torch.log1p(-(alpha_end**2))
        inner = torch.where(torch.isinf(b), end, inner)
        # frac == 0 must not touch b (which may be -inf): torch.where keeps it exact.
        return torch.where(frac == 0, a, inner)

    def _log_snr_float(self, t: float) -> float:
        T = self.num_timesteps
        if not (0.0 <= t <= T - 1):
            raise ValueError(f"timestep {t} outside the schedule's range [0, {T - 1}]")
        lo = int(math.floor(t))
        frac = t - lo
        a = self._log_snr_list[lo]
        if frac == 0.0:
            return a
        b = self._log_snr_list[lo + 1]
        if b == -math.inf:  # zero terminal SNR: α falls linearly to 0 over the last interval
            alpha_end = (1 - frac) * math.sqrt(_sigmoid(a))
            if alpha_end == 0.0:
                return -math.inf
            return 2 * math.log(alpha_end) - math.log1p(-(alpha_end**2))
        if self.interpolation == "sigma":  # linear in σ^VE = exp(-λ/2)
            sa, sb = math.exp(-0.5 * a), math.exp(-0.5 * b)
            return -2.0 * math.log(sa + frac * (sb - sa))
        return a + frac * (b - a)

    @overload
    def alpha(self, t: Tensor) -> Tensor: ...
    @overload
    def alpha(self, t: float) -> float: ...
    def alpha(self, t: TimeLike) -> TimeLike:
        """α(t) = √ᾱ(t) = √sigmoid(λ(t))."""
        lam = self.log_snr(t)
        if isinstance(lam, Tensor):
            return torch.sigmoid(lam).sqrt()
        return math.sqrt(_sigmoid(lam))

    @overload
    def sigma(self, t: Tensor) -> Tensor: ...
    @overload
    def sigma(self, t: float) -> float: ...
    def sigma(self, t: TimeLike) -> TimeLike:
        """σ(t) = √(1-ᾱ(t)) = √sigmoid(-λ(t))."""
        lam = self.log_snr(t)
        if isinstance(lam, Tensor):
            return torch.sigmoid(-lam).sqrt()
        return math.sqrt(_sigmoid(-lam))

    def t_from_log_snr(self, log_snr: float) -> float:
        """Inverse of ``log_snr`` (with the same interpolation): the fractional timestep whose
        λ equals ``log_snr``.

        λ outside the table's range is clamped to t = 0 (cleanest) or T-1 (noisiest).
        """
        lam = self._log_snr_list
        T = self.num_timesteps
        if log_snr >= lam[0]:
            return 0.0
        if log_snr <= lam[-1]:
            return float(T - 1)
        # binary search for lam[i] >= log_snr > lam[i+1] (λ is strictly decreasing)
        lo, hi = 0, T - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if lam[mid] >= log_snr:
                lo = mid
            else:
                hi = mid
        a, b = lam[lo], lam[hi]
        if log_snr == a:
            return float(lo)
        if b == -math.inf:  # the last interval of a zero-terminal-SNR schedule: α linear
            return lo + 1.0 - math.sqrt(_sigmoid(log_snr)) / math.sqrt(_sigmoid(a))
        if self.interpolation == "sigma":
            sa, sb = math.exp(-0.5 * a), math.exp(-0.5 * b)
            return lo + (math.exp(-0.5 * log_snr) - sa) / (sb - sa)
        return lo + (log_snr - a) / (b - a)

    def t_from_sigma_ve(self, sigma_ve: float) -> float:
        """The fractional timestep whose σ^VE = σ/α equals ``sigma_ve`` (λ = -2 log σ^VE)."""
        if sigma_ve <= 0:
            return 0.0
        if sigma_ve == math.inf:
            return float(self.num_timesteps - 1)
        return self.t_from_log_snr(-2.0 * math.log(sigma_ve))

    # ------------------------------------------------------------------ discretisations
    def timesteps(
        self,
        steps: int | None,
        spacing: str | Sequence[float] = "trailing",
        *,
        steps_offset: int = 0,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> list[float]:
        """``steps`` strictly decreasing timesteps in [0, T-1] for sampling.

        Spacings (diffusers' names where they exist):
        - ``leading``: t_i = i·⌊T/N⌋ + steps_offset (DDIM, Song et al. 2021; SD 1.x's default).
        - ``trailing``: t_i = round(T - i·T/N) - 1, always starting at T-1 (Lin et al. 2023).
        - ``linspace``: round(linspace(0, T-1, N)) (reversed).
        - ``karras``: σ^VE_i = (σ_max^{1/ρ} + i/(N-1)·(σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ
          (Karras et al. 2022, eq. 5), mapped to fractional t through λ = -2 log σ^VE.
          ρ > 0 crowds the steps at low noise (EDM: ρ = 7); ρ < 0 makes the grid uniform in
          SNR^{1/(2|ρ|)}, slightly longer steps at high noise than ``logsnr`` (its limit as
          ρ → ±∞); ρ = 0 is not allowed (use ``logsnr``).
        - ``logsnr``: uniform in λ (DPM-Solver's "logSNR" order, Lu et al. 2022).
        - ``exponential``: uniform in log σ^VE (k-diffusion's name for the same grid as
          ``logsnr``: λ = -2 log σ^VE).
        - a sequence: custom timesteps, checked to be strictly decreasing within [0, T-1].

        The sigma-based spacings on a zero-terminal-SNR schedule (σ_max = ∞) put the first
        step at t = T-1 and spread the other N-1 between σ_min and the largest finite σ.
        """
        T = self.num_timesteps
        if not isinstance(spacing, str):
            ts = [float(v) for v in spacing]
            _check_custom(ts, T)
            if steps is not None and steps != len(ts):
                raise ValueError(f"steps={steps} but the custom timestep list has {len(ts)}")
            return ts
        check_choice("spacing", spacing, SPACINGS)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if spacing in ("leading", "trailing", "linspace") and steps > T:
            raise ValueError(f"steps={steps} exceeds the schedule's T={T} for {spacing} spacing")
        if spacing == "leading":
            ratio: float = T // steps
            ts = [float(i * ratio + steps_offset) for i in range(steps)][::-1]
            if ts[0] > T - 1:
                raise ValueError(f"steps_offset={steps_offset} pushes the first timestep past T-1")
        elif spacing == "trailing":
            ratio = T / steps
            ts = [float(round(T - i * ratio) - 1) for i in range(steps)]
        elif spacing == "linspace":
            if steps == 1:
                ts = [float(T - 1)]
            else:
                ts = [float(round(i * (T - 1) / (steps - 1))) for i in range(steps)][::-1]
        else:
            ts = self._sigma_spacing(spacing, steps, rho, sigma_min, sigma_max)
        if steps_offset and spacing != "leading":
            raise ValueError("steps_offset applies only to 'leading' spacing")
        _check_custom(ts, T)
        return ts

    def _sigma_spacing(
        self, spacing: str, steps: int, rho: float, sigma_min: float | None, sigma_max: float | None
    ) -> list[float]:
        if spacing == "karras" and (not math.isfinite(rho) or rho == 0):
            raise ValueError(
                f"karras spacing needs a finite rho != 0 (EDM uses 7; negative values are "
                f"allowed, 'logsnr' is the limit rho -> ±inf), got rho={rho}"
            )
        sig = self.sigmas_ve.tolist()
        finite = [s for s in sig if math.isfinite(s)]
        smin = float(sigma_min) if sigma_min is not None else finite[0]
        lead_inf = sigma_max is None and not math.isfinite(sig[-1])
        smax = float(sigma_max) if sigma_max is not None else finite[-1]
        if not (0 < smin < smax):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {smin} and {smax}")
        n = steps - 1 if lead_inf else steps
        sigmas: list[float] = []
        if n == 1:
            sigmas = [smax]
        elif n > 1:
            if spacing == "karras":
                a, b = smax ** (1 / rho), smin ** (1 / rho)
                sigmas = [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)]
            else:  # logsnr / exponential: uniform in log σ^VE
                la, lb = math.log(smax), math.log(smin)
                sigmas = [math.exp(la + i / (n - 1) * (lb - la)) for i in range(n)]
        ts = [self.t_from_sigma_ve(s) for s in sigmas]
        if lead_inf:
            ts = [float(self.num_timesteps - 1)] + ts
        return ts

    def noise_levels(
        self, timesteps: Sequence[float], *, final_timestep: float | None = None
    ) -> NoiseLevels:
        """The ``NoiseLevels`` of a timestep sequence, ending in the clean level (α=1, σ=0).

        ``final_timestep`` ends the walk at that timestep's noise level instead: diffusers'
        DDIM and PNDM schedulers with ``set_alpha_to_one=False`` (Stable Diffusion's
        ``scheduler_config.json``) step last to ᾱ_0, not to ᾱ = 1, and ``final_timestep=0``
        reproduces them.  It must lie below the last sampling timestep.
        """
        ts = [float(t) for t in timesteps]
        final = math.inf
        if final_timestep is not None:
            if not ts or not 0 <= final_timestep < ts[-1]:
                raise ValueError(
                    f"final_timestep={final_timestep} must lie in [0, {ts[-1] if ts else 0}) "
                    "(below the last sampling timestep)"
                )
            final = float(self.log_snr(float(final_timestep)))
        lams = [float(self.log_snr(t)) for t in ts] + [final]
        return NoiseLevels(t=ts, log_snr=lams)


@dataclass(frozen=True)
class NoiseLevels:
    """The explicit sequence a sampler walks: N model timesteps and N+1 noise levels.

    ``t[i]`` is the model timestep of level ``i``; ``log_snr`` has one more entry, the final
    clean level (λ = +∞: α = 1, σ = 0).  All values are host floats, so reading them in the
    sampling loop never synchronises a device.
    """

    t: list[float]
    log_snr: list[float]

    def __post_init__(self) -> None:
        if not self.t:  # a sampler walks at least one step (img2img says so too)
            raise ValueError("NoiseLevels needs at least one step; got t=[]")
        if len(self.log_snr) != len(self.t) + 1:
            raise ValueError("log_snr needs exactly one more entry than t (the final level)")
        for a, b in zip(self.log_snr[:-1], self.log_snr[1:]):
            if not b > a:
                raise ValueError(
                    f"noise levels must strictly decrease in noise; got λ {a} then {b}"
                )

    def __len__(self) -> int:
        return len(self.t)

    @property
    def alpha(self) -> list[float]:
        """α_i = √sigmoid(λ_i), N+1 host floats (1.0 at the end)."""
        return [math.sqrt(_sigmoid(lam)) for lam in self.log_snr]

    @property
    def sigma(self) -> list[float]:
        """σ_i = √sigmoid(-λ_i), N+1 host floats (0.0 at the end)."""
        return [math.sqrt(_sigmoid(-lam)) for lam in self.log_snr]

    @property
    def sigma_ve(self) -> list[float]:
        """σ^VE_i = σ_i/α_i = exp(-λ_i/2), N+1 host floats (0 at the end, ∞ at zero SNR)."""
        return [math.exp(-lam / 2) if lam != math.inf else 0.0 for lam in self.log_snr]

    def tail(self, start: int) -> NoiseLevels:
        """The levels from index ``start`` on (img2img starts part-way down)."""
        return NoiseLevels(t=self.t[start:], log_snr=self.log_snr[start:])


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"T (number of training timesteps) must be an integer >= 2, got {T!r}")


def _check_custom(ts: list[float], T: int) -> None:
    if not ts:
        raise ValueError("the timestep sequence is empty")
    for v in ts:
        if not (0 <= v <= T - 1):
            raise ValueError(f"timestep {v} outside [0, {T - 1}]")
    for a, b in zip(ts[:-1], ts[1:]):
        if not b < a:
            raise ValueError(
                f"timesteps must be strictly decreasing (distinct); got {a} then {b}. "
                "Fewer steps or another spacing avoids duplicates."
            )


SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")


def _check_options(name: str, keys: Any, extra: Sequence[str] = ()) -> None:
    """Raise for a key that the named schedule's constructor does not take (with a hint)."""
    params = inspect.signature(getattr(NoiseSchedule, name)).parameters
    allowed = [*params, *extra]
    for key in keys:
        if key not in allowed:
            raise ValueError(unknown_message(f"option of the {name!r} schedule", key, allowed))
