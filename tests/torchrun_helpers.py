"""Launching 2-rank CPU jobs under ``torchrun`` (``python -m torch.distributed.run``) for the
distributed tests: a free local port, the workers' environment (one OpenMP thread, no CUDA,
``PYTHONPATH`` first), and the command line."""

from __future__ import annotations

import os
import socket
import subprocess
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


# A rank can abort at interpreter exit, after its work is done, with this line from a C++
# thread torn down while joinable (seen about once in seven 2-rank CPU runs of
# tests/train/test_ddp.py's latent case, stop 12; not yet traced to difflab or gloo).
EXIT_ABORT = "terminate called without an active exception"


def run_once_more_on_exit_abort(
    cmd: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd)``, launched a second time only if the first ended in the
    :data:`EXIT_ABORT` line (any other failure is returned as it is)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and EXIT_ABORT in proc.stderr:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc
