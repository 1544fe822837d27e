"""Launching 2-rank CPU jobs under ``torchrun`` (``python -m torch.distributed.run``) for the
distributed tests: a free local port, the workers' environment (one OpenMP thread, no CUDA,
``PYTHONPATH`` first), and the command line."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(*paths: Path, **extra: str) -> dict[str, str]:
    """This process's environment for CPU workers: ``paths`` before ``PYTHONPATH``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])
    return env


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """``torchrun --nproc-per-node NPROC`` on a free local port, then ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]  # fmt: skip
