"""Checkpoints: everything needed to resume a run bit for bit, written atomically.

Owns the on-disk layout of a run's checkpoint (``notes/run_layout.md``)::

    run_dir/model.safetensors        raw weights  (metadata: step)
    run_dir/ema.safetensors          EMA weights  (metadata: step, ema_updates)
    run_dir/train_state/
        model.safetensors, ema.safetensors   the same weights (hard links when possible)
        optimizer.safetensors        every optimiser state tensor, flattened
        dcp/                         instead of optimizer.safetensors in a sharded (FSDP)
                                     checkpoint: each rank's shards of model, EMA and
                                     optimiser state (torch.distributed.checkpoint)
        rng.safetensors              torch CPU/CUDA RNG states and the trainer's generators
        state.json                   step, data position, EMA count, LR schedule, grad
                                     scaler, the optimiser's non-tensor parts (written last)

No pickle anywhere: tensors go to safetensors, the rest to JSON.  A save builds a complete
``train_state.tmp-XXXX`` directory (every file fsync'ed), renames the previous
``train_state`` aside, renames the new one in, then publishes the top-level weights with
``os.replace``; a crash at any point leaves a complete checkpoint that
:func:`load_checkpoint` finds.  The two top-level files cannot be replaced together: a kill
between them leaves one a save behind, so :func:`repair_run_dir` (run on every start)
republishes whichever differs from the checkpoint and deletes the hidden temp files
(``.NAME.tmp-XXXX``) that killed writes leave.  Knows nothing of models or the training loop.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ..runs import _fsync_dir, atomic_write_bytes

__all__ = [
    "Checkpoint",
    "atomic_write_bytes",
    "commit_state_dir",
    "flatten_optimizer_state",
    "load_checkpoint",
    "new_state_dir",
    "repair_run_dir",
    "save_checkpoint",
    "unflatten_optimizer_state",
    "write_state_files",
]

STATE_DIR = "train_state"
FORMAT_VERSION = 1
PUBLISHED = ("model.safetensors", "ema.safetensors")  # the top-level copies of the weights


@dataclass
class Checkpoint:
    """The contents of one checkpoint.

    :param model: raw weights.
    :param ema: EMA weights.
    :param optimizer: ``optimizer.state_dict()``.
    :param rng: named RNG state tensors (uint8).
    :param meta: JSON-able scalars: ``step``, ``ema_updates``, data position, LR schedule
        and grad-scaler state dicts, ...
    """

    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- low-level writes
def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the one place checkpoint bytes hit disk)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _tensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return st_save(plain, metadata=metadata)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return st_load(path.read_bytes())
    except Exception as err:  # SafetensorError: a truncated or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _read_state(state_dir: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint; ValueError naming the file when it is cut short."""
    path = state_dir / "state.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"{path}: not a difflab checkpoint state (no 'step')")
    return meta


# --------------------------------------------------------------------------- optimiser state
def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors ``state.<param>.<name>`` and a JSON index."""
    tensors: dict[str, Tensor] = {}
    index: dict[str, dict[str, Any]] = {}
    for pid, per_param in state["state"].items():
        entry: dict[str, Any] = {}
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                key = f"state.{pid}.{name}"
                tensors[key] = value
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        index[str(pid)] = entry
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in state["param_groups"]]  # fmt: skip
    return tensors, {"state": index, "param_groups": groups}


def unflatten_optimizer_state(
    tensors: dict[str, Tensor], index: dict[str, Any], like: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`.

    :param like: the live optimiser's ``state_dict()``; group entries that are tuples there
        (AdamW's ``betas``) are turned back into tuples.
    """
    state = {
        int(pid): {
            name: tensors[spec["tensor"]] if "tensor" in spec else spec["value"]
            for name, spec in entry.items()
        }
        for pid, entry in index["state"].items()
    }
    groups = [dict(g) for g in index["param_groups"]]
    if like is not None:
        for group, ref in zip(groups, like["param_groups"]):
            for k, v in ref.items():
                if isinstance(v, tuple) and isinstance(group.get(k), list):
                    group[k] = tuple(group[k])
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- save / load
def _publish(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes atomically (hard link when possible, else a copy)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _clean_stale(run_dir: Path) -> None:
    for stale in run_dir.glob(f"{STATE_DIR}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` into ``run_dir`` atomically; returns the ``train_state`` directory.

    The previous checkpoint stays loadable until the new one is complete.
    """
    run_dir = Path(run_dir)
    opt_tensors, opt_index = flatten_optimizer_state(ckpt.optimizer)
    tmp = new_state_dir(run_dir)
    try:
        _write_file(tmp / "optimizer.safetensors", _tensors_bytes(opt_tensors))
        write_state_files(tmp, ckpt, {"optimizer": opt_index})  # state.json last
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_state_dir(run_dir, tmp)


def new_state_dir(run_dir: str | Path) -> Path:
    """A fresh ``train_state.tmp-XXXX`` directory in ``run_dir`` (stale ones deleted) that
    :func:`commit_state_dir` later renames into place."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(run_dir)
    return Path(tempfile.mkdtemp(prefix=f"{STATE_DIR}.tmp-", dir=run_dir))


def write_state_files(tmp: Path, ckpt: Checkpoint, extra_meta: dict[str, Any]) -> None:
    """Write the whole-model weights, RNG states and ``state.json`` (last) of ``ckpt`` into
    the temp directory ``tmp``; ``extra_meta`` joins ``ckpt.meta`` in ``state.json``."""
    step = int(ckpt.meta.get("step", 0))
    ema_updates = int(ckpt.meta.get("ema_updates", 0))
    meta = {**ckpt.meta, "format_version": FORMAT_VERSION, **extra_meta}
    step_md = {"step": str(step), "format": "difflab"}
    _write_file(tmp / "model.safetensors", _tensors_bytes(ckpt.model, step_md))
    ema_md = {**step_md, "ema_updates": str(ema_updates)}
    _write_file(tmp / "ema.safetensors", _tensors_bytes(ckpt.ema, ema_md))
    _write_file(tmp / "rng.safetensors", _tensors_bytes(ckpt.rng))
    _write_file(tmp / "state.json", json.dumps(meta, indent=1).encode("utf-8"))
    _fsync_dir(tmp)


def commit_state_dir(run_dir: str | Path, tmp: Path) -> Path:
    """Rename the complete temp directory ``tmp`` to ``run_dir/train_state`` (the previous
    checkpoint renamed aside first, deleted last) and publish its top-level weights."""
    run_dir = Path(run_dir)
    final = run_dir / STATE_DIR
    old = None
    if final.exists():
        old = run_dir / f"{STATE_DIR}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(run_dir)
    for name in PUBLISHED:
        _publish(final / name, run_dir / name)
    _fsync_dir(run_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for older in run_dir.glob(f"{STATE_DIR}.old-*"):  # left by an earlier crash
        shutil.rmtree(older, ignore_errors=True)
    return final


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two published weight files hold the same save: one file (hard link), or the
    same size and safetensors header (``step``, ``ema_updates``, tensor offsets)."""
    try:
        if os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        return _header(a) == _header(b)
    except (OSError, ValueError):
        return False


def _header(path: Path) -> bytes:
    """The raw safetensors header (8-byte length, then JSON); ValueError when malformed."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if size > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file")
        return fh.read(size)


def repair_run_dir(run_dir: str | Path) -> list[str]:
    """Undo what a killed save leaves in ``run_dir``; returns what was repaired.

    Deletes the hidden temp files of interrupted atomic writes (``.NAME.tmp-XXXX``,
    ``.NAME.XXXX.tmp``) and the ``train_state.tmp-*`` directories, and republishes
    ``model.safetensors`` / ``ema.safetensors`` from the checkpoint when either is missing
    or from another save (a kill between the two ``os.replace`` calls of a save).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    done: list[str] = []
    for folder in (run_dir, run_dir / "samples"):
        for tmp in [*folder.glob(".*.tmp-*"), *folder.glob(".*.tmp")]:
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                done.append(f"removed {tmp.relative_to(run_dir)}")
    _clean_stale(run_dir)
    state_dir = find_checkpoint(run_dir)
    if state_dir is None:
        return done
    for name in PUBLISHED:
        src, dst = state_dir / name, run_dir / name
        if src.is_file() and not _same_weights(src, dst):
            _publish(src, dst)
            done.append(f"republished {name} from {state_dir.name}")
    if done:
        _fsync_dir(run_dir)
    return done


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete ``train_state`` directory of ``run_dir``, or None when there is none.

    A crash between renaming the previous checkpoint aside and renaming the new one in
    leaves only ``train_state.old-XXXX``; it is complete and is used.
    """
    run_dir = Path(run_dir)
    final = run_dir / STATE_DIR
    if (final / "state.json").is_file():
        return final
    olds = [p for p in run_dir.glob(f"{STATE_DIR}.old-*") if (p / "state.json").is_file()]
    if not olds:
        return None
    return max(olds, key=lambda p: _read_state(p)["step"])


def load_checkpoint(run_dir: str | Path, *, optimizer_like: dict | None = None) -> Checkpoint:
    """Read the checkpoint of ``run_dir``.

    :param optimizer_like: the live optimiser's ``state_dict()`` (restores tuple entries).

    A sharded checkpoint (``meta["sharded"]``, written by ``difflab.train.fsdp``) gives its
    whole-model weights, RNG states and meta here and an empty ``optimizer``: its optimiser
    state lives in DCP shards that ``difflab.train.fsdp.load_sharded`` reads.
    :raises FileNotFoundError: when ``run_dir`` holds no complete checkpoint.
    """
    state_dir = find_checkpoint(run_dir)
    if state_dir is None:
        raise FileNotFoundError(f"no checkpoint (train_state/state.json) under {run_dir}")
    meta = _read_state(state_dir)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{state_dir}: checkpoint format {meta.get('format_version')!r}, "
            f"this difflab reads {FORMAT_VERSION}"
        )
    if meta.get("sharded") is not None:  # DCP shards: difflab.train.fsdp.load_sharded
        optimizer: dict[str, Any] = {}
    else:
        opt_index = meta.pop("optimizer")
        optimizer = unflatten_optimizer_state(
            _read_tensors(state_dir / "optimizer.safetensors"), opt_index, optimizer_like
        )
    return Checkpoint(
        model=_read_tensors(state_dir / "model.safetensors"),
        ema=_read_tensors(state_dir / "ema.safetensors"),
        optimizer=optimizer,
        rng=_read_tensors(state_dir / "rng.safetensors"),
        meta=meta,
    )
