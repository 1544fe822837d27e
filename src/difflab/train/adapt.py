"""Fitting a run's settings to the data it finds: the small-data path of the templates.

Owns the adjustments :class:`difflab.train.Trainer` makes before building the network,
each said aloud (returned as lines to print, or warned): a batch larger than the data set is
clamped; ``log_every`` / ``sample_every`` longer than the run shrink so a short run still
logs and draws a grid; class folders with ``model.num_classes`` left out make the model
class-conditional.  Existing configs whose settings already fit are left exactly as they
are.  Knows nothing of the loop.
"""

from __future__ import annotations

import warnings
from typing import Any

from .config import TrainConfig

__all__ = ["adapt_to_data"]


def adapt_to_data(
    cfg: TrainConfig,
    dataset: Any,
    *,
    num_classes_given: bool,
    world_size: int = 1,
) -> list[str]:
    """Adjust ``cfg`` (a resolved config, changed in place) to ``dataset``; returns notes.

    :param num_classes_given: whether the user's model section names ``num_classes``
        (``null`` included); when it does not and the data has class folders, the model
        becomes class-conditional over them.
    :raises ValueError: fewer samples than processes.
    """
    tc, notes = cfg.train, []
    n = len(dataset)
    if n < tc.batch_size:
        clamped = (n // world_size) * world_size
        if clamped < 1:
            raise ValueError(
                f"the data set has {n} samples, fewer than the {world_size} processes; "
                "add images or run fewer processes"
            )
        warnings.warn(
            f"train.batch_size={tc.batch_size} is larger than the data set ({n} samples): "
            f"using batch_size={clamped} (set train.batch_size to choose)",
            stacklevel=3,
        )
        tc.batch_size = clamped
    if tc.max_time is None:  # the run's length is known: short runs still log and sample
        if tc.log_every > tc.max_steps:
            tc.log_every = max(1, tc.max_steps // 10)
            notes.append(f"train.log_every > max_steps: logging every {tc.log_every} steps")
        if tc.sample_every > tc.max_steps:
            tc.sample_every = tc.max_steps
            notes.append("train.sample_every > max_steps: one sample grid at the last step")
    notes += _classes(cfg, dataset, num_classes_given)
    return notes


def _classes(cfg: TrainConfig, dataset: Any, given: bool) -> list[str]:
    """Class folders and ``model.num_classes``: conditional when left out, a word when null."""
    k = getattr(dataset, "num_classes", None)
    names = list(getattr(dataset, "class_names", []) or [])
    if not k or cfg.data.source not in ("folder", "npz") or cfg.text.enabled:
        return []
    if cfg.finetune.base_run is not None or cfg.model.get("num_classes") is not None:
        return []
    if given:  # an explicit null: the user asked for an unconditional model
        warnings.warn(
            f"the data has {k} classes ({', '.join(names[:5])}) but model.num_classes is "
            "null: training an unconditional model; leave model.num_classes out (or set it "
            f"to {k}) to condition on the classes",
            stacklevel=3,
        )
        return []
    cfg.model["num_classes"] = k
    cfg.model_config()  # still a valid network
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    return [
        f"model: class-conditional on the {k} class folders ({shown}) since model.num_classes "
        "is not set; set model.num_classes: null for an unconditional model"
    ]
