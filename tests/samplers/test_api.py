"""``dl.sample``'s front door: names and aliases, option checks, spacing, noise, callbacks."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from difflab.parametrization import Denoiser
from difflab.samplers import (
    DEFAULT_OPTIONS,
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_SPACING_OPTIONS,
    SAMPLERS,
    resolve,
    sample,
)
from difflab.samplers.registry import sampler_options
from difflab.schedules import SPACINGS, NoiseSchedule

SCHED = NoiseSchedule.linear(1000)


def linear_model(x, t, **cond):
    """A cheap eps model: ε̂ = 0.1·x (enough for plumbing tests)."""
    return 0.1 * x


def record(seen):
    return lambda i, t, x, x0: seen.append((i, t, x.clone()))


@pytest.mark.parametrize(
    ("alias", "name", "spacing"),
    [
        ("DPM++ 2M Karras", "dpmpp_2m", "karras"),
        ("dpm++ 2m karras", "dpmpp_2m", "karras"),
        ("DPM++ 2M", "dpmpp_2m", None),
        ("k_dpmpp_2m", "dpmpp_2m", None),
        ("Euler a", "euler_ancestral", None),
        ("EULER A", "euler_ancestral", None),
        ("k_euler_a", "euler_ancestral", None),
        ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "exponential"),
        ("DPM2 a Karras", "dpm_2_ancestral", "karras"),
        ("LMS Karras", "lms", "karras"),
        ("uni_pc", "unipc", None),
        ("DDIM", "ddim", None),
        ("PLMS", "plms", None),
        ("dpmpp_2m", "dpmpp_2m", None),
    ],
)
def test_alias_resolves_to_algorithm_and_spacing(alias, name, spacing):
    spec, implied = resolve(alias)
    assert spec.name == name
    assert implied == spacing
    assert SAMPLERS[alias] is SAMPLERS[name]
    assert alias in SAMPLERS


def test_unknown_sampler_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm\+\+2m'; did you mean 'dpmpp_2m'\?"):
        resolve("dpm++2m")
    with pytest.raises(ValueError, match="choices: .*ddim"):
        sample(linear_model, (1, 2), schedule=SCHED, sampler="nonsense")


def test_registry_is_read_only_and_lists_canonical_names_once():
    with pytest.raises(TypeError):
        SAMPLERS["mine"] = SAMPLERS["ddim"]  # type: ignore[index]
    names = list(SAMPLERS)
    assert len(names) == len(set(names)) == len(SAMPLERS)
    assert "DPM++ 2M Karras" not in names and "DPM++ 2M Karras" in SAMPLERS
    for alias, (target, spacing) in SAMPLERS.aliases.items():
        assert SAMPLERS[alias].name == target
        assert spacing is None or spacing in SPACINGS


def test_registry_covers_the_issue_list():
    expected = {
        "ddpm", "ddim", "pndm", "plms", "euler", "euler_ancestral", "heun", "dpm_2",
        "dpm_2_ancestral", "lms", "dpm_solver", "dpm_fast", "dpm_adaptive",
        "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde",
        "dpmpp_3m_sde", "unipc",
    }  # fmt: skip
    assert expected <= set(SAMPLERS), sorted(expected - set(SAMPLERS))
    assert DEFAULT_SAMPLER in SAMPLERS


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_follows_the_convention(name):
    spec = SAMPLERS[name]
    params = inspect.signature(spec.fn).parameters
    for kw in ("cond", "callback", "generator"):
        assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY
    assert spec.default_spacing in SPACINGS
    assert spec.order >= 1
    assert sampler_options(spec) is not None, "options must be explicit keyword-only parameters"


def test_option_a_sampler_does_not_use_raises_naming_sampler_and_its_options():
    with pytest.raises(
        ValueError, match=r"sampler 'euler' does not take option\(s\) 'eta'.*its options: "
    ):
        sample(linear_model, (1, 2), schedule=SCHED, sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="'s_noise_typo'"):
        sample(linear_model, (1, 2), schedule=SCHED, sampler="heun", s_noise_typo=1.0)
    # eta = 0 asks a deterministic sampler for exactly what it does: accepted.
    a = sample(linear_model, noise=torch.ones(1, 2), schedule=SCHED, sampler="dpmpp_2m", eta=0.0)
    b = sample(linear_model, noise=torch.ones(1, 2), schedule=SCHED, sampler="dpmpp_2m")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dpmpp_2m"):
        sample(linear_model, (1, 2), schedule=SCHED, sampler="dpmpp_2m", eta=1.0)


def test_ddim_eta_is_passed_through():
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    a = sample(
        linear_model,
        noise=noise,
        schedule=SCHED,
        sampler="ddim",
        eta=1.0,
        generator=torch.Generator().manual_seed(1),
        steps=5,
    )
    b = sample(linear_model, noise=noise, schedule=SCHED, sampler="ddim", eta=0.0, steps=5)
    assert not torch.allclose(a, b)


def test_alias_spacing_is_used_and_conflicting_spacing_raises():
    seen = []
    sample(
        linear_model,
        (1, 2),
        schedule=SCHED,
        sampler="DPM++ 2M Karras",
        steps=6,
        callback=record(seen),
    )
    assert [t for _, t, _ in seen] == SCHED.timesteps(6, "karras")
    with pytest.raises(ValueError, match="implies spacing 'karras'"):
        sample(linear_model, (1, 2), schedule=SCHED, sampler="DPM++ 2M Karras", spacing="trailing")


def test_default_spacing_and_custom_timestep_list():
    seen = []
    sample(linear_model, (1, 2), schedule=SCHED, sampler="ddim", callback=record(seen))
    assert [t for _, t, _ in seen] == SCHED.timesteps(20, SAMPLERS["ddim"].default_spacing)
    assert len(seen) == 20  # steps=None means 20
    seen.clear()
    sample(
        linear_model,
        (1, 2),
        schedule=SCHED,
        sampler="euler",
        spacing=[999, 500.5, 100, 3],
        callback=record(seen),
    )
    assert [t for _, t, _ in seen] == [999.0, 500.5, 100.0, 3.0]
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(linear_model, (1, 2), schedule=SCHED, spacing=[10, 500])
    with pytest.raises(ValueError, match="steps=3"):
        sample(linear_model, (1, 2), schedule=SCHED, steps=3, spacing=[999, 500])


def test_spacing_options_reach_the_discretisation():
    seen = []
    sample(
        linear_model,
        (1, 2),
        schedule=SCHED,
        sampler="euler",
        spacing="karras",
        steps=5,
        rho=3.0,
        callback=record(seen),
    )
    assert [t for _, t, _ in seen] == SCHED.timesteps(5, "karras", rho=3.0)


def test_noise_is_the_start_state_and_generator_draws_it():
    noise = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(5))
    seen = []
    a = sample(
        linear_model, noise=noise, schedule=SCHED, sampler="ddim", steps=4, callback=record(seen)
    )
    assert torch.equal(seen[0][2], noise)
    b = sample(
        linear_model,
        (3, 2, 4),
        schedule=SCHED,
        sampler="ddim",
        steps=4,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(a, b)


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="shape= or noise="):
        sample(linear_model, schedule=SCHED)
    with pytest.raises(ValueError, match="noise has shape"):
        sample(linear_model, (2, 2), schedule=SCHED, noise=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="needs uncond="):
        sample(linear_model, (2, 2), schedule=SCHED, guidance_scale=3.0)
    with pytest.raises(ValueError, match="one per sample"):
        sample(linear_model, (2, 2), schedule=SCHED, generator=[torch.Generator().manual_seed(0)])
    with pytest.raises(ValueError, match="prediction"):
        sample(linear_model, (2, 2), schedule=SCHED, prediction="epsilon")
    with pytest.raises(ValueError, match="spacing"):
        sample(linear_model, (2, 2), schedule=SCHED, spacing="karas")


def test_a_ready_denoiser_is_used_as_is_and_counts_calls():
    den = Denoiser(linear_model, SCHED)
    sample(den, (1, 2), schedule=SCHED, sampler="ddim", steps=7)
    assert den.nfe == 7


def test_default_is_the_benchmarked_configuration_and_explicit_arguments_win():
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    seen = []
    a = sample(linear_model, noise=noise, schedule=SCHED, steps=8, callback=record(seen))
    assert [t for _, t, _ in seen] == SCHED.timesteps(8, DEFAULT_SPACING, **DEFAULT_SPACING_OPTIONS)
    b = sample(
        linear_model,
        noise=noise,
        schedule=SCHED,
        steps=8,
        sampler=DEFAULT_SAMPLER,
        spacing=DEFAULT_SPACING,
        **DEFAULT_OPTIONS,
        **DEFAULT_SPACING_OPTIONS,
    )
    assert torch.equal(a, b)
    seen.clear()  # an explicit spacing drops the default's spacing options (ρ = 7 here)
    sample(linear_model, noise=noise, schedule=SCHED, steps=8, spacing="karras",
           callback=record(seen))  # fmt: skip
    assert [t for _, t, _ in seen] == SCHED.timesteps(8, "karras")
    seen.clear()
    sample(
        linear_model,
        noise=noise,
        schedule=SCHED,
        steps=8,
        spacing="trailing",
        callback=record(seen),
    )
    assert [t for _, t, _ in seen] == SCHED.timesteps(8, "trailing")
    seen.clear()  # a sampler named explicitly uses its own default spacing
    sample(
        linear_model,
        noise=noise,
        schedule=SCHED,
        steps=8,
        sampler=DEFAULT_SAMPLER,
        callback=record(seen),
    )
    assert [t for _, t, _ in seen] == SCHED.timesteps(8, SAMPLERS[DEFAULT_SAMPLER].default_spacing)


def test_default_grid_is_uniform_in_a_negative_power_of_sigma():
    """The default spacing (Karras et al. 2022, eq. 5 with ρ = -10): σ^VE_i^(1/ρ) are
    equally spaced from σ_max^(1/ρ) to σ_min^(1/ρ) (the table's ends), and as ρ -> -∞ the
    grid tends to ``logsnr`` (uniform in log σ^VE), as O(1/ρ): at ρ = -1e5 within 1e-3 in λ."""
    import numpy as np

    sched = NoiseSchedule.linear(1000)
    rho = DEFAULT_SPACING_OPTIONS["rho"]
    sig = np.array(sched.noise_levels(sched.timesteps(10, DEFAULT_SPACING, rho=rho)).sigma_ve[:-1])
    u = sig ** (1 / rho)
    assert rho < 0 and np.allclose(np.diff(u), np.diff(u)[0], rtol=1e-9, atol=0)
    table = sched.sigmas_ve
    assert sig[0] == pytest.approx(float(table[-1]), rel=1e-9)
    assert sig[-1] == pytest.approx(float(table[0]), rel=1e-9)
    far = sched.noise_levels(sched.timesteps(10, "karras", rho=-1e5)).log_snr[:-1]
    uni = sched.noise_levels(sched.timesteps(10, "logsnr")).log_snr[:-1]
    assert max(abs(a - b) for a, b in zip(far, uni)) < 1e-3


def test_sampling_keeps_no_autograd_graph_unless_asked():
    """Sampling a trainable model builds no graph over the steps (memory); with
    ``enable_grad=True`` the sample is differentiable, and its derivative in a weight
    matches a central finite difference."""
    from difflab.samplers import img2img, sample

    schedule = NoiseSchedule.cosine(1000)
    w = torch.nn.Parameter(torch.tensor(0.3))

    def model(x, t):  # an eps model with one weight
        return w * x

    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    kw = dict(schedule=schedule, sampler="ddim", steps=5, noise=noise, progress=False)
    plain = sample(model, **kw)
    assert not plain.requires_grad and plain.grad_fn is None
    again = img2img(model, noise, strength=0.5, **kw)
    assert again.images.grad_fn is None

    out = sample(model, enable_grad=True, **kw)
    out.sum().backward()
    eps = 1e-3
    with torch.no_grad():
        w += eps
        up = sample(model, **kw).sum()
        w -= 2 * eps
        down = sample(model, **kw).sum()
        w += eps
    assert w.grad == pytest.approx(float((up - down) / (2 * eps)), rel=1e-2)


def test_noise_levels_without_a_step_are_rejected():
    # Zero steps once reached the samplers: euler_ancestral from a zero-SNR start returned
    # None, euler raised IndexError there and returned VE-scaled noise from a finite level.
    from difflab.schedules import NoiseLevels

    for final in (-math.inf, -5.0):
        with pytest.raises(ValueError, match="at least one step"):
            NoiseLevels(t=[], log_snr=[final])
