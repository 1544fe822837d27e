"""The parts a diffusion run is made of, built from its config and handed to the loop.

Owns :class:`TrainParts` and :func:`build_parts`, which builds them from the config in a
fixed order — the process group and the seeds, data, held-out split, conditioning, network
with its fine-tuning set-up, then the diffusion loss and the hooks — the order every rank
and every resume repeats.  As in EDM's ``training_loop``, the loop
(:class:`difflab.train.loop.Trainer`) receives them ready-made and never branches on text,
latents or fine-tuning; it talks to them through the ``Protocol``s of
:mod:`difflab.train.protocols`::

    config ──► build_parts ──► TrainParts(config, dist, precision, generators, stream,
                                          val_set, conditioning, finetune, model, loss, hooks)
                                         │
                               Trainer(parts): core step, run, save/restore, RNG state

Knows nothing of the optimiser, EMA or checkpoints.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formulations import formulation_from_config
from ..schedules import NoiseSchedule
from .adapt import adapt_to_data, build_stream, set_bucket_step
from .amp import Precision, resolve_precision
from .conditioning import Conditioning
from .config import TrainConfig
from .diffusion_loss import DiffusionLoss
from .distributed import DistInfo, setup_distributed
from .finetune_setup import FinetuneSetup, with_prior_images
from .hooks import TrainHooks
from .protocols import ConditioningPart, FinetunePart, HooksPart, StepTask
from .seeds import RunGenerators, subseed
from .stream import BatchStream
from .validation import split_dataset

__all__ = [
    "ConditioningPart",
    "FinetunePart",
    "HooksPart",
    "StepTask",
    "TrainParts",
    "build_parts",
]


@dataclass
class TrainParts:
    """What :func:`build_parts` built for one process of a run.

    :param config: the resolved run config (its model section complete, folders absolute).
    :param dist: this process's rank, world size and device (the process group is set up).
    :param run_dir: the run directory.
    :param precision: the mixed-precision mode (autocast, grad scaler).
    :param generators: the shared, aux and data generators.
    :param stream: the training batches.
    :param val_set: the held-out data (None: no validation).
    :param conditioning: batch -> (latent) images and ``cond``.
    :param finetune: the fine-tuning set-up (what it publishes at each checkpoint).
    :param model: the network to train (a :class:`~difflab.models.contract.DenoiserNet`).
    :param loss: the diffusion loss of one micro-batch.
    :param hooks: sample grids, validation loss, periodic evaluation.
    """

    config: TrainConfig
    dist: DistInfo
    run_dir: Path
    precision: Precision
    generators: RunGenerators
    stream: BatchStream
    val_set: Any
    conditioning: ConditioningPart
    finetune: FinetunePart
    model: nn.Module
    loss: DiffusionLoss
    hooks: HooksPart


def build_parts(
    config: TrainConfig, *, dataset: Any = None, model: nn.Module | None = None
) -> TrainParts:
    """Build a run's parts from ``config`` (resolved here; the keys the caller set tell
    whether ``model.num_classes`` was chosen).  Sets up the process group under torchrun
    and seeds torch's global RNG for dropout (``seed + rank``; :func:`difflab.train.train`
    restores the caller's).  See the module docstring for the order.

    :param dataset: data set of dicts; default ``difflab.data.build_dataset(config.data)``.
    :param model: a network honouring the model contract; default the config's, initialised
        from ``config.seed``.
    """
    cfg = config.resolve()
    tc = cfg.train
    info = setup_distributed(tc.device, tensor_parallel=tc.tensor_parallel)
    # Dropout layers draw from torch's global RNG: seed it per rank (train() restores the
    # caller's state afterwards; a checkpoint saves and restores it).
    torch.manual_seed(subseed(cfg.seed, 100 + info.data_rank))
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir {str(run_dir)!r} is a file, not a directory")
    precision = resolve_precision(tc.mixed_precision, info.device)
    schedule = NoiseSchedule.from_config(cfg.diffusion.schedule)
    # edm / flow (difflab.formulations): their own noise levels, loss and sampling table
    formulation = formulation_from_config(
        cfg.diffusion.formulation, cfg.diffusion.formulation_options
    )
    if formulation is not None:
        schedule = formulation.schedule
    gens = RunGenerators.from_seed(cfg.seed, info.data_rank)  # a TP group shares its draws
    set_bucket_step(cfg)  # data.buckets: sides in multiples the network takes
    report = None  # printed once the captions' token counts are known
    if dataset is None:
        from ..data import build_dataset

        dataset, report = build_dataset(cfg.data, generator=gens.data)
        if info.is_main and cfg.data.source == "captions" and not cfg.text.enabled:
            warnings.warn(
                "data.source=captions, but text.encoder is none: the captions are read and "
                "do not condition the model, which trains unconditionally; set "
                "text.encoder=transformer (trained on these captions), clip or t5 to "
                "condition on them",
                stacklevel=3,
            )
    else:
        gen = getattr(dataset, "generator", None)
        if isinstance(gen, torch.Generator):
            gens.data = gen
    dataset = with_prior_images(cfg, dataset, info, run_dir)
    # Held-out validation data: the same split on every rank and after a resume.
    dataset, val_set = split_dataset(dataset, cfg.train.val_fraction, subseed(cfg.seed, 50))
    if val_set is not None and info.is_main:
        print(f"validation: {len(val_set)} held-out samples, {len(dataset)} for training")
    notes = adapt_to_data(
        cfg, dataset, num_classes_given=model is not None or "num_classes" in config.model,
        world_size=info.data_world,
    )  # fmt: skip
    stream = build_stream(
        cfg, dataset, rank=info.data_rank, world_size=info.data_world,
        mix_seed=subseed(cfg.seed, 60), generator=gens.data,
    )  # fmt: skip
    conditioning = Conditioning(cfg, dataset, info.device)
    if info.is_main:
        if report is not None:
            conditioning.count_truncated(report)
            print(report)
        if notes:
            print("\n".join(notes))
    finetune = FinetuneSetup(cfg, is_main=info.is_main)
    net = build_network(cfg, conditioning, finetune, model).to(info.device)
    finetune.attach_word(net, conditioning)
    null_label: int | None = getattr(net, "null_class_label", None)
    loss = DiffusionLoss(
        cfg, conditioning, schedule, formulation, precision, info,
        shared=gens.shared, aux=gens.aux, null_label=null_label,
    )  # fmt: skip
    hooks = TrainHooks(
        cfg, schedule, formulation, conditioning, val_set, info.device, run_dir,
        null_label=null_label, is_main=info.is_main,
    )  # fmt: skip
    return TrainParts(cfg, info, run_dir, precision, gens, stream, val_set, conditioning,
                      finetune, net, loss, hooks)  # fmt: skip


def build_network(
    cfg: TrainConfig, conditioning: Conditioning, finetune: FinetuneSetup,
    model: nn.Module | None,
) -> nn.Module:  # fmt: skip
    """The network to train: ``model`` when given, else the config's (weights from the run
    seed), wrapped with a trained text encoder and adapted for fine-tuning; then gradient
    checkpointing and the channels-last layout as the config says."""
    tc = cfg.train
    if model is None:
        from ..models import build_model

        mcfg = cfg.model_config()
        if mcfg.context_dim is not None and not cfg.text.enabled:
            raise ValueError(
                "model.context_dim is set, but there is no text encoder to feed it; set "
                "text.encoder: transformer (trained on the data's captions) or clip"
            )
        model = build_model(mcfg, generator=torch.Generator().manual_seed(cfg.seed))
        model = conditioning.wrap(model)
        finetune.adapt(model, conditioning)
    if tc.grad_checkpointing:
        if not hasattr(model, "set_gradient_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no set_gradient_checkpointing()")
        model.set_gradient_checkpointing(True)  # type: ignore[operator]  # checked above
    if tc.channels_last:  # torch's Module.to stubs lack memory_format
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model.train()
