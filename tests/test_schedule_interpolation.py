"""NoiseSchedule(interpolation="sigma"): fractional timesteps linear in σ^VE (np.interp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.schedules import NoiseSchedule


def test_sigma_interpolation_is_np_interp_of_the_sigma_table() -> None:
    sched = NoiseSchedule.scaled_linear().with_interpolation("sigma")
    table = sched.sigmas_ve.numpy()
    ts = [0.0, 0.25, 13.7, 500.5, 998.9, 999.0]
    expect = np.interp(ts, np.arange(1000), table)
    got = [math.exp(-0.5 * sched.log_snr(t)) for t in ts]
    assert got == pytest.approx(expect.tolist(), rel=1e-12)
    lam_t = sched.log_snr(torch.tensor(ts))  # float32 tensor path
    assert torch.exp(-0.5 * lam_t).double().numpy() == pytest.approx(expect, rel=2e-6)
    for t in ts:  # the inverse uses the same rule
        assert sched.t_from_log_snr(sched.log_snr(t)) == pytest.approx(t, abs=1e-9)
        assert sched.t_from_sigma_ve(math.exp(-0.5 * sched.log_snr(t))) == pytest.approx(
            t, abs=1e-9
        )


def test_default_stays_log_snr_and_integers_agree() -> None:
    a = NoiseSchedule.scaled_linear()
    b = a.with_interpolation("sigma")
    assert a.interpolation == "log_snr"
    assert a.log_snr(10.5) == pytest.approx(0.5 * (a.log_snr(10) + a.log_snr(11)), abs=1e-12)
    assert b.log_snr(10.5) != pytest.approx(a.log_snr(10.5), abs=1e-9)
    for t in (0, 1, 500, 999):
        assert a.log_snr(float(t)) == b.log_snr(float(t))
    assert a != b  # same betas, different λ(t) between integers


def test_config_round_trip_keeps_interpolation() -> None:
    for sched in (
        NoiseSchedule.cosine().with_interpolation("sigma"),
        NoiseSchedule.scaled_linear().rescale_zero_terminal_snr().with_interpolation("sigma"),
        NoiseSchedule.from_betas([0.1, 0.2, 0.3]).with_interpolation("sigma"),
    ):
        cfg = sched.to_config()
        assert cfg["interpolation"] == "sigma"
        again = NoiseSchedule.from_config(cfg)
        assert again == sched and again.interpolation == "sigma"
    assert "interpolation" not in NoiseSchedule.linear().to_config()
    with pytest.raises(ValueError, match="timestep interpolation"):
        NoiseSchedule.linear().with_interpolation("cubic")


def test_zero_terminal_snr_last_interval_stays_finite_and_invertible() -> None:
    """σ^VE_{T-1} = ∞: the last interval falls back to α linear to 0 (as log_snr mode)."""
    zs = NoiseSchedule.scaled_linear().rescale_zero_terminal_snr()
    sig = zs.with_interpolation("sigma")
    assert sig.zero_terminal_snr
    for t in (998.25, 998.5, 998.999):
        lam = sig.log_snr(t)
        assert math.isfinite(lam) and lam == pytest.approx(zs.log_snr(t), abs=1e-12)
        assert sig.t_from_log_snr(lam) == pytest.approx(t, abs=1e-9)
    assert sig.log_snr(999.0) == -math.inf
    lam_t = sig.log_snr(torch.tensor([998.5, 997.5, 999.0]))
    assert torch.isfinite(lam_t[:2]).all() and lam_t[2] == -math.inf
    assert lam_t[0].item() == pytest.approx(sig.log_snr(998.5), abs=1e-4)
