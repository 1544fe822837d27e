"""Run directories on disk: the one atomic write, a run's config and its weight files.

Owns ``atomic_write_bytes`` (every file difflab publishes is written to a temp file in the
same folder, fsynced and renamed into place, so a crash never leaves a torn file; new files
follow the umask), ``read_run_config`` (a run's resolved ``config.yaml``) and
``load_weights`` (a safetensors file into a network, every key and shape checked).  The
lowest layer that touches files: it imports nothing of difflab's but ``_validate``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn

__all__ = [
    "WEIGHTS",
    "atomic_write_bytes",
    "load_weights",
    "read_run_config",
    "state_mismatch",
    "weights_file",
]

WEIGHTS = {"ema": "ema.safetensors", "raw": "model.safetensors"}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` atomically: a temp file in the same directory, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:  # open() honours the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved ``config.yaml`` of a run directory, as plain dicts."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {str(run)!r} does not exist")
    path = run / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a run directory: it has no config.yaml")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path} has no 'model' section; is it a difflab run config?")
    return data


def load_weights(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a safetensors file into ``model``; every key and shape must match exactly.

    :return: the file's metadata (e.g. ``step``).
    :raises ValueError: "checkpoint from another architecture", listing missing,
        unexpected and shape-mismatched keys.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
    except Exception as err:  # SafetensorError: a truncated or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(
            f"{path} is a checkpoint from another architecture than its config.yaml "
            f"describes: {mismatch}"
        )
    model.load_state_dict(state)
    return metadata


def state_mismatch(expected: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """How ``state`` fails to fit a network whose state dict is ``expected``: counts and the
    first few missing, unexpected and shape-mismatched keys ("" when it fits exactly)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{len(items)} {what} key(s): {'; '.join(items[:3])}{more}")
    return ", ".join(parts)


def weights_file(run_dir: Path, weights: str) -> Path:
    """``ema`` / ``raw``, or ``NAME`` / ``NAME.safetensors`` of a file in the run directory."""
    if weights in WEIGHTS:
        return run_dir / WEIGHTS[weights]
    name = weights if weights.endswith(".safetensors") else f"{weights}.safetensors"
    if "/" not in name and (run_dir / name).is_file():
        return run_dir / name
    found = sorted(p.stem for p in run_dir.glob("*.safetensors") if p.stem not in ("ema", "model"))
    raise ValueError(
        f"unknown weights {weights!r}: choose ema, raw or a weights file in {run_dir}"
        + (f" ({', '.join(found)})" if found else "")
    )


