"""Sampler accuracy and per-step overhead: every difflab sampler × spacing against diffusers.

Accuracy.  Data is a Gaussian mixture in D dimensions, whose posterior mean E[x0 | x_t] is
closed form, so the "model" is the exact denoiser (an eps model on DDPM's linear schedule,
T = 1000).  Each sampler starts from unit noise at its own first level; its output is
compared with a tight reference solution of the probability-flow ODE (Song et al. 2021,
eq. 13) started from that same state: ``scipy.integrate.solve_ivp`` (DOP853, rtol 1e-9) of
dx̃/d log σ = x̃ - x̂0(x̃, σ) in the VE frame x̃ = x/α, σ = σ/α, down to σ = 1e-5 (the
reference is checked against the closed-form PF-ODE solution of one Gaussian first).
Reported: RMS error per coordinate at NFE 5, 10, 20, 50 (steps chosen so the model is called
at most that often), and for every sampler a sliced 1-Wasserstein distance to true data
samples (for the stochastic ones it is the only meaningful column).  diffusers' schedulers
run on the same model and noise in the same process.

Every sampler that ends at t = 0 (σ = σ_min ≈ 0.01) and returns x̂0 there carries an
error floor of about σ_min²/(2·s_k) ≈ 2e-4 against the σ = 0 reference on this data.

Overhead.  A free model (returns zeros) on a 4×4×64×64 latent batch: wall time per step of
``dl.sample`` and of a diffusers scheduler loop.

Usage::

    python bench/samplers.py            # ~10 minutes on 1 core
    python bench/samplers.py --quick    # NFE 10 and 20 only, fewer points
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

import difflab.samplers as S
from difflab.parametrization import Denoiser
from difflab.schedules import NoiseSchedule

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "samplers.md"
PLOT = ROOT / "docs" / "img" / "samplers_ode_error.png"
# Spacing label -> (``spacing=`` name, its options).  "karras ρ=-10" is Karras et al.'s eq. 5
# with a negative ρ (uniform in σ^(-1/10)), dl.sample's default spacing.
SPACING_ARGS: dict[str, tuple[str, dict]] = {
    "trailing": ("trailing", {}),
    "leading": ("leading", {}),
    "linspace": ("linspace", {}),
    "karras": ("karras", {}),
    "logsnr": ("logsnr", {}),
    "karras ρ=-10": ("karras", {"rho": -10.0}),
}
SPACINGS = tuple(SPACING_ARGS)
# Option variants benchmarked besides each sampler's defaults: label -> (sampler, options).
VARIANTS = {
    "dpm_solver order=3": ("dpm_solver", {"order": 3}),
    "unipc order=3": ("unipc", {"order": 3}),
    "unipc bh1": ("unipc", {"variant": "bh1"}),
    "unipc order=3 bh1": ("unipc", {"order": 3, "variant": "bh1"}),
}
SCHED = NoiseSchedule.linear(1000)


# ----------------------------------------------------------------------------- data
class Mixture:
    """Isotropic Gaussian mixture Σ π_k N(μ_k, s_k² I) in D dims, float64."""

    def __init__(self, dim: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(3, dim, generator=g, dtype=torch.float64) * 3 - 1.5  # (K, D)
        self.s = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)  # (K,)
        self.w = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)  # (K,)
        self.dim = dim

    def x0_hat(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """E[x0 | x_t = x] (B, D): responsibilities times per-component Tweedie means."""
        v = alpha**2 * self.s**2 + sigma**2  # (K,) marginal variance per component
        d2 = ((x[:, None, :] - alpha * self.mu[None]) ** 2).sum(-1)  # (B, K)
        logp = torch.log(self.w) - 0.5 * self.dim * torch.log(v) - 0.5 * d2 / v
        r = torch.softmax(logp, dim=1)  # (B, K)
        means = self.mu[None] + (alpha * self.s**2 / v)[None, :, None] * (
            x[:, None, :] - alpha * self.mu[None]
        )  # (B, K, D)
        return (r[..., None] * means).sum(1)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.w, n, replacement=True, generator=g)
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return self.mu[k] + self.s[k, None] * z


def eps_model(mix: Mixture) -> Callable[..., torch.Tensor]:
    """``model(x_t, t)`` (eps) of DESIGN.md's contract; (α, σ) of ``SCHED`` at t in float64."""

    def model(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        tt = float(t.reshape(-1)[0])
        a, s = SCHED.alpha(tt), SCHED.sigma(tt)
        xd = x.double()
        return ((xd - a * mix.x0_hat(xd, a, s)) / s).to(x.dtype)

    return model


# ----------------------------------------------------------------------------- reference
class Reference:
    """Tight PF-ODE solutions from (x_T, λ_T) to σ = 0, cached per starting level."""

    def __init__(self, mix: Mixture, x_T: torch.Tensor):
        self.mix, self.x_T, self.cache = mix, x_T.double(), {}

    def __call__(self, log_snr0: float) -> torch.Tensor:
        key = round(log_snr0, 12)
        if key not in self.cache:
            self.cache[key] = self._solve(log_snr0)
        return self.cache[key]

    def _solve(self, log_snr0: float, mix: Mixture | None = None) -> torch.Tensor:
        mix = mix or self.mix
        mu, s2, logw = mix.mu.numpy(), (mix.s**2).numpy(), torch.log(mix.w).numpy()
        a0 = math.sqrt(1 / (1 + math.exp(-log_snr0)))
        shape = tuple(self.x_T.shape)

        def x0_hat(x: np.ndarray, sig: float) -> np.ndarray:  # numpy twin of Mixture.x0_hat
            v = s2 + sig**2  # VE frame (α = 1): component variances
            d2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)  # (B, K)
            logp = logw - 0.5 * shape[1] * np.log(v) - 0.5 * d2 / v
            r = np.exp(logp - logp.max(1, keepdims=True))
            r /= r.sum(1, keepdims=True)
            means = mu[None] + (s2 / v)[None, :, None] * (x[:, None, :] - mu[None])
            return (r[..., None] * means).sum(1)

        def rhs(u: float, y: np.ndarray) -> np.ndarray:  # u = log σ_VE; dx̃/du = x̃ - x̂0
            xt = y.reshape(shape)
            return (xt - x0_hat(xt, math.exp(u))).reshape(-1)

        u0, u1 = -log_snr0 / 2, math.log(1e-5)
        y0 = (self.x_T / a0).reshape(-1).numpy()
        sol = solve_ivp(rhs, (u0, u1), y0, method="DOP853", rtol=1e-9, atol=1e-11)
        return torch.from_numpy(x0_hat(sol.y[:, -1].reshape(shape), 1e-5))


def check_reference(x_T: torch.Tensor) -> float:
    """Max error of the ODE reference on one Gaussian, whose PF-ODE solution is closed form."""
    one = Mixture(x_T.shape[1])
    one.mu, one.s, one.w = one.mu[:1], one.s[2:3], one.w[:1] / one.w[:1]
    lam0 = SCHED.log_snr(999.0)
    a0, s0 = math.sqrt(1 / (1 + math.exp(-lam0))), math.sqrt(1 / (1 + math.exp(lam0)))
    ref = Reference(one, x_T)._solve(lam0, one)
    sd = float(one.s[0])
    exact = one.mu[0] + sd * (x_T.double() - a0 * one.mu[0]) / math.sqrt(a0**2 * sd**2 + s0**2)
    return float((ref - exact).abs().max())


# ----------------------------------------------------------------------------- metrics
def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def sliced_w1(a: torch.Tensor, b: torch.Tensor, n_proj: int = 64) -> float:
    """Sliced 1-Wasserstein distance (mean over random directions of the 1-D W1)."""
    g = torch.Generator().manual_seed(123)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs), (b.double() @ dirs)
    qs = torch.linspace(0.0005, 0.9995, 1000, dtype=torch.float64)
    return float((torch.quantile(pa, qs, dim=0) - torch.quantile(pb, qs, dim=0)).abs().mean())


# ----------------------------------------------------------------------------- runners
def steps_for(nfe_of: Callable[[int], int], budget: int) -> int | None:
    """The most steps whose NFE fits ``budget`` (None if even one step does not)."""
    best = None
    for n in range(1, budget + 1):
        if 0 <= nfe_of(n) <= budget:
            best = n
    return best


def run_difflab(
    name: str, spacing: str, nfe: int, model, noise, ref, options: dict | None = None
) -> dict | None:
    spec = S.SAMPLERS[name]
    steps = steps_for(spec.nfe, nfe)
    if steps is None:
        return None
    den = Denoiser(model, SCHED)
    sp_name, sp_opts = SPACING_ARGS[spacing]
    try:
        out = S.sample(
            den,
            noise=noise,
            schedule=SCHED,
            sampler=name,
            steps=steps,
            spacing=sp_name,
            generator=torch.Generator().manual_seed(7),
            **sp_opts,
            **(options or {}),
        )
    except ValueError as e:  # e.g. a spacing that gives duplicate timesteps at this N
        return {"error": str(e)}
    lam0 = SCHED.log_snr(SCHED.timesteps(steps, sp_name, **sp_opts)[0])
    return {"out": out, "err": rms(out, ref(lam0)), "nfe": den.nfe, "steps": steps}


def diffusers_schedulers() -> dict[str, Callable[[], object]]:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    return {
        "DDIM (leading)": lambda: DDIMScheduler(**base, clip_sample=False),
        "DDIM (trailing)": lambda: DDIMScheduler(
            **base, clip_sample=False, timestep_spacing="trailing"
        ),
        "Euler": lambda: EulerDiscreteScheduler(**base),
        "Euler karras": lambda: EulerDiscreteScheduler(**base, use_karras_sigmas=True),
        "Heun": lambda: HeunDiscreteScheduler(**base),
        "Heun karras": lambda: HeunDiscreteScheduler(**base, use_karras_sigmas=True),
        "DPM++ 2M": lambda: DPMSolverMultistepScheduler(**base),
        "DPM++ 2M karras": lambda: DPMSolverMultistepScheduler(**base, use_karras_sigmas=True),
        "DPM++ 2M lu": lambda: DPMSolverMultistepScheduler(**base, use_lu_lambdas=True),
        "DPM++ 3M": lambda: DPMSolverMultistepScheduler(**base, solver_order=3),
        "DPM++ 3M karras": lambda: DPMSolverMultistepScheduler(
            **base, solver_order=3, use_karras_sigmas=True
        ),
        "UniPC": lambda: UniPCMultistepScheduler(**base),
        "UniPC karras": lambda: UniPCMultistepScheduler(**base, use_karras_sigmas=True),
        "UniPC-3": lambda: UniPCMultistepScheduler(**base, solver_order=3),
    }


def diffusers_loop(sch, steps: int, model, noise: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """A diffusers pipeline's denoising loop; returns (x0, model calls, first timestep)."""
    sch.set_timesteps(steps)
    x = noise * sch.init_noise_sigma
    calls = 0
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t)
        eps = model(inp, t.reshape(1).expand(x.shape[0]))
        calls += 1
        x = sch.step(eps, t, x).prev_sample
    return x, calls, float(sch.timesteps[0])


def run_diffusers(make, nfe: int, model, noise, ref) -> dict | None:
    steps = None
    for n in range(1, nfe + 1):  # the most steps whose model-call count fits
        sch = make()
        sch.set_timesteps(n)
        if len(sch.timesteps) <= nfe:
            steps = n
    if steps is None:
        return None
    out, calls, t0 = diffusers_loop(make(), steps, model, noise)
    return {"out": out, "err": rms(out, ref(SCHED.log_snr(t0))), "nfe": calls, "steps": steps}


# ----------------------------------------------------------------------------- overhead
def overhead(reps: int = 7, steps: int = 20) -> list[tuple[str, float, float]]:
    """ms/step with a free model on a 4×4×64×64 batch: (name, difflab, diffusers)."""
    free = lambda x, t, **c: torch.zeros_like(x)  # noqa: E731
    noise = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    scheds = diffusers_schedulers()
    pairs = [
        ("ddim", "DDIM (leading)", "leading"),
        ("euler", "Euler", "linspace"),
        ("heun", "Heun", "linspace"),
        ("dpmpp_2m", "DPM++ 2M", "linspace"),
        ("unipc", "UniPC", "linspace"),
    ]
    rows = []
    for ours, theirs, spacing in pairs:
        t_ours, t_theirs = [], []
        for _ in range(reps):
            t = time.perf_counter()
            S.sample(
                free,
                noise=noise,
                schedule=SCHED,
                sampler=ours,
                steps=steps,
                spacing=spacing,
                progress=False,
            )
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            diffusers_loop(scheds[theirs](), steps, free, noise)
            t_theirs.append(time.perf_counter() - t)
        rows.append((f"{ours} / {theirs}", 1e3 * min(t_ours) / steps, 1e3 * min(t_theirs) / steps))
    return rows


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="NFE 10/20 only, 500 points")
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--nfe", type=int, nargs="+", help="NFE budgets (default 5 10 20 50)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nfes = args.nfe or ([10, 20] if args.quick else [5, 10, 20, 50])
    n = 500 if args.quick else args.points
    t_start = time.perf_counter()

    mix = Mixture()
    noise = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(1))
    ref = Reference(mix, noise)
    data = mix.sample(20000, seed=2)
    ref_check = check_reference(noise)
    model = eps_model(mix)

    ours: dict[tuple[str, str], dict[int, dict]] = {}
    configs = [(n, n, {}) for n in S.SAMPLERS if n != "dpm_adaptive"]
    configs += [(label, n, opts) for label, (n, opts) in VARIANTS.items()]
    for label, name, opts in configs:
        for spacing in SPACINGS:
            ours[(label, spacing)] = {}
            for nfe in nfes:
                r = run_difflab(name, spacing, nfe, model, noise, ref, opts)
                if r is not None and "out" in r:
                    r["sw"] = sliced_w1(r.pop("out"), data)
                ours[(label, spacing)][nfe] = r
    adaptive = {}
    den = Denoiser(model, SCHED)
    out = S.sample(den, noise=noise, schedule=SCHED, sampler="dpm_adaptive")
    adaptive = {
        "nfe": den.nfe,
        "err": rms(out, ref(SCHED.log_snr(999.0))),
        "sw": sliced_w1(out, data),
    }
    theirs: dict[str, dict[int, dict]] = {}
    for label, make in diffusers_schedulers().items():
        theirs[label] = {}
        for nfe in nfes:
            r = run_diffusers(make, nfe, model, noise, ref)
            if r is not None:
                r["sw"] = sliced_w1(r.pop("out"), data)
            theirs[label][nfe] = r
    data_sw = sliced_w1(mix.sample(n, seed=3), data)
    ov = overhead()
    report = render(
        nfes, n, ours, theirs, adaptive, ov, ref_check, data_sw, time.perf_counter() - t_start
    )
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    plot(nfes, ours, theirs)
    print(f"wrote {RESULTS.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


def _stochastic(label: str) -> bool:
    return S.SAMPLERS[VARIANTS[label][0] if label in VARIANTS else label].stochastic


def _ok(r: dict | None) -> bool:
    return r is not None and "err" in r


def best_of(table: dict, nfe: int, keep=lambda key: True) -> tuple[object, dict] | None:
    cands = [(k, v[nfe]) for k, v in table.items() if keep(k) and _ok(v.get(nfe))]
    return min(cands, key=lambda kv: kv[1]["err"]) if cands else None


def recommend(ours: dict) -> tuple[tuple[str, str], float] | None:
    """The deterministic (config, spacing) with the lowest √(err@10 · err@20)."""
    scores = {
        key: math.sqrt(row[10]["err"] * row[20]["err"])
        for key, row in ours.items()
        if not _stochastic(key[0]) and _ok(row.get(10)) and _ok(row.get(20))
    }
    if not scores:
        return None
    best = min(scores, key=scores.get)
    return best, scores[best]


def render(nfes, n, ours, theirs, adaptive, ov, ref_check, data_sw, seconds) -> str:
    fmt = lambda r: f"{r['err']:.2e}" if _ok(r) else "—"  # noqa: E731
    lines = [
        "# Sampler benchmark (bench/samplers.py)",
        "",
        f"Exact denoiser of a 3-component Gaussian mixture in 4 dims, DDPM linear schedule "
        f"(T=1000), {n} samples, eps model.  Error: RMS per coordinate against the PF-ODE "
        f"solution (solve_ivp DOP853, rtol 1e-9) from the sampler's own first state; the "
        f"reference's own error on one Gaussian (closed form): {ref_check:.1e}.  "
        f"Sliced W1 to 20k true samples (a fresh set of {n} true samples scores "
        f"{data_sw:.3f}).  {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {seconds:.0f} s.",
        "",
        "## Best configuration at each NFE",
        "",
        "| NFE | difflab best (sampler, spacing) | error | diffusers best | error | ratio |",
        "|---|---|---|---|---|---|",
    ]
    det = lambda k: not _stochastic(k[0])  # noqa: E731
    for nfe in nfes:
        b_ours, b_theirs = best_of(ours, nfe, det), best_of(theirs, nfe)
        if b_ours and b_theirs:
            (name, sp), r = b_ours
            lab, q = b_theirs
            lines.append(
                f"| {nfe} | {name}, {sp} | {r['err']:.2e} | {lab} | {q['err']:.2e} | "
                f"{r['err'] / q['err']:.2f} |"
            )
    rec = recommend(ours)
    if rec is not None:
        (label, sp), score = rec
        lines += [
            "",
            f"Recommended default (lowest geometric mean of the NFE-10 and NFE-20 errors "
            f"over deterministic configurations): **{label}, {sp}** ({score:.2e}).",
        ]
    lines += ["", "## Deterministic samplers: ODE error (RMS) by spacing", ""]
    head = "| sampler | spacing | " + " | ".join(f"NFE {k}" for k in nfes) + " | SW1 @20 |"
    lines += [head, "|" + "---|" * (len(nfes) + 3)]
    for (name, sp), row in ours.items():
        if _stochastic(name):
            continue
        sw = row.get(20)
        lines.append(
            f"| {name} | {sp} | "
            + " | ".join(fmt(row.get(k)) for k in nfes)
            + (f" | {sw['sw']:.3f} |" if _ok(sw) else " | — |")
        )
    lines += [
        "",
        f"dpm_adaptive (default tolerances): NFE {adaptive['nfe']}, error "
        f"{adaptive['err']:.2e}, SW1 {adaptive['sw']:.3f}.",
        "",
    ]
    lines += ["## Stochastic samplers: sliced W1 to data (ODE error not meaningful)", ""]
    lines += [
        "| sampler | spacing | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
        "|" + "---|" * (len(nfes) + 2),
    ]
    for (name, sp), row in ours.items():
        if _stochastic(name):
            cells = [f"{row[k]['sw']:.3f}" if _ok(row.get(k)) else "—" for k in nfes]
            lines.append(f"| {name} | {sp} | " + " | ".join(cells) + " |")
    lines += ["", "## diffusers schedulers on the same denoiser", ""]
    lines += [head.replace("| spacing ", ""), "|" + "---|" * (len(nfes) + 2)]
    for lab, row in theirs.items():
        sw = row.get(20)
        lines.append(
            f"| {lab} | "
            + " | ".join(fmt(row.get(k)) for k in nfes)
            + (f" | {sw['sw']:.3f} |" if _ok(sw) else " | — |")
        )
    lines += [
        "",
        "## Per-step overhead (free model, 4×4×64×64, 20 steps)",
        "",
        "| sampler (difflab / diffusers) | difflab ms/step | diffusers ms/step |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b:.2f} | {c:.2f} |" for a, b, c in ov]
    return "\n".join(lines) + "\n"


def plot(nfes, ours, theirs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    names = list(dict.fromkeys(label for label, _ in ours if not _stochastic(label)))
    for name in names:  # each difflab sampler at its best spacing (by NFE-20 error)
        rows = {sp: ours[(name, sp)] for sp in SPACINGS}
        sp = min(rows, key=lambda s: rows[s][20]["err"] if _ok(rows[s].get(20)) else 1e9)
        xs = [k for k in nfes if _ok(rows[sp].get(k))]
        ax.loglog(xs, [rows[sp][k]["err"] for k in xs], "-o", ms=3, label=f"{name} ({sp})")
    for lab, row in theirs.items():
        xs = [k for k in nfes if _ok(row.get(k))]
        ax.loglog(
            xs,
            [row[k]["err"] for k in xs],
            "--x",
            ms=4,
            color="gray",
            alpha=0.6,
            label="diffusers" if lab == next(iter(theirs)) else None,
        )
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("RMS error vs. PF-ODE solution")
    ax.set_title("Gaussian-mixture exact denoiser: ODE error")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


if __name__ == "__main__":
    main()
