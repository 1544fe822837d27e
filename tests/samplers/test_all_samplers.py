"""Cross-sampler tests: every sampler in ``dl.SAMPLERS`` against an exact Gaussian denoiser.

For data x0 ~ N(m, diag s²) the posterior mean is closed form (Tweedie):
x̂0(x_t) = m + α s²/(α² s² + σ²)·(x_t - α m), so any sampler's output can be checked against
known moments, and one denoiser can be written as an eps, x0 or v model.  The tests iterate
the registry, so samplers that land later are covered automatically.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from difflab.parametrization import Denoiser, from_x0_eps
from difflab.samplers import SAMPLERS, sample
from difflab.samplers.registry import OWN_GRID
from difflab.schedules import NoiseSchedule

SPECS = [SAMPLERS[name] for name in SAMPLERS]
IDS = [spec.name for spec in SPECS]


def adaptive(spec) -> bool:
    """Step-size-controlled samplers (dpm_adaptive): NFE and grid depend on error estimates."""
    return spec.nfe(10) < 0


MEAN = torch.tensor([0.5, -1.0, 2.0])
STD = torch.tensor([0.4, 1.0, 0.7])


def gaussian_x0(x: torch.Tensor, alpha: float, sigma: float, mean=MEAN, std=STD) -> torch.Tensor:
    """Exact E[x0 | x_t] for x0 ~ N(mean, diag std²), mean/std broadcast over dim 1."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = mean.reshape(shape).to(x)
    s2 = (std**2).reshape(shape).to(x)
    return m + alpha * s2 / (alpha**2 * s2 + sigma**2) * (x - alpha * m)


class GaussianModel:
    """``model(x_t, t)`` of DESIGN.md's contract: the exact denoiser in one parametrization.

    (α, σ) come from the schedule at ``t`` in float64 (all rows of a batch share one t).
    """

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps"):
        self.schedule = schedule
        self.prediction = prediction
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self.calls += 1
        tt = float(t[0])
        alpha, sigma = self.schedule.alpha(tt), self.schedule.sigma(tt)
        x0 = gaussian_x0(x.double(), alpha, sigma)
        eps = (x.double() - alpha * x0) / sigma
        return from_x0_eps(self.prediction, x0, eps, alpha, sigma).to(x.dtype)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gaussian_data_moments_reproduced(spec):
    sched = NoiseSchedule.linear(1000)
    n = 4000
    # First-order ancestral samplers (DDPM, Euler a) have an O(1/N) variance deficit (DDPM
    # with β̃ at 50 steps gives 0.85·std on this data; it shrinks as N grows): run them
    # longer so the check is about correctness, not their known discretisation bias.
    steps = 500 if spec.stochastic and spec.order == 1 else 50
    g = torch.Generator().manual_seed(0)
    x = sample(
        GaussianModel(sched), (n, 3), schedule=sched, sampler=spec.name, steps=steps, generator=g
    )
    assert torch.isfinite(x).all()
    # sampling error of the mean is std/√n, of the std about std/√(2n); plus a small
    # discretisation allowance for 50 steps.
    tol_mean = 5 * STD / math.sqrt(n) + 0.02 * STD
    tol_std = 5 * STD / math.sqrt(2 * n) + 0.03 * STD
    assert ((x.mean(0) - MEAN).abs() <= tol_mean).all(), (x.mean(0), MEAN)
    assert ((x.std(0) - STD).abs() <= tol_std).all(), (x.std(0), STD)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_eps_x0_v_models_give_the_same_samples(spec):
    # scaled_linear keeps α_T ≈ 0.07: eps → x0 at α ≈ 0 would be ill-conditioned in float32.
    sched = NoiseSchedule.scaled_linear(1000)
    noise = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(1))
    outs = {}
    for pred in ("eps", "x0", "v"):
        outs[pred] = sample(
            GaussianModel(sched, pred),
            schedule=sched,
            sampler=spec.name,
            steps=20,
            prediction=pred,
            noise=noise,
            generator=torch.Generator().manual_seed(2),
        )
    ref = outs["x0"]
    scale = ref.abs().max()
    # An adaptive solver's accept/reject decisions amplify float32 rounding (seen: 1e-5).
    tol = 1e-4 if adaptive(spec) else 1e-6
    for pred in ("eps", "v"):
        rel = (outs[pred] - ref).abs().max() / scale
        assert rel <= tol, f"{spec.name}: {pred} vs x0 differ by {rel:.2e} (relative)"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_sample_i_of_batch_equals_same_seed_alone(spec):
    if adaptive(spec):
        pytest.skip("one step size for the whole batch (documented in sample_dpm_adaptive)")
    sched = NoiseSchedule.linear(1000)
    seeds = [11, 12, 13, 14]
    model = GaussianModel(sched)
    batch = sample(
        model, (4, 3, 4, 4), schedule=sched, sampler=spec.name, steps=8, generator=_gens(seeds)
    )
    for i, seed in enumerate(seeds):
        alone = sample(
            model,
            (1, 3, 4, 4),
            schedule=sched,
            sampler=spec.name,
            steps=8,
            generator=torch.Generator().manual_seed(seed),
        )
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [7, 12])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_steps_visit_distinct_decreasing_timesteps_with_documented_nfe(spec, steps):
    sched = NoiseSchedule.linear(1000)
    den = Denoiser(GaussianModel(sched), sched)
    seen = []
    sample(
        den,
        (2, 3),
        schedule=sched,
        sampler=spec.name,
        steps=steps,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x, x0: seen.append((i, t)),
    )
    expected = sched.timesteps(steps, spec.default_spacing)
    ts = [t for _, t in seen]
    if adaptive(spec):  # a rejected trial step re-reports its start state
        assert all(b <= a for a, b in zip(ts[:-1], ts[1:])), ts
    else:
        assert all(b < a for a, b in zip(ts[:-1], ts[1:])), ts
    assert [i for i, _ in seen] == list(range(len(seen)))
    if spec.name in OWN_GRID:  # only the ends of the grid are the caller's
        assert ts[0] == expected[0]
        assert adaptive(spec) or len(ts) <= steps
    else:
        assert ts == expected
    if spec.nfe(steps) >= 0:  # -1: adaptive, the NFE depends on tolerances
        assert den.nfe == spec.nfe(steps)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_zero_terminal_snr_v_prediction_is_finite(spec):
    sched = NoiseSchedule.scaled_linear(1000).rescale_zero_terminal_snr()
    x = sample(
        GaussianModel(sched, "v"),
        (6, 3),
        schedule=sched,
        sampler=spec.name,
        steps=10,
        prediction="v",
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_sampling_loop_never_reads_a_tensor_value_on_the_host(spec):
    """No device synchronisation inside the loop (USER_NEEDS 10): on the ``meta`` device every
    value read (``.item()``, ``bool(t)``, ``.tolist()``; on CUDA each a sync) raises, so a whole
    run there, with a U-Net, CFG, x̂0 clipping and ancestral noise, proves the loop reads none.
    Adaptive step-size control decides each step on the host from an error estimate, so it
    reads (and syncs) by design."""
    from _tiny_run import tiny_unet

    from difflab.samplers.common import randn

    model = tiny_unet(num_classes=10).to("meta")
    shape = (2, 1, 8, 8)
    run = lambda: sample(  # noqa: E731
        model, schedule=NoiseSchedule.cosine(1000), sampler=spec.name, steps=6,
        noise=randn(shape).to("meta"), generator=[torch.Generator().manual_seed(i) for i in (0, 1)],
        guidance_scale=2.0, cond={"class_labels": torch.tensor([1, 2], device="meta")},
        uncond={"class_labels": torch.tensor([10, 10], device="meta")}, clip_x0=True,
        progress=False,
    )  # fmt: skip
    if adaptive(spec):
        with pytest.raises(RuntimeError, match="item"):
            run()
        return
    with _DeviceDtypes() as seen:
        out = run()
    assert out.shape == shape and out.device.type == "meta"
    # No float64 on the device (USER_NEEDS 19: Apple's MPS has none); host floats only.
    assert torch.float64 not in seen.dtypes, seen.dtypes



@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_guidance_refinements_and_inpainting_never_read_a_tensor_value_on_the_host(sampler):
    """The same proof for the wrappers: guidance interval, APG (momentum and norm cap) and
    inpainting add no host read and no float64 inside the loop (the mask's range is checked
    once, on the tensor given, before sampling)."""
    from _tiny_run import tiny_unet

    from difflab.samplers.common import randn

    model = tiny_unet(num_classes=10).to("meta")
    shape = (2, 1, 8, 8)
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., 2:6, 2:6] = 1.0
    with _DeviceDtypes() as seen:
        out = sample(
            model, schedule=NoiseSchedule.cosine(1000), sampler=sampler, steps=6,
            noise=randn(shape).to("meta"),
            generator=[torch.Generator().manual_seed(i) for i in (0, 1)], guidance_scale=3.0,
            cond={"class_labels": torch.tensor([1, 2], device="meta")},
            uncond={"class_labels": torch.tensor([10, 10], device="meta")},
            guidance_interval=(0.1, 10.0), apg={"momentum": -0.5, "norm_threshold": 1.0},
            inpaint_image=torch.zeros(shape), inpaint_mask=hole, clip_x0=True, progress=False,
        )  # fmt: skip
    assert out.shape == shape and out.device.type == "meta"
    assert torch.float64 not in seen.dtypes, seen.dtypes

class _DeviceDtypes(TorchDispatchMode):
    """Records the dtypes of every tensor an op produces off the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                self.dtypes.add(t.dtype)
        return out
