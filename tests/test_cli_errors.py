"""The ``difflab`` command meets bad input: exit status 2 and one line naming the problem,
never a traceback (issue 14's unlucky user)."""

from __future__ import annotations

from pathlib import Path

import pytest

from difflab.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "digits.yaml"
TINY = ["model.preset=tiny", "model.model_channels=16", "model.norm_groups=4",
        "train.batch_size=8", "train.device=cpu", "train.sample_every=0",
        "train.plot_metrics=false", "train.max_steps=1"]  # fmt: skip


def train_argv(run_dir: Path, *overrides: str) -> list[str]:
    """``difflab train configs/digits.yaml`` at the tiny size into ``run_dir``."""
    sets = [f"--set={o}" for o in (f"run_dir={run_dir}", *TINY, *overrides)]
    return ["train", str(CONFIG), *sets]


def user_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run ``argv``: exit status 2 and a one-line ``difflab CMD: error: ...`` holding every
    needle; returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "\n" not in lines[0]
    return lines[0]


def test_max_steps_zero_is_refused(tmp_path, capsys):
    user_error(capsys, train_argv(tmp_path, "train.max_steps=0"), "train.max_steps", ">= 1")
    assert not (tmp_path / "config.yaml").exists()
