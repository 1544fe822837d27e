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
    if not k or cfg.text.enabled:
        return []
    declared = cfg.model.get("num_classes")
    if declared is not None:
        _check_class_count(k, int(declared), names, cfg.data.source)
        return []
    if cfg.data.source not in ("folder", "npz") or cfg.finetune.base_run is not None:
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


def _check_class_count(k: int, declared: int, names: list[str], source: str) -> None:
    """The data's ``k`` classes against ``model.num_classes``: more is an error (their labels
    have no embedding), fewer a warning (the model's other classes are never trained)."""
    shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
    if k > declared:
        extra = f"label {declared} has" if k - declared == 1 else f"labels {declared}..{k - 1} have"
        raise ValueError(
            f"the data (source {source}) has {k} classes ({shown}) but model.num_classes is "
            f"{declared}: {extra} no embedding; set model.num_classes: "
            f"{k} (or leave it out for folder/npz data)"
        )
    if k < declared:
        warnings.warn(
            f"the data (source {source}) has {k} classes ({shown}) but model.num_classes is "
            f"{declared}: classes {k}..{declared - 1} are never trained and sample noise; set "
            f"model.num_classes: {k} unless a later run adds them",
            stacklevel=3,
        )


def set_bucket_step(cfg: TrainConfig) -> None:
    """``data.buckets``: bucket sides default to (and must be multiples of) the network's
    size multiple, the autoencoder's factor times the U-Net's downsampling (64 for Stable
    Diffusion's 8 x 8); the checks name what does not fit."""
    if not cfg.data.buckets:
        return
    mcfg = cfg.model_config()
    if not hasattr(mcfg, "downsample_factor"):
        raise ValueError("data.buckets needs a U-Net (a DiT's position table is square)")
    vae = cfg.latent.vae_config()
    need = mcfg.downsample_factor * (vae.downsample_factor if vae is not None else 1)
    if cfg.data.bucket_step is None:
        cfg.data.bucket_step = need
    elif cfg.data.bucket_step % need:
        raise ValueError(
            f"data.bucket_step={cfg.data.bucket_step} must be a multiple of {need} (the "
            "autoencoder's factor times the U-Net's downsampling)"
        )
    clash = [k for k, on in (("train.val_fraction", cfg.train.val_fraction > 0),
                             ("data.mix", cfg.data.mix is not None),
                             ("finetune.prior_condition", cfg.finetune.prior_condition is not None))
             if on]  # fmt: skip
    if clash:
        raise ValueError(f"data.buckets cannot be combined with {', '.join(clash)} yet")


def build_stream(
    cfg: TrainConfig,
    dataset: Any,
    *,
    rank: int,
    world_size: int,
    mix_seed: int,
    generator: Any,
) -> Any:
    """The run's batch stream: plain, bucketed (``data.buckets``) or mixed (``data.mix``)."""
    from ..data import build_dataset
    from .stream import BatchStream, BucketBatchStream, MixedStream

    tc = cfg.train
    common = {"rank": rank, "world_size": world_size, "num_workers": tc.num_workers}
    if cfg.data.buckets:
        ids = dataset.bucket_ids
        return BucketBatchStream(dataset, tc.batch_size, bucket_ids=ids, seed=cfg.seed, **common)
    if cfg.data.mix is None:
        return BatchStream(dataset, tc.batch_size, seed=cfg.seed, **common)
    mix_cfg, fraction = cfg.data.mix_config()
    m = round(fraction * tc.batch_size)
    if not 0 < m < tc.batch_size:
        raise ValueError(
            f"data.mix.fraction={fraction} of train.batch_size={tc.batch_size} is {m} samples; "
            "a mixed batch needs at least one of each"
        )
    mix_set, report = build_dataset(mix_cfg, generator=generator)
    if rank == 0:
        print(f"mixed into every batch: {m} of {tc.batch_size} samples from\n{report}")
    main = BatchStream(dataset, tc.batch_size - m, seed=cfg.seed, **common)
    return MixedStream(main, BatchStream(mix_set, m, seed=mix_seed, **common))
