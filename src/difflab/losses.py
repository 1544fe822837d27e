"""Training objectives: what the network regresses, how each timestep is weighted, which
timesteps are drawn.

Owns: the regression MSE in the model's parametrization (eps / x0 / v, targets from
``parametrization.target``), the loss weightings (none, SNR, min-SNR-γ), the hybrid objective
L_simple + λ·L_vlb for learned variances (Nichol & Dhariwal 2021), offset noise and input
perturbation, and the timestep samplers (uniform, loss-second-moment importance sampling).
``training_loss`` is the one entry point the training loop calls.

Knows nothing of optimisers, EMA or data loading.

Weightings are defined on the x0-space error ‖x0 - x̂0‖² and converted to the model's own
parametrization (Hang et al. 2023, "Min-SNR", §3): with SNR = α²/σ² = e^λ,
‖ε - ε̂‖² = SNR·‖x0 - x̂0‖² and ‖v - v̂‖² = (SNR+1)·‖x0 - x̂0‖², so an x0-space weight w(SNR)
becomes w/SNR on an ε-loss, w/(SNR+1) on a v-loss and w on an x0-loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._validate import check_choice
from .diffusion import mean_flat, q_sample, vlb_from_output
from .parametrization import PREDICTIONS, VARIANCES, DenoiserNet, split_variance, target
from .schedules import NoiseSchedule

Weighting = Literal["none", "snr", "min_snr"]
WEIGHTINGS: tuple[str, ...] = ("none", "snr", "min_snr")
Generators = torch.Generator | Sequence[torch.Generator] | None


def loss_weight(weighting: str, prediction: str, log_snr: Tensor, snr_gamma: float = 5.0) -> Tensor:
    """Per-sample weight on the MSE in ``prediction`` space, from λ = log SNR ``[B]``.

    - ``none``: 1 (L_simple of Ho et al. 2020 in the model's own parametrization).
    - ``snr``: the x0-space weight SNR, i.e. the ε-prediction loss of Ho et al. whatever the
      parametrization (Hang et al. 2023, Table 1 "SNR"): 1 for eps, SNR/(SNR+1) for v, SNR
      for x0.  Finite at SNR = 0; for x0-prediction it is SNR itself, which grows without
      bound as SNR → ∞ (no discrete schedule reaches SNR = ∞: ᾱ_0 < 1).
    - ``min_snr``: the x0-space weight min(SNR, γ) (Hang et al. 2023, eq. 8): min(SNR,γ)/SNR
      for eps, min(SNR,γ)/(SNR+1) for v, min(SNR,γ) for x0.  Finite at SNR = 0 and ∞
      (eps → 1 and 0; v → 0 and 0; x0 → 0 and γ).

    Computed in float32 from λ so that λ = ±∞ (zero-terminal-SNR schedules) stays exact.
    """
    check_choice("loss weighting", weighting, WEIGHTINGS)
    check_choice("prediction", prediction, PREDICTIONS)
    lam = log_snr.float()
    if weighting == "none":
        return torch.ones_like(lam)
    if weighting == "snr":
        if prediction == "eps":
            return torch.ones_like(lam)
        if prediction == "v":
            return torch.sigmoid(lam)  # SNR/(SNR+1)
        return torch.exp(lam)
    if not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
    snr = torch.exp(lam)
    clipped = snr.clamp(max=snr_gamma)  # min(SNR, γ)
    if prediction == "eps":
        return (snr_gamma * torch.exp(-lam)).clamp(max=1.0)  # min(SNR,γ)/SNR = min(1, γ/SNR)
    if prediction == "v":
        return clipped * torch.sigmoid(-lam)  # min(SNR,γ)/(SNR+1)
    return clipped


# ---------------------------------------------------------------------------- timestep samplers
class TimestepSampler:
    """Draws training timesteps t ~ p_t with importance weights 1/(T·p_t).

    The weights make E[w_t·L_t] under p equal the uniform average over t, so the loss's
    expectation does not depend on the sampler (improved-diffusion's ``ScheduleSampler``).
    Draws come from the sampler's own ``numpy.random.Generator``; ``state_dict`` holds its
    state, so a resumed run draws the same timesteps.
    """

    def __init__(self, num_timesteps: int, rng: np.random.Generator | int = 0):
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def probabilities(self) -> np.ndarray:
        """p_t over the T timesteps, float64 ``[T]`` summing to 1."""
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)

    def sample(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(t [B] long, weights [B] float32)`` with weights 1/(T·p_t)."""
        p = self.probabilities()
        t = self.rng.choice(self.num_timesteps, size=(batch_size,), p=p)
        w = 1.0 / (self.num_timesteps * p[t])
        return (
            torch.from_numpy(t).long().to(device),
            torch.from_numpy(w).float().to(device),
        )

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample losses at their timesteps (no-op unless the sampler learns)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the draws exactly."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``."""
        self.rng.bit_generator.state = state["rng"]


class UniformSampler(TimestepSampler):
    """p_t = 1/T: every weight is 1."""


class LossSecondMomentSampler(TimestepSampler):
    """Importance sampling with p_t ∝ √E[L_t²] (Nichol & Dhariwal 2021, eq. 18).

    E[L_t²] is the mean of the last ``history`` losses seen at t; until every t has a full
    history the draws are uniform.  A ``uniform_prob`` share of p is spread uniformly so no
    t starves.  Call ``update(t, losses)`` after each step (``training_loss`` does).
    """

    def __init__(
        self,
        num_timesteps: int,
        rng: np.random.Generator | int = 0,
        *,
        history: int = 10,
        uniform_prob: float = 0.001,
    ):
        super().__init__(num_timesteps, rng)
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive integer, got {history!r}")
        if not 0 <= uniform_prob <= 1:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = np.zeros((num_timesteps, history), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    @property
    def warmed_up(self) -> bool:
        """True once every timestep has ``history`` recorded losses."""
        return bool((self.loss_counts == self.history).all())

    def probabilities(self) -> np.ndarray:
        T = self.num_timesteps
        if not self.warmed_up:
            return np.full(T, 1.0 / T)
        rms = np.sqrt(np.mean(self.loss_history**2, axis=-1))  # √E[L_t²], [T]
        total = rms.sum()
        p = rms / total if total > 0 else np.full(T, 1.0 / T)
        p = p * (1 - self.uniform_prob) + self.uniform_prob / T
        return p / p.sum()

    def update(self, t: Tensor, losses: Tensor) -> None:
        ts = t.detach().cpu().long().tolist()
        ls = losses.detach().float().cpu().tolist()
        for ti, li in zip(ts, ls):
            if not math.isfinite(li):
                continue
            if self.loss_counts[ti] == self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:]
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, self.loss_counts[ti]] = li
                self.loss_counts[ti] += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "loss_history": self.loss_history.tolist(),
            "loss_counts": self.loss_counts.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.loss_history = np.asarray(state["loss_history"], dtype=np.float64)
        self.loss_counts = np.asarray(state["loss_counts"], dtype=np.int64)


TIMESTEP_SAMPLERS: dict[str, type[TimestepSampler]] = {
    "uniform": UniformSampler,
    "loss_second_moment": LossSecondMomentSampler,
    "importance": LossSecondMomentSampler,  # the training config's name for it
}


def make_timestep_sampler(
    name: str, num_timesteps: int, rng: np.random.Generator | int = 0, **kwargs: Any
) -> TimestepSampler:
    """A timestep sampler by name: ``uniform`` or ``loss_second_moment`` (alias ``importance``)."""
    check_choice("timestep sampler", name, TIMESTEP_SAMPLERS)
    return TIMESTEP_SAMPLERS[name](num_timesteps, rng, **kwargs)


# ---------------------------------------------------------------------------- the loss
@dataclass
class LossOutput:
    """One training step's loss and its parts.

    ``loss = (importance_weights * per_sample).mean()``; ``per_sample = weights·mse +
    vlb_weight·T·vlb`` (the vlb part only for learned variances); ``mse`` is the unweighted
    MSE in the model's parametrization, ``vlb`` L_t in bits/dim.
    """

    loss: Tensor  # scalar
    per_sample: Tensor  # [B]
    t: Tensor  # [B] long
    mse: Tensor  # [B]
    vlb: Tensor | None  # [B]
    weights: Tensor  # [B]: the loss weighting applied to mse
    importance_weights: Tensor | None = None  # [B]: 1/(T·p_t) from the timestep sampler


def _randn(shape: Sequence[int], generator: Generators, device: torch.device) -> Tensor:
    """N(0, I) float32 on ``device``; a list of generators draws row i from the i-th."""
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gdev).to(device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(
            f"got {len(gens)} generators for a batch of {shape[0]}; pass one per sample"
        )
    return torch.stack(
        [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in gens]
    ).to(device)


def _randint(T: int, b: int, generator: Generators, device: torch.device) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else device
        return torch.randint(0, T, (b,), generator=generator, device=gdev).to(device)
    gens = list(generator)
    if len(gens) != b:
        raise ValueError(f"got {len(gens)} generators for a batch of {b}; pass one per sample")
    return torch.cat([torch.randint(0, T, (1,), generator=g, device=g.device) for g in gens]).to(
        device
    )


def training_loss(
    model: DenoiserNet,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixedsmall",
    weighting: str = "none",
    snr_gamma: float = 5.0,
    vlb_weight: float = 0.001,
    cond: dict[str, Any] | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    timestep_sampler: TimestepSampler | None = None,
    offset_noise: float = 0.0,
    input_perturbation: float = 0.0,
    generator: Generators = None,
) -> LossOutput:
    """The diffusion training loss of one batch ``x0 [B, C, ...]``.

    1. t ~ uniform integers in [0, T-1] (or ``timestep_sampler``, or given ``t``).
    2. ε ~ N(0, I), plus ``offset_noise``·N(0, 1) per sample and channel (Guttenberg 2023).
    3. x_t = α_t·x0 + σ_t·(ε + ``input_perturbation``·ξ) (Ning et al. 2023: the input is
       perturbed, the target keeps ε).
    4. MSE between ``model(x_t, t, **cond)`` and the target in ``prediction`` space
       (``parametrization.target``), weighted by ``loss_weight(weighting, ...)``.
    5. For ``variance`` "learned" / "learned_range": the hybrid L_simple + λ·L_vlb of
       Nichol & Dhariwal 2021 §3.1, with L_vlb = T·L_t (bits/dim, one sampled t) and the
       mean output detached in the VLB term, so L_vlb trains only Σ_θ.

    The loss arithmetic runs in float32 whatever the model's dtype; the model sees x_t in
    ``x0``'s dtype and t as float ``[B]``.  A ``LossSecondMomentSampler`` is updated with the
    per-sample losses.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("variance", variance, VARIANCES)
    check_choice("loss weighting", weighting, WEIGHTINGS)
    for name, val in (
        ("offset_noise", offset_noise),
        ("input_perturbation", input_perturbation),
        ("vlb_weight", vlb_weight),
    ):
        if not (math.isfinite(val) and val >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {val}")
    T = schedule.num_timesteps
    b, dev, nd = x0.shape[0], x0.device, x0.ndim
    if nd < 2:
        raise ValueError(f"x0 must be a batch [B, C, ...], got shape {tuple(x0.shape)}")
    x0f = x0.float()

    is_weights: Tensor | None = None
    if t is not None:
        t = torch.as_tensor(t, device=dev)
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("training timesteps t must be integers in [0, T-1]")
        t = t.long().expand(b) if t.ndim == 0 else t.long()
        if t.shape != (b,) or ((t < 0) | (t >= T)).any():  # a host read: given t only
            raise ValueError(f"t must be {b} integers in [0, {T - 1}], got {t.tolist()}")
    elif timestep_sampler is not None:
        t, is_weights = timestep_sampler.sample(b, dev)
    else:
        t = _randint(T, b, generator, dev)
    if timestep_sampler is not None and timestep_sampler.num_timesteps != T:
        raise ValueError(
            f"timestep sampler has T={timestep_sampler.num_timesteps}, the schedule T={T}"
        )
    if noise is None:
        noise = _randn(x0.shape, generator, dev)
    noise = noise.float()
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 {tuple(x0.shape)}")
    if offset_noise > 0:
        noise = noise + offset_noise * _randn(x0.shape[:2] + (1,) * (nd - 2), generator, dev)
    model_noise = noise
    if input_perturbation > 0:
        model_noise = noise + input_perturbation * _randn(x0.shape, generator, dev)

    x_t, _ = q_sample(schedule, x0f, t, model_noise)
    lam = schedule.log_snr(t.float())
    alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    out = model(x_t.to(x0.dtype), t.float(), **(cond or {})).float()
    mean_out, var_values = split_variance(out, variance)
    if mean_out.shape != x0.shape:
        raise ValueError(
            f"model output {tuple(out.shape)} does not fit x0 {tuple(x0.shape)} "
            f"with variance={variance!r}"
        )
    tgt = target(prediction, x0f, noise, alpha, sigma)
    mse = mean_flat((mean_out - tgt) ** 2)
    weights = loss_weight(weighting, prediction, lam, snr_gamma)
    per_sample = weights * mse

    vlb = None
    if var_values is not None:
        # improved-diffusion: the VLB term sees the mean detached (stop-gradient), so it
        # trains only the variance; L_vlb = Σ_t L_t ≈ T·L_t for one uniformly drawn t.
        frozen = torch.cat([mean_out.detach(), var_values], dim=1)
        vlb = vlb_from_output(
            schedule, x0f, x_t, t, frozen, prediction=prediction, variance=variance
        ).vb
        per_sample = per_sample + vlb_weight * T * vlb

    if isinstance(timestep_sampler, TimestepSampler):
        timestep_sampler.update(t, per_sample.detach())
    scaled = per_sample if is_weights is None else per_sample * is_weights
    return LossOutput(
        loss=scaled.mean(),
        per_sample=per_sample,
        t=t,
        mse=mse,
        vlb=vlb,
        weights=weights,
        importance_weights=is_weights,
    )


__all__ = [
    "WEIGHTINGS",
    "LossOutput",
    "LossSecondMomentSampler",
    "TimestepSampler",
    "UniformSampler",
    "loss_weight",
    "make_timestep_sampler",
    "training_loss",
]
