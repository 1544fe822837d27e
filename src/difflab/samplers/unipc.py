"""UniPC: the unified predictor-corrector multistep solver (Zhao et al. 2023).

Owns: ``sample_unipc`` — UniP-p predictor and UniC-p corrector in data prediction with the
B(h) choices "bh1" (B(h) = h) and "bh2" (B(h) = e^h - 1), orders 1-3 (Zhao et al. 2023,
"UniPC", Alg. 1-2 and eqs. 8-9; diffusers' UniPCMultistepScheduler).

Knows nothing of the registry or guidance.  VP scale x = α·x0 + σ·ε, half-log-SNR
λ = log(α/σ) (difflab's ``log_snr``/2).  The corrector reuses the model call made at the
predicted point, so UniPC costs N calls like the predictor alone.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .._validate import check_choice
from ..parametrization import Denoiser
from ..schedules import NoiseLevels
from .common import Generators, SamplerCallback, SamplerSpec
from .ddpm import eval_level
from .dpm_solver import half_log_snr, vp_coefs

__all__ = ["SPECS", "sample_unipc", "unipc_coefficients"]

Variant = Literal["bh1", "bh2"]


def unipc_coefficients(
    h: float, rks: list[float], order: int, variant: str, corrector: bool
) -> tuple[float, float, list[float]]:
    """(φ1 = e^{-h} - 1, B(h), ρ) for UniP-p (``corrector=False``) or UniC-p.

    Zhao et al. 2023 eq. 8 / Alg. 1-2: solve R_p(r)·ρ = g_p(h)/B(h), R's rows r_k^{i-1},
    g_i = i!·h·φ_{i+1}(-h) (φ the exponential-integrator functions, built recursively);
    the predictor uses the first p-1 rows (ρ = 1/2 for p = 2, as the paper's code) and the
    corrector all p (ρ = 1/2 for p = 1).  ``rks``: r_k = (λ_{s_k} - λ_s)/h of the history
    points; the corrector's last node is r = 1.
    """
    hh = -h  # data prediction integrates in -λ
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0
    fact = 1.0
    b: list[float] = []
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    r = [*rks, 1.0]
    if not corrector:
        if order == 1:
            return h_phi_1, b_h, []
        if order == 2:
            return h_phi_1, b_h, [0.5]
        m = order - 1
        mat = [[r[k] ** i for k in range(m)] for i in range(m)]
        rhs = b[:m]
    else:
        if order == 1:
            return h_phi_1, b_h, [0.5]
        mat = [[r[k] ** i for k in range(order)] for i in range(order)]
        rhs = b[:order]
    sol = torch.linalg.solve(
        torch.tensor(mat, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)
    )
    return h_phi_1, b_h, sol.tolist()


def _unipc_update(
    x: Tensor,
    hist: list[tuple[float, Tensor]],
    lam_t: float,
    order: int,
    variant: str,
    model_t: Tensor | None,
) -> Tensor:
    """UniP-p (``model_t`` None) or UniC-p from (x at hist[0]'s λ) to λ_t.

    x_t = (σ_t/σ_s)·x - α_t·φ1·m0 - α_t·B(h)·Σ_k ρ_k·D_k,  D_k = (m_k - m0)/r_k
    (+ ρ_p·(m_t - m0) for the corrector).
    """
    lam_s, m0 = hist[0]
    h = lam_t - lam_s
    a_t, s_t = vp_coefs(lam_t)
    s_s = vp_coefs(lam_s)[1]
    rks = [(hist[k][0] - lam_s) / h for k in range(1, order)]
    h_phi_1, b_h, rhos = unipc_coefficients(h, rks, order, variant, model_t is not None)
    x_t = (s_t / s_s) * x - (a_t * h_phi_1) * m0
    res: Tensor | None = None
    for k in range(1, order):
        term = (rhos[k - 1] / rks[k - 1]) * (hist[k][1] - m0)
        res = term if res is None else res + term
    if model_t is not None:
        term = rhos[-1] * (model_t - m0)
        res = term if res is None else res + term
    if res is not None:
        x_t = x_t - (a_t * b_h) * res
    return x_t


def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    levels: NoiseLevels,
    *,
    cond: dict[str, Any] | None = None,
    callback: SamplerCallback | None = None,
    generator: Generators = None,
    order: int = 2,
    variant: Variant = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC-p (Zhao et al. 2023, Alg. 1-2), data prediction, x ``[B, ...]`` -> clean.

    Step i: evaluate x̂0 at x_i; if ``corrector``, UniC refines x_i from x_{i-1} with that
    call (order of the previous predictor, one higher accuracy); then UniP-p predicts
    x_{i+1}.  The order ramps up over the first steps; ``lower_order_final`` caps step i at
    N - i (diffusers' rule, any N); the step into the clean level is always first order
    (x̂0: B(h) = h is infinite there and "bh2" would extrapolate), and history at λ = -∞
    (zero SNR) is never used, nor is a correction across an infinite step.  N calls.
    Equals diffusers' UniPCMultistepScheduler(predict_x0=True, solver_type=variant,
    disable_corrector=[] or every step).

    :param order: 1, 2 or 3 (UniPC-p; the corrector raises accuracy to p + 1).
    :param variant: "bh1" (B(h) = h, for unconditional) or "bh2" (B(h) = e^h - 1, guided).
    :param corrector: use UniC after every predictor step (False: UniP alone).
    :param lower_order_final: lower the order over the last steps.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be one of [1, 2, 3], got {order!r}")
    check_choice("UniPC variant", variant, ("bh1", "bh2"))
    lam = half_log_snr(levels)
    n = len(levels)
    hist: list[tuple[float, Tensor]] = []  # (λ, x̂0), newest first
    x_last: Tensor | None = None
    p_last = 0
    for i in range(n):
        out = eval_level(denoiser, x, levels, i, cond)
        if callback is not None:
            callback(i, levels.t[i], x, out.x0)
        if corrector and x_last is not None and math.isfinite(lam[i] - hist[0][0]):
            x = _unipc_update(x_last, hist, lam[i], p_last, variant, out.x0)
        hist = [(lam[i], out.x0), *hist][:order]
        lam_t = lam[i + 1]
        if lam_t == math.inf:
            x = out.x0
            continue
        p = 1
        while p < len(hist) and math.isfinite(hist[p][0]) and math.isfinite(lam[i]):
            p += 1
        if lower_order_final:
            p = min(p, n - i)
        if not math.isfinite(lam_t - lam[i]):
            p = 1
        x_last, p_last = x, p
        x = _unipc_update(x, hist, lam_t, p, variant, None)
    return x


SPECS: list[SamplerSpec] = [
    SamplerSpec(
        name="unipc",
        fn=sample_unipc,
        order=3,
        stochastic=False,
        nfe=lambda n: n,
        aliases={
            "UniPC": None,
            "uni_pc_bh2": None,
            "UniPCMultistepScheduler": None,
        },
        paper="Zhao, Bai, Rao, Zhou & Lu 2023, UniPC (NeurIPS), Alg. 1-2",
    ),
]
