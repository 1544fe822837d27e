"""The ``difflab`` command meets bad input: exit status 2 and one line naming the problem,
never a traceback (issue 14's unlucky user)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny_run import make_tiny_run
from PIL import Image

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


def _trained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    run = tmp_path / "run"
    assert main(train_argv(run)) == 0
    capsys.readouterr()
    return run


def test_truncated_or_foreign_safetensors_name_the_file(tmp_path, capsys):
    run = _trained(tmp_path, capsys)
    weights = run / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    user_error(capsys, ["sample", str(run), "--n", "1", "-o", str(tmp_path / "s.png")],
               str(weights), "safetensors")  # fmt: skip
    state = run / "train_state" / "optimizer.safetensors"
    state.write_bytes(b"PK\x03\x04 not safetensors at all")
    user_error(capsys, [*train_argv(run, "train.max_steps=2"), "--resume"], str(state))


def test_resume_into_another_architecture_is_a_clear_error(tmp_path, capsys):
    run = _trained(tmp_path, capsys)
    argv = [*train_argv(run, "train.max_steps=2", "model.model_channels=8"), "--resume"]
    user_error(capsys, argv, "another architecture", str(run))


def test_broken_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-4\n  batch_size: 8\n")
    user_error(capsys, ["train", str(bad)], str(bad), "line ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error seen without CUDA")
def test_cuda_without_cuda_is_one_line_for_train_sample_and_eval(tmp_path, capsys):
    user_error(capsys, train_argv(tmp_path / "r", "train.device=cuda"), "no CUDA device")
    run = make_tiny_run(tmp_path / "tiny")
    for cmd in (["sample", str(run)], ["eval", str(run), "--metrics", "accuracy"],
                ["serve", str(run)]):  # fmt: skip
        user_error(capsys, [*cmd, "--device", "cuda"], "--device 'cuda'", "no CUDA device")


def test_run_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("my notes")
    user_error(capsys, train_argv(tmp_path / "taken"), str(tmp_path / "taken"), "not a directory")
    assert (tmp_path / "taken").read_text() == "my notes"


def test_truncated_state_json_names_the_file(tmp_path, capsys):
    run = _trained(tmp_path, capsys)
    state = run / "train_state" / "state.json"
    state.write_text(state.read_text()[:50])
    user_error(capsys, [*train_argv(run, "train.max_steps=2"), "--resume"], str(state))


def test_truncated_caption_files_name_the_file(tmp_path, capsys):
    data = tmp_path / "captions"
    data.mkdir()
    Image.new("L", (8, 8)).save(data / "0.png")
    (data / "0.txt").write_bytes("a caf\u00e9".encode()[:-1])  # cut inside the last character
    argv = train_argv(tmp_path / "r", "data.source=captions", f"data.path={data}")
    user_error(capsys, argv, str(data / "0.txt"), "UTF-8")
    (data / "0.txt").unlink()
    (data / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a ca')
    user_error(capsys, argv, str(data / "metadata.jsonl") + ":1")


def test_npz_that_is_not_a_zip(tmp_path, capsys):
    fake = tmp_path / "data.npz"
    fake.write_bytes(b"these are not the arrays you are looking for" * 10)
    argv = train_argv(tmp_path / "r", "data.source=npz", f"data.path={fake}")
    user_error(capsys, argv, str(fake), "not a .npz archive")


def test_train_takes_the_config_as_an_option_too(tmp_path, capsys):
    """``difflab train --config FILE`` trains as ``difflab train FILE`` does; none or both is
    one clear line."""
    argv = train_argv(tmp_path / "run")
    as_option = [argv[0], "--config", argv[1], *argv[2:]]
    assert main(as_option) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    capsys.readouterr()
    user_error(capsys, ["train", *argv[2:]], "one config", "--config")
    user_error(capsys, [*argv[:2], "--config", argv[1], *argv[2:]], "one config")
