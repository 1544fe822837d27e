"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models" — EDM2, sec. 3 and appendix C).

Owns the power-function EMA and its maths: the σ_rel ↔ γ conversion (eq. 3), the update
``β_γ(t) = (1 - 1/t)^(γ+1)`` whose averaging profile is ``p_t(τ) ∝ τ^γ`` on ``(0, t]``,
snapshots of EMA copies for a few γ written at regular intervals during training
(``RUN/posthoc_ema/``), and the reconstruction after training of the EMA of *any* σ_rel as
the least-squares combination of the snapshots' profiles (the overlap integrals of the
paper's appendix C.3). Knows nothing of the training loop beyond "one update per optimiser
step"; time ``t`` counts those updates.

Files (safetensors, no pickle):

- ``RUN/posthoc_ema/phema-<step>-sigma<σ_rel>.safetensors``: a snapshot, the EMA network's
  state dict; metadata ``format``, ``step``, ``t``, ``sigma_rel``, ``gamma``.
- ``RUN/posthoc_ema/tracking-<step>.safetensors``: the running EMA copies at a checkpoint
  (exact resume); the one matching the checkpoint's step is read back.
- ``RUN/ema_sigma<σ_rel>.safetensors``: a reconstruction, loadable by
  ``Pipeline.from_run(run, weights="ema_sigma0.050")``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .._validate import unknown_message
from ..runs import atomic_write_bytes

__all__ = [
    "FORMAT",
    "SNAPSHOT_DIR",
    "PostHocEMA",
    "PostHocEMAConfig",
    "Snapshot",
    "gamma_to_sigma_rel",
    "list_snapshots",
    "power_ema_beta",
    "profile_inner_product",
    "reconstruct",
    "reconstruction_weights",
    "sigma_rel_to_gamma",
    "write_reconstructions",
]

FORMAT = "difflab-phema/1"
SNAPSHOT_DIR = "posthoc_ema"
# σ_rel(γ) rises from 0 at γ = -1 to its peak at γ = (√5 - 3)/2 and falls after it; EDM2's
# profiles live on the falling branch, where each σ_rel has one γ.
_GAMMA_PEAK = (math.sqrt(5.0) - 3.0) / 2.0
_SNAPSHOT = re.compile(r"phema-(\d+)-sigma([0-9.]+)\.safetensors")


# --------------------------------------------------------------------------- the maths
def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile ``p(τ) ∝ τ^γ`` (EDM2 eq. 3):
    ``σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3)))``."""
    if not gamma > -1.0:
        raise ValueError(f"a power-function EMA needs gamma > -1, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Inverse of :func:`gamma_to_sigma_rel`: the largest real root of
    ``γ³ + 7γ² + (16 - σ_rel⁻²)γ + (12 - σ_rel⁻²) = 0`` (EDM2 appendix C.2), in float64.

    :raises ValueError: ``σ_rel`` outside ``(0, 0.3003]`` (the peak of eq. 3).
    """
    peak = gamma_to_sigma_rel(_GAMMA_PEAK)
    if not 0.0 < sigma_rel <= peak:
        raise ValueError(f"sigma_rel must be in (0, {peak:.4f}], got {sigma_rel}")
    lo, hi = _GAMMA_PEAK, 1.0
    while gamma_to_sigma_rel(hi) > sigma_rel:  # σ_rel falls with γ on [peak, ∞)
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # bisection to float64 resolution
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if gamma_to_sigma_rel(mid) > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


def power_ema_beta(t: int, gamma: float) -> float:
    """EMA coefficient of update ``t = 1, 2, ...``: ``β_γ(t) = (1 - 1/t)^(γ+1)`` (EDM2 eq. 2).

    After ``t`` updates the average weighs the ``τ``-th parameter value by
    ``(τ^(γ+1) - (τ-1)^(γ+1)) / t^(γ+1)``, the integral over ``(τ-1, τ]`` of the profile
    ``p_t(s) = (γ+1) s^γ / t^(γ+1)``; the first update (β = 0) copies the parameters.
    """
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_inner_product(t_a: Tensor, g_a: Tensor, t_b: Tensor, g_b: Tensor) -> Tensor:
    """``∫₀^∞ p_{t_a,γ_a}(τ) p_{t_b,γ_b}(τ) dτ`` of two power profiles (EDM2 appendix C.3),
    broadcast over the arguments, in float64.

    With ``t_a <= t_b`` the integral runs over ``(0, t_a]`` and equals
    ``(γ_a + 1)(γ_b + 1) / ((γ_a + γ_b + 1) t_b) · (t_a / t_b)^γ_b``.
    """
    t_a, g_a, t_b, g_b = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64)
                                                   for v in (t_a, g_a, t_b, g_b)))  # fmt: skip
    first = t_a <= t_b  # the profile that ends first bounds the overlap
    t_lo, t_hi = torch.where(first, t_a, t_b), torch.where(first, t_b, t_a)
    g_hi = torch.where(first, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * t_hi) * (t_lo / t_hi) ** g_hi


def reconstruction_weights(
    snap_t: Tensor, snap_gamma: Tensor, target_t: float, target_gamma: float
) -> Tensor:
    """Weights ``x`` with ``Σ_i x_i p_i ≈ p_target`` in the least-squares sense over
    ``(0, ∞)``: the normal equations ``A x = b`` with ``A_ij = <p_i, p_j>`` and
    ``b_i = <p_i, p_target>`` (EDM2 appendix C.3), rescaled to sum to 1 so a constant
    parameter is reproduced exactly. ``[n]`` float64."""
    t = torch.as_tensor(snap_t, dtype=torch.float64)
    g = torch.as_tensor(snap_gamma, dtype=torch.float64)
    gram = profile_inner_product(t[:, None], g[:, None], t[None], g[None])  # (n, n)
    rhs = profile_inner_product(t, g, torch.tensor(float(target_t)), torch.tensor(target_gamma))
    x = torch.linalg.solve(gram, rhs)
    return x / x.sum()


# --------------------------------------------------------------------------- config
@dataclass
class PostHocEMAConfig:
    """``train.posthoc_ema``: ``{sigma_rels: [0.05, 0.10], every: 100}``.

    :param sigma_rels: the σ_rel of each tracked EMA (EDM2 tracks 0.05 and 0.10).
    :param every: write a snapshot of each every this many optimiser steps (and at the last
        step); the reconstruction is good when a run has a few tens of snapshots.
    """

    sigma_rels: tuple[float, ...] = (0.05, 0.10)
    every: int = 100

    def __post_init__(self) -> None:
        self.sigma_rels = tuple(float(s) for s in self.sigma_rels)
        if not self.sigma_rels:
            raise ValueError("train.posthoc_ema.sigma_rels must name at least one sigma_rel")
        for s in self.sigma_rels:
            try:
                sigma_rel_to_gamma(s)
            except ValueError as err:
                raise ValueError(f"train.posthoc_ema.sigma_rels: {err}") from None
        names = [_sigma_name(s) for s in self.sigma_rels]
        if len(set(names)) != len(names):
            raise ValueError(
                f"train.posthoc_ema.sigma_rels {list(self.sigma_rels)} must differ in their "
                "first 3 decimals (they name the snapshot files)"
            )
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"train.posthoc_ema.every must be an integer >= 1, got {self.every}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PostHocEMAConfig:
        """From the config section; unknown keys raise ``ValueError`` with a suggestion."""
        if not isinstance(data, Mapping):
            raise ValueError(f"train.posthoc_ema must be a mapping, got {data!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                raise ValueError(unknown_message("config key in 'train.posthoc_ema'", key, known))
        sigma_rels = data.get("sigma_rels", cls.sigma_rels)
        if isinstance(sigma_rels, (int, float)):
            sigma_rels = [sigma_rels]
        return cls(sigma_rels=tuple(sigma_rels), every=data.get("every", cls.every))


def _sigma_name(sigma_rel: float) -> str:
    return f"sigma{sigma_rel:.3f}"


# --------------------------------------------------------------------------- tracking
class PostHocEMA:
    """Power-function EMA copies of a network for several σ_rel, with snapshots.

    :param model: the raw network (unwrapped); one deep copy per σ_rel is kept.
    :param config: σ_rels and snapshot interval.
    :param run_dir: snapshots go to ``run_dir/posthoc_ema``.
    :param last_step: the run's final step, which always gets a snapshot.
    :param write: whether this process writes files (rank 0 under DDP).
    """

    def __init__(
        self,
        model: nn.Module,
        config: PostHocEMAConfig,
        run_dir: str | Path,
        *,
        last_step: int | None = None,
        write: bool = True,
    ) -> None:
        self.config = config
        self.gammas = [sigma_rel_to_gamma(s) for s in config.sigma_rels]
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.gammas]
        self.dir = Path(run_dir) / SNAPSHOT_DIR
        self.last_step = last_step
        self.write = write
        self.num_updates = 0
        self._kept_state: int | None = None  # the tracking file of the published checkpoint

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> list[Path]:
        """One power-EMA update of every copy towards ``model`` (after optimiser step
        ``step``); writes the snapshots due at ``step`` and returns their paths."""
        self.num_updates += 1
        raw = [p.detach() for p in model.parameters()]
        for copy_, gamma in zip(self.models, self.gammas):
            beta = power_ema_beta(self.num_updates, gamma)
            for e, p in zip(copy_.parameters(), raw):
                e.lerp_(p.to(e.dtype), 1.0 - beta)  # β·e + (1 - β)·p
            for e_buf, b in zip(copy_.buffers(), model.buffers()):
                e_buf.copy_(b)
        due = step % self.config.every == 0 or step == self.last_step
        return self.snapshot(step) if due and self.write else []

    def snapshot(self, step: int) -> list[Path]:
        """Write each copy as ``phema-<step>-sigma<σ>.safetensors``."""
        paths = []
        for sigma, gamma, net in zip(self.config.sigma_rels, self.gammas, self.models):
            meta = {"format": FORMAT, "step": str(step), "t": str(self.num_updates),
                    "sigma_rel": repr(sigma), "gamma": repr(gamma)}  # fmt: skip
            path = self.dir / f"phema-{step:09d}-{_sigma_name(sigma)}.safetensors"
            atomic_write_bytes(path, _tensor_bytes(net.state_dict(), meta))
            paths.append(path)
        return paths

    def save_state(self, step: int) -> Path:
        """Write the running copies for the checkpoint of ``step`` (before that checkpoint is
        published); older tracking files, except the last published one's, are removed."""
        tensors = {f"{i}.{k}": v for i, net in enumerate(self.models)
                   for k, v in net.state_dict().items()}  # fmt: skip
        meta = {"format": FORMAT, "step": str(step), "t": str(self.num_updates),
                "sigma_rels": json.dumps(list(self.config.sigma_rels))}  # fmt: skip
        path = self.dir / f"tracking-{step:09d}.safetensors"
        atomic_write_bytes(path, _tensor_bytes(tensors, meta))
        for old in self.dir.glob("tracking-*.safetensors"):
            if old != path and old != self._state_path(self._kept_state):
                old.unlink(missing_ok=True)
        self._kept_state = step
        return path

    def load_state(self, step: int) -> None:
        """Restore the running copies saved with the checkpoint of ``step``."""
        path = self._state_path(step)
        if not path.is_file():
            raise FileNotFoundError(
                f"train.posthoc_ema is on, but {path} (the power-EMA state of the checkpoint "
                f"at step {step}) does not exist; was the run started without posthoc_ema?"
            )
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        saved = json.loads(meta.get("sigma_rels", "[]"))
        if saved != list(self.config.sigma_rels):
            raise ValueError(
                f"{path} tracks sigma_rels {saved}, but train.posthoc_ema.sigma_rels is "
                f"{list(self.config.sigma_rels)}; resume with the run's sigma_rels"
            )
        tensors = load_file(str(path))
        for i, net in enumerate(self.models):
            prefix = f"{i}."
            net.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items()
                                 if k.startswith(prefix)})  # fmt: skip
        self.num_updates = int(meta["t"])
        self._kept_state = step

    def _state_path(self, step: int | None) -> Path:
        return self.dir / f"tracking-{step if step is not None else -1:09d}.safetensors"


def _tensor_bytes(tensors: Mapping[str, Tensor], metadata: dict[str, str]) -> bytes:
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(plain, metadata=metadata)


# --------------------------------------------------------------------------- reconstruction
@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: its path, optimiser step, EMA time ``t``, σ_rel and γ."""

    path: Path
    step: int
    t: int
    sigma_rel: float
    gamma: float


def list_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """Every snapshot under ``run_dir/posthoc_ema``, ordered by step then σ_rel.

    :raises FileNotFoundError: the run has no snapshots.
    """
    folder = Path(run_dir) / SNAPSHOT_DIR
    out = []
    for path in sorted(folder.glob("phema-*.safetensors")):
        if not _SNAPSHOT.fullmatch(path.name):
            continue
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a difflab post-hoc EMA snapshot ({FORMAT})")
        out.append(Snapshot(path, int(meta["step"]), int(meta["t"]), float(meta["sigma_rel"]),
                            float(meta["gamma"])))  # fmt: skip
    if not out:
        raise FileNotFoundError(
            f"{folder} holds no post-hoc EMA snapshots; train with train.posthoc_ema "
            "(e.g. --set train.posthoc_ema.every=100) to write them"
        )
    return sorted(out, key=lambda s: (s.step, s.sigma_rel))


def reconstruct(
    run_dir: str | Path, sigma_rel: float, *, step: int | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The EMA of profile ``σ_rel`` at ``step`` (default: the last snapshot's) as the
    least-squares combination of the snapshots taken up to then (EDM2 appendix C.3).

    Floating tensors are summed with :func:`reconstruction_weights` in float64 and stored
    in their own dtype; other tensors are the last snapshot's.
    :return: ``(state_dict, metadata)``.
    """
    snaps = list_snapshots(run_dir)
    step = snaps[-1].step if step is None else step
    at = [s for s in snaps if s.step == step]
    if not at:
        steps = sorted({s.step for s in snaps})
        raise ValueError(f"no snapshot at step {step}; snapshots exist at steps {steps}")
    used = [s for s in snaps if s.step <= step]
    gamma = sigma_rel_to_gamma(sigma_rel)
    x = reconstruction_weights(
        torch.tensor([s.t for s in used]), torch.tensor([s.gamma for s in used]), at[0].t, gamma
    )
    acc: dict[str, Tensor] = {}
    for weight, snap in zip(x.tolist(), used):
        for k, v in load_file(str(snap.path)).items():
            if v.is_floating_point():
                acc[k] = acc.get(k, 0) + weight * v.double()
            else:
                acc[k] = v
    last = load_file(str(used[-1].path))
    state = {k: (acc[k].to(v.dtype) if v.is_floating_point() else v) for k, v in last.items()}
    meta = {"format": FORMAT + "-reconstruction", "step": str(step), "t": str(at[0].t),
            "sigma_rel": repr(sigma_rel), "gamma": repr(gamma),
            "snapshots": str(len(used))}  # fmt: skip
    return state, meta


def write_reconstructions(
    run_dir: str | Path,
    sigma_rels: Sequence[float],
    *,
    step: int | None = None,
    out_dir: str | Path | None = None,
) -> list[Path]:
    """:func:`reconstruct` each σ_rel into ``ema_sigma<σ_rel>.safetensors`` in ``out_dir``
    (default the run directory, where ``Pipeline.from_run(run, weights=...)`` finds it)."""
    out = Path(run_dir) if out_dir is None else Path(out_dir)
    paths = []
    for sigma in sigma_rels:
        state, meta = reconstruct(run_dir, float(sigma), step=step)
        path = out / f"ema_{_sigma_name(float(sigma))}.safetensors"
        atomic_write_bytes(path, _tensor_bytes(state, meta))
        paths.append(path)
    return paths
