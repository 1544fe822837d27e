"""The parts a diffusion run is made of, built from its config and handed to the loop.

Owns the small, typed interfaces through which :class:`difflab.train.loop.Trainer` talks to
its parts (``Protocol``s: :class:`ConditioningPart`, :class:`HooksPart`,
:class:`FinetunePart`, and :class:`StepTask`, what the core loop drives) and
:func:`build_parts`, which builds them from the config in a fixed order (data, held-out
split, conditioning, network with its fine-tuning set-up) — the order every rank and every
resume repeats.  The loop itself never branches on text, latents or fine-tuning::

    config ──► build_parts ──► TrainParts(stream, val_set, conditioning, finetune, model)
                                         │
                 Trainer(core step, run, save/restore, RNG) ◄── TrainHooks

Knows nothing of the optimiser, EMA or checkpoints.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .adapt import adapt_to_data, build_stream, set_bucket_step
from .conditioning import Conditioning
from .config import TrainConfig
from .distributed import DistInfo
from .finetune_setup import FinetuneSetup, with_prior_images
from .seeds import subseed
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


@runtime_checkable
class ConditioningPart(Protocol):
    """Batch -> network inputs: (latent) images and the ``cond`` dict (class labels, text)."""

    vae: Any  # the frozen autoencoder of a latent run (None in pixel space)
    grid_prompts: list[str] | None

    def inputs(
        self, batch: dict[str, Any], gen: torch.Generator, B: int, rows: slice,
        null_label: int | None,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...  # fmt: skip

    def validation_inputs(
        self, images: Tensor, items: list[dict[str, Any]]
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def prompt_encoder(self, net: nn.Module) -> Any: ...

    def write(self, run_dir: Path) -> None: ...

    def check_resume(self, run_dir: Path) -> None: ...


@runtime_checkable
class FinetunePart(Protocol):
    """The fine-tuning set-up: what it publishes at each checkpoint (nothing when off)."""

    def save(self, ema_model: nn.Module, run_dir: Path, step: int) -> None: ...


@runtime_checkable
class HooksPart(Protocol):
    """What the loop calls to look at the run: grids, validation, periodic evaluation."""

    def grids(
        self, step: int, model: nn.Module, ema_model: nn.Module, null_label: int | None
    ) -> list[Path]: ...

    def validation(
        self, step: int, model: nn.Module, ema_model: nn.Module, null_label: int | None
    ) -> dict[str, Any]: ...

    def periodic_eval(self, step: int, ema_model: nn.Module) -> dict[str, Any]: ...


@runtime_checkable
class StepTask(Protocol):
    """What :func:`difflab.train.loop.run_steps` drives: one optimiser step at a time.

    ``train_step`` advances ``step`` and returns the step's record; ``after_step`` runs the
    task's logging and hooks and returns the (possibly earlier) last step; ``save`` writes a
    checkpoint; ``stopping`` says whether a stop signal arrived (on any rank).
    """

    step: int
    run_dir: Path

    def train_step(self) -> dict[str, Any]: ...

    def after_step(self, record: dict[str, Any], last: int) -> int: ...

    def save(self) -> None: ...

    def stopping(self, stop: list[int]) -> bool: ...


@dataclass
class TrainParts:
    """What :func:`build_parts` built: the batch stream, the held-out data, the
    conditioning and fine-tuning parts, the network, and the data generator in use."""

    stream: BatchStream
    val_set: Any
    conditioning: Conditioning
    finetune: FinetuneSetup
    model: nn.Module
    data_gen: torch.Generator


def build_parts(
    cfg: TrainConfig, given: TrainConfig, info: DistInfo, run_dir: Path, *,
    dataset: Any = None, model: nn.Module | None = None, data_gen: torch.Generator,
) -> TrainParts:  # fmt: skip
    """Build a run's parts from its resolved config ``cfg`` (``given``: as the caller gave
    it, to tell which model keys were set).  See the module docstring for the order."""
    set_bucket_step(cfg)  # data.buckets: sides in multiples the network takes
    report = None  # printed once the captions' token counts are known
    if dataset is None:
        from ..data import build_dataset

        dataset, report = build_dataset(cfg.data, generator=data_gen)
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
        data_gen = gen if isinstance(gen, torch.Generator) else data_gen
    dataset = with_prior_images(cfg, dataset, info, run_dir)
    # Held-out validation data: the same split on every rank and after a resume.
    dataset, val_set = split_dataset(dataset, cfg.train.val_fraction, subseed(cfg.seed, 50))
    if val_set is not None and info.is_main:
        print(f"validation: {len(val_set)} held-out samples, {len(dataset)} for training")
    notes = adapt_to_data(
        cfg, dataset, num_classes_given=model is not None or "num_classes" in given.model,
        world_size=info.data_world,
    )  # fmt: skip
    stream = build_stream(
        cfg, dataset, rank=info.data_rank, world_size=info.data_world,
        mix_seed=subseed(cfg.seed, 60), generator=data_gen,
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
    return TrainParts(stream, val_set, conditioning, finetune, net, data_gen)


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
