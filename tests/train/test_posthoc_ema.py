"""Post-hoc EMA (Karras et al. 2024, EDM2): σ_rel ↔ γ, the power-EMA weights, the profile
overlap integrals, reconstruction of a tracked EMA from snapshots of two other γ, the
training loop's snapshots (exact resume) and ``difflab ema``."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_helpers import ToyData, one_thread, tiny_config, train_with_a_cut  # noqa: F401

from difflab.cli import main as cli_main
from difflab.pipeline import Pipeline
from difflab.train import train
from difflab.train.posthoc_ema import (
    PostHocEMA,
    PostHocEMAConfig,
    gamma_to_sigma_rel,
    list_snapshots,
    profile_inner_product,
    reconstruct,
    sigma_rel_to_gamma,
)


def test_sigma_rel_gamma_conversion_matches_the_paper():
    # EDM2 sec. 3.1: "γ1 = 16.97 and γ2 = 6.94" are σ_rel 0.05 and 0.10
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for sigma in (0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma, rel=1e-12)
        cubic = gamma**3 + 7 * gamma**2 + (16 - sigma**-2) * gamma + 12 - sigma**-2
        assert abs(cubic) < 1e-6 * sigma**-2
    assert gamma_to_sigma_rel(0.0) == pytest.approx(math.sqrt(1 / 12))  # uniform profile
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(0.31)


class Vector(nn.Module):
    """A "network" whose parameter the test sets to each point of a trajectory."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))


def track(trajectory: torch.Tensor, sigma_rels, run_dir, every: int) -> PostHocEMA:
    """Feed ``trajectory[τ-1]`` as the parameters after step ``τ`` to a ``PostHocEMA``."""
    net = Vector(trajectory.shape[1]).to(trajectory.dtype)
    write = run_dir is not None
    cfg = PostHocEMAConfig(sigma_rels=tuple(sigma_rels), every=every)
    ema = PostHocEMA(net, cfg, run_dir or ".", last_step=len(trajectory), write=write)
    for step, theta in enumerate(trajectory, start=1):
        with torch.no_grad():
            net.w.copy_(theta)
        ema.update(net, step)
    return ema


def test_power_ema_weighs_step_tau_by_the_profile_integral():
    """After t updates the average is Σ_τ ((τ/t)^(γ+1) - ((τ-1)/t)^(γ+1)) θ_τ: the profile
    p_t(s) = (γ+1) s^γ / t^(γ+1) integrated over each step (EDM2 eq. 2 and fig. 3)."""
    t = 12
    ema = track(torch.eye(t, dtype=torch.float64), [0.1], None, every=100)
    gamma = sigma_rel_to_gamma(0.1)
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    expect = (tau / t) ** (gamma + 1) - ((tau - 1) / t) ** (gamma + 1)
    torch.testing.assert_close(ema.models[0].w.data, expect, rtol=1e-12, atol=1e-14)


def test_profile_inner_product_equals_numerical_integral():
    def profile(s, t, g):
        return torch.where(s <= t, (g + 1) * s**g / t ** (g + 1), torch.zeros_like(s))

    s = torch.linspace(0, 300, 1_000_001, dtype=torch.float64)[1:]
    for t_a, g_a, t_b, g_b in [(100, 6.94, 300, 16.97), (250, 3.0, 120, 0.5), (80, 2, 80, 9)]:
        numeric = torch.trapezoid(profile(s, t_a, g_a) * profile(s, t_b, g_b), s)
        exact = profile_inner_product(t_a, g_a, t_b, g_b)
        assert float(exact) == pytest.approx(float(numeric), rel=1e-5)


def test_reconstruction_from_two_gammas_equals_a_directly_tracked_third(tmp_path):
    """A random-walk trajectory of 200 steps, snapshots every 10 steps for σ_rel 0.05 and
    0.10: the σ_rel 0.08 EMA tracked directly is reconstructed to 1e-4, though it differs
    from either tracked EMA at the end by 100x more."""
    gen = torch.Generator().manual_seed(0)
    steps = 200
    tau = torch.arange(1, steps + 1, dtype=torch.float32)[:, None]
    walk = 0.3 * torch.randn(steps, 40, generator=gen).cumsum(0) / steps**0.5
    trajectory = torch.sin(tau / steps * torch.linspace(1, 6, 40)) + walk
    track(trajectory, [0.05, 0.10], tmp_path, every=10)
    direct = track(trajectory, [0.08], None, every=10).models[0].w.data
    assert len(list_snapshots(tmp_path)) == 40

    state, meta = reconstruct(tmp_path, 0.08)
    assert meta["step"] == "200" and meta["snapshots"] == "40"
    assert (state["w"] - direct).abs().max() < 1e-4
    last = [load_file(s.path)["w"] for s in list_snapshots(tmp_path) if s.step == steps]
    assert min(float((w - direct).abs().max()) for w in last) > 1e-2
    # a tracked σ_rel comes back as its own snapshot; an earlier step as that step's EMA
    same, _ = reconstruct(tmp_path, 0.10)
    torch.testing.assert_close(same["w"], last[1], atol=2e-6, rtol=0)
    early = track(trajectory[:100], [0.08], None, every=10).models[0].w.data  # 10 snapshots
    assert (reconstruct(tmp_path, 0.08, step=100)[0]["w"] - early).abs().max() < 5e-4
    with pytest.raises(ValueError, match="no snapshot at step 105"):
        reconstruct(tmp_path, 0.08, step=105)


def test_config_validation():
    assert PostHocEMAConfig.from_dict({"every": 5}).sigma_rels == (0.05, 0.10)
    with pytest.raises(ValueError, match="did you mean 'every'"):
        PostHocEMAConfig.from_dict({"evry": 5})
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        PostHocEMAConfig.from_dict({"sigma_rels": [0.5]})
    with pytest.raises(ValueError, match="first 3 decimals"):
        PostHocEMAConfig.from_dict({"sigma_rels": [0.05, 0.0501]})
    with pytest.raises(ValueError, match="every must be"):
        tiny_config("unused", "train.posthoc_ema.every=0")


PHEMA = ["train.posthoc_ema={sigma_rels: [0.05, 0.08, 0.10], every: 2}", "train.max_steps=6"]


def test_training_snapshots_survive_exact_resume(tmp_path):
    full_run, split_run = tmp_path / "full", tmp_path / "split"
    opts = ["train.posthoc_ema={sigma_rels: [0.05, 0.1], every: 2}", "train.max_steps=4"]
    train(tiny_config(full_run, *opts), dataset=ToyData(24))
    train_with_a_cut(tiny_config(split_run, *opts), 3, ToyData(24))
    full, split = list_snapshots(full_run), list_snapshots(split_run)
    assert [(s.step, s.t, s.sigma_rel) for s in full] == [(s.step, s.t, s.sigma_rel)
                                                           for s in split]  # fmt: skip
    assert [(s.step, s.sigma_rel) for s in full] == [(2, 0.05), (2, 0.1), (4, 0.05), (4, 0.1)]
    for a, b in zip(full, split):
        wa, wb = load_file(a.path), load_file(b.path)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), a.path.name
    # the tracking state of the last checkpoint and of the one before (kept until the next
    # checkpoint is published, in case a crash comes in between)
    names = sorted(p.name for p in (split_run / "posthoc_ema").glob("tracking-*"))
    assert names == ["tracking-000000003.safetensors", "tracking-000000004.safetensors"]


def test_real_run_reconstruction_cli_and_pipeline(tmp_path, capsys):
    run = tmp_path / "run"
    opts = [*PHEMA, "train.max_steps=6", "train.lr=1e-2", "train.log_every=100"]
    train(tiny_config(run, *opts, "train.posthoc_ema.every=1"), dataset=ToyData(24))
    # the σ_rel 0.08 EMA of the real run, rebuilt from the 0.05 and 0.10 snapshots alone
    two = tmp_path / "two"
    (two / "posthoc_ema").mkdir(parents=True)
    for snap in list_snapshots(run):
        if snap.sigma_rel != 0.08:
            shutil.copy(snap.path, two / "posthoc_ema" / snap.path.name)
    rebuilt, _ = reconstruct(two, 0.08)
    folder = run / "posthoc_ema"
    tracked = load_file(folder / "phema-000000006-sigma0.080.safetensors")
    neighbour = load_file(folder / "phema-000000006-sigma0.100.safetensors")
    err = max(float((rebuilt[k] - v).abs().max()) for k, v in tracked.items())
    apart = max(float((neighbour[k] - v).abs().max()) for k, v in tracked.items())
    assert err < 1e-5 and err < 0.02 * apart  # measured: 1.0e-6 and 2.7e-4

    capsys.readouterr()
    assert cli_main(["ema", str(run), "--sigma-rel", "0.05,0.12"]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in printed] == [
        "ema_sigma0.050.safetensors", "ema_sigma0.120.safetensors"]  # fmt: skip
    pipe = Pipeline.from_run(run, weights="ema_sigma0.120")
    state = load_file(run / "ema_sigma0.120.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in pipe.model.state_dict().items())
    assert pipe(n=1, class_labels=[1], steps=2, seed=0).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown weights 'ema_sigma0.3'.*ema_sigma0.050"):
        Pipeline.from_run(run, weights="ema_sigma0.3")
    assert cli_main(["ema", str(tmp_path), "--sigma-rel", "0.1"]) == 2  # no snapshots
    assert "holds no post-hoc EMA snapshots" in capsys.readouterr().err
