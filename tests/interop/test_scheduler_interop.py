"""difflab.interop.scheduler against diffusers' schedulers run side by side.

For each sampler and each config (SD 1.5's PNDM config, SD 2.1's v-prediction DDIM config,
SDXL's Euler config, a zero-terminal-SNR trailing config), the diffusers scheduler built
with ``Class.from_config(config)`` runs its loop (scale_model_input, model, step) and
difflab runs ``dl.sample(**sampling_plan(config, sampler, N))`` with the same analytic
model, the same latents and (ancestral samplers) the same generator seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import difflab as dl
from difflab.interop.scheduler import (
    default_sampler,
    initial_noise_scale,
    prediction_from_diffusers,
    sampling_plan,
    schedule_from_diffusers,
)
from difflab.schedules import NoiseLevels, NoiseSchedule

diffusers = pytest.importorskip("diffusers")

_SD = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
CONFIGS = {
    "sd15": {"_class_name": "PNDMScheduler", **_SD},
    "sd21v": {"_class_name": "DDIMScheduler", **_SD, "prediction_type": "v_prediction"},
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        **_SD,
        "interpolation_type": "linear",
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
    },
    "zsnr": {
        "_class_name": "DDIMScheduler",
        **_SD,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    },
    # no steps_offset (DDIM ends at t = 0, set_alpha_to_one defaults to True), cosine betas,
    # clip_sample (DDIM/DDPM clip x̂0)
    "cosine": {
        "_class_name": "DDPMScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": True,
        "num_train_timesteps": 1000,
        "variance_type": "fixed_small",
    },
    "sd15clip": {"_class_name": "PNDMScheduler", **_SD, "clip_sample": True},
}
# Configs run with some samplers only.  Cosine betas reach σ^VE = 2·10⁴ (ᾱ = 2.4·10⁻⁹) at
# t = 999: diffusers' float32 arithmetic there (x_ve ~ 10⁴ in the k-diffusion classes,
# 1 - σ² in x̂0 = (x - σ·ε̂)/α) keeps ~3 digits, so only the integer-timestep VP classes
# are compared on it; "sd15clip" covers the classes that take clip_sample.
ONLY = {"cosine": {"ddim", "ddpm", "pndm", "plms"}, "sd15clip": {"ddim", "ddpm", "heun"}}
# difflab sampler name -> (diffusers class, from_config overrides the name implies)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": False}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
STOCHASTIC = {"ddpm", "euler_ancestral"}
# 20 steps: linspace timesteps 999·i/19 are fractional; ⌊T/N⌋ = 50 is even (PNDM's midpoint).
# 7 steps: also ⌊T/N⌋ = 142 even; trailing gaps of 1000/7 are not ⌊T/N⌋ (DDIM/PNDM skip it).
STEPS = (7, 20)
SHAPE = (2, 3, 4, 4)


def _make_model(config):
    """An analytic model: near the exact ε̂ (or v̂) of unit Gaussian data on the config's own
    ᾱ table (so that no step amplifies float32 round-off), plus a mixing of channels and a
    smooth function of t.  ᾱ(t) is read linearly between integer t (any fixed function of
    (x, t) will do: both runs call it at the same points)."""
    abar = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.double()
    v_pred = config.get("prediction_type") == "v_prediction"

    def model(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        lo = t.floor().long().clamp(max=len(abar) - 2)
        ab = abar[lo] + (t - lo) * (abar[lo + 1] - abar[lo])
        a = ab.sqrt().float().reshape(-1, 1, 1, 1)
        s = (1 - ab).sqrt().float().reshape(-1, 1, 1, 1)
        wave = torch.sin(t / 130.0).float().reshape(-1, 1, 1, 1)
        mix = 0.2 * x.roll(1, dims=1) * a * s
        base = 0.0 if v_pred else s * x  # exact: ε̂ = σ·x, v̂ = 0
        return base + mix + 0.3 * a * wave * torch.linspace(-1, 1, x.shape[-1])

    return model


def _diffusers_run(config, sampler: str, steps: int, z: torch.Tensor, seed: int) -> torch.Tensor:
    cls_name, overrides = SAMPLERS[sampler]
    sch = getattr(diffusers, cls_name).from_config(config, **overrides)
    sch.set_timesteps(steps)
    model = _make_model(config)
    extra: dict = (
        {"generator": torch.Generator().manual_seed(seed)} if sampler in STOCHASTIC else {}
    )
    if sampler == "ddim" and sch.config.clip_sample:
        extra["use_clipped_model_output"] = True  # difflab's clip_x0 recomputes ε̂ (docstring)
    x = z * sch.init_noise_sigma
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t)
        out = model(inp, t)
        x = sch.step(out, t, x, **extra).prev_sample
    return x


def _difflab_run(config, sampler: str, steps: int, z: torch.Tensor, seed: int) -> torch.Tensor:
    plan = sampling_plan(config, sampler, steps)
    noise = initial_noise_scale(config, sampler, steps) * z
    gen = torch.Generator().manual_seed(seed)
    return dl.sample(_make_model(config), noise=noise, generator=gen, progress=False, **plan)


def _cases():
    for cname, config in CONFIGS.items():
        for sampler in ONLY.get(cname, SAMPLERS):
            for steps in STEPS:
                v_pred = config.get("prediction_type") == "v_prediction"
                if sampler in ("pndm", "plms") and v_pred:
                    continue  # diffusers' PNDM combines raw v outputs (pndm.py docstring)
                odd_gaps = config.get("timestep_spacing") == "trailing" and 1000 % steps
                if sampler in ("ddim", "pndm", "plms") and odd_gaps:
                    continue  # DDIM/PNDM step t -> t - ⌊T/N⌋ off the listed timesteps
                yield pytest.param(cname, sampler, steps, id=f"{cname}-{sampler}-{steps}")


@pytest.mark.parametrize(("cname", "sampler", "steps"), list(_cases()))
def test_sampler_matches_diffusers(cname: str, sampler: str, steps: int) -> None:
    config = CONFIGS[cname]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_run(config, sampler, steps, z, seed=1)
    out = _difflab_run(config, sampler, steps, z, seed=1)
    scale = ref.abs().max().item()
    assert torch.isfinite(out).all() and scale < 20  # a sane result, not a blown-up one
    assert (out - ref).abs().max().item() <= 1e-4 * max(scale, 1.0), (
        f"{cname}/{sampler}: max |diff| {(out - ref).abs().max().item():.3g} (scale {scale:.3g})"
    )


# ---------------------------------------------------------------------- pieces
@pytest.mark.parametrize(
    "config",
    [
        {"beta_schedule": "linear"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True},
        {"trained_betas": np.linspace(1e-4, 0.03, 50).tolist(), "num_train_timesteps": 50},
    ],
    ids=["linear", "scaled_linear", "cosine", "zero_snr", "trained"],
)
def test_schedule_matches_diffusers_alphas_cumprod(config) -> None:
    ref = diffusers.DDIMScheduler.from_config(config).alphas_cumprod.double()
    sched = schedule_from_diffusers(config)
    assert sched.num_timesteps == len(ref)
    assert torch.allclose(sched.alphas_cumprod, ref, rtol=2e-5, atol=1e-9)
    assert sched.zero_terminal_snr == bool(config.get("rescale_betas_zero_snr"))


def test_schedule_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="beta_schedule"):
        schedule_from_diffusers({"beta_schedule": "sqrt"})
    with pytest.raises(ValueError, match="trained_betas has 3 values"):
        schedule_from_diffusers({"trained_betas": [0.1, 0.2, 0.3], "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_from_diffusers({"prediction_type": "flow"})


def test_prediction_and_default_sampler() -> None:
    assert [prediction_from_diffusers(c) for c in CONFIGS.values()][:2] == ["eps", "v"]
    assert prediction_from_diffusers({"prediction_type": "sample"}) == "x0"
    assert default_sampler(CONFIGS["sd15"]) == "plms"
    assert default_sampler({**CONFIGS["sd15"], "skip_prk_steps": False}) == "pndm"
    assert default_sampler(CONFIGS["sdxl"]) == "euler"
    assert default_sampler({"_class_name": "DPMSolverMultistepScheduler"}) == "dpmpp_2m"
    sde3 = {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}
    assert default_sampler({**sde3, "algorithm_type": "sde-dpmsolver++"}) == "dpmpp_3m_sde"
    for cls in ("DDIMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler",
                "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
                "KDPM2DiscreteScheduler", "DPMSolverSDEScheduler"):  # fmt: skip
        assert default_sampler({"_class_name": cls}) in dl.SAMPLERS
    with pytest.raises(ValueError, match="_class_name"):
        default_sampler({"_class_name": "FlowMatchEulerDiscreteScheduler"})


@pytest.mark.parametrize("sampler", ["euler", "heun", "lms", "Euler Karras", "DPM++ 2M Karras"])
def test_plan_levels_are_diffusers_timesteps_and_sigmas(sampler: str) -> None:
    """Model times and σ^VE of the plan equal diffusers' (Heun's repeated ones once)."""
    config = CONFIGS["sd15"]
    cls_name, overrides = SAMPLERS[sampler]
    sch = getattr(diffusers, cls_name).from_config(config, **overrides)
    sch.set_timesteps(13)
    ts, sig = sch.timesteps.double().tolist(), sch.sigmas.double().tolist()
    if sampler == "heun":
        ts, sig = ts[:1] + ts[1::2], sig[:1] + sig[1::2]
    plan = sampling_plan(config, sampler, 13)
    spacing = plan["spacing"]
    levels = spacing if isinstance(spacing, NoiseLevels) else plan["schedule"].noise_levels(spacing)
    assert levels.t == pytest.approx(ts, abs=2e-3)  # diffusers maps float32 sigmas to t
    assert levels.sigma_ve == pytest.approx(sig, rel=2e-5)


def test_plan_uses_sigma_interpolation_for_fractional_timesteps() -> None:
    """SD 1.5's config with Euler: linspace spacing (no steps_offset), fractional t, σ^VE
    linear in t as np.interp; the default schedule reads the same t linearly in log σ."""
    plan = sampling_plan(CONFIGS["sd15"], "euler", 20)
    sched = plan["schedule"]
    assert sched.interpolation == "sigma"
    assert plan["spacing"][1] == pytest.approx(999 * 18 / 19, abs=1e-3)
    table = sched.sigmas_ve.numpy()
    for t in plan["spacing"]:
        expect = float(np.interp(t, np.arange(len(table)), table))
        assert math.exp(-0.5 * float(sched.log_snr(t))) == pytest.approx(expect, rel=1e-12)


def test_plan_keys_for_sd15() -> None:
    """DDIM on SD 1.5: leading + offset 1, ends at ᾱ_0; DPM/UniPC options made explicit."""
    ddim = sampling_plan(CONFIGS["sd15"], "DDIM", 50)
    assert ddim["spacing"][0] == 981 and ddim["spacing"][-1] == 1
    assert ddim["final_timestep"] == 0 and ddim["prediction"] == "eps"
    assert "clip_x0" not in ddim
    assert sampling_plan(CONFIGS["cosine"], "ddim", 10)["clip_x0"] == 1.0
    unipc = sampling_plan(CONFIGS["sd15"], "unipc", 10)
    assert unipc["order"] == 2 and unipc["variant"] == "bh2" and unipc["corrector"]
    assert sampling_plan(CONFIGS["sd15"], "heun", 10)["max_ratio"] == math.inf


@pytest.mark.parametrize(
    ("change", "sampler", "match"),
    [
        ({"use_exponential_sigmas": True}, "euler", "use_exponential_sigmas"),
        ({"timestep_spacing": "uniform"}, "euler", "timestep_spacing"),
        ({"algorithm_type": "dpmsolver"}, "dpmpp_2m", "algorithm_type"),
        ({"final_sigmas_type": "sigma_min"}, "dpmpp_2m", "final_sigmas_type"),
        ({"disable_corrector": [0]}, "unipc", "disable_corrector"),
        ({"predict_x0": False}, "unipc", "predict_x0"),
        ({}, "dpm_2", "sampler for a diffusers plan"),
        ({}, "LMS Karras x", "sampler"),
    ],
)
def test_plan_refuses_what_it_cannot_reproduce(change, sampler, match) -> None:
    with pytest.raises(ValueError, match=match):
        sampling_plan({**CONFIGS["sd15"], **change}, sampler, 10)


def test_plan_euler_final_sigma_min_matches_diffusers() -> None:
    config = {**CONFIGS["sdxl"], "final_sigmas_type": "sigma_min"}
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_run(config, "euler", 9, z, seed=1)
    out = _difflab_run(config, "euler", 9, z, seed=1)
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_sample_takes_noise_levels_as_spacing() -> None:
    """Explicit NoiseLevels equal the timestep list they come from; misuse raises."""
    sched = NoiseSchedule.scaled_linear()
    ts = sched.timesteps(6, "trailing")
    levels = sched.noise_levels(ts)
    model = _make_model(CONFIGS["sd15"])
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = dl.sample(model, noise=z, schedule=sched, sampler="dpmpp_2m", spacing=ts)
    b = dl.sample(model, noise=z, schedule=sched, sampler="dpmpp_2m", spacing=levels)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="steps=5"):
        dl.sample(model, noise=z, schedule=sched, sampler="ddim", spacing=levels, steps=5)
    with pytest.raises(ValueError, match="final_timestep"):
        dl.sample(model, noise=z, schedule=sched, sampler="ddim", spacing=levels, final_timestep=0)
