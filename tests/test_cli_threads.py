"""--threads on every command: parsed everywhere, applied for the command, restored after."""

from __future__ import annotations

import argparse

import torch

from difflab import cli
from difflab.cli.common import free_cores


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_takes_threads():
    subs = _subparsers()
    for name in ("train", "finetune", "sample", "eval", "sweep", "serve", "demo", "train-vae"):
        opts = [o for a in subs[name]._actions for o in a.option_strings]
        assert "--threads" in opts, name
    assert all(any("--threads" in a.option_strings for a in p._actions) for p in subs.values())
    assert subs["demo"].parse_args([]).threads == 1  # the demo keeps its measured default


def test_threads_apply_during_the_command_and_come_back(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_train", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    parser = cli.build_parser  # train's parser holds the original _train: point it at the fake
    monkeypatch.setattr(cli, "build_parser", lambda: _patched(parser()))
    assert cli.main(["train", "x.yaml", "--threads", "3"]) == 0
    assert seen == [3] and torch.get_num_threads() == before
    assert cli.main(["train", "x.yaml", "--threads", "-1"]) == 2


def _patched(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    action.choices["train"].set_defaults(func=lambda args: cli._train(args))
    return parser


def test_default_is_the_free_cores(monkeypatch):
    """Idle 2 cores: torch's 2; one busy process (load 1.3): 1; 16 cores at load 3.2: 13."""
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for load, expected in ((0.6, 2), (1.3, 1), (7.5, 1)):
            monkeypatch.setattr(cli.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
            with cli._torch_threads(None):
                assert torch.get_num_threads() == expected, load
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(cli.os, "cpu_count", lambda: 16)
        monkeypatch.setattr(cli.os, "getloadavg", lambda: (3.2, 0.0, 0.0))
        assert free_cores(16) == 13 and free_cores(8) == 0  # 0: torch's own choice
        monkeypatch.delattr(cli.os, "getloadavg")
        assert free_cores(16) == 0
        monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
        assert free_cores(2) == 1
    finally:
        torch.set_num_threads(before)
