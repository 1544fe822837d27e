"""What a run looks at while it trains: the trainer's hooks part.

Owns :class:`TrainHooks`, built by the trainer from the config and called by the loop:

* sample grids of the raw and EMA weights every ``train.sample_every`` steps
  (:func:`difflab.train.monitor.sample_grid`);
* the validation loss of the raw and EMA weights on held-out data (``train.val_every``;
  :mod:`difflab.train.validation`);
* periodic evaluation of EMA samples (``train.eval_every``; :mod:`difflab.eval`, imported
  when first used, with the pipeline).

Everything runs on rank 0 (other ranks get empty results), inside a forked RNG so that
looking never changes the training run.  The hooks return their records; the loop logs them.
Knows nothing of optimisers or checkpoints.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formulations import Formulation
from ..schedules import NoiseSchedule
from .config import TrainConfig
from .monitor import sample_grid
from .protocols import ConditioningPart
from .seeds import subseed
from .validation import validation_loss

__all__ = ["TrainHooks"]


class TrainHooks:
    """Sample grids, validation loss and periodic evaluation of one run.

    :param config: the resolved run config.
    :param schedule: the run's noise schedule (the formulation's sampling table for edm/flow).
    :param formulation: the ``diffusion.formulation`` object (None: ddpm).
    :param conditioning: the run's :class:`~difflab.train.conditioning.Conditioning`
        (prompts, the prompt encoder, the autoencoder, validation inputs).
    :param val_set: the held-out data (None: no validation).
    :param device: where sampling and scoring run.
    :param run_dir: where grids are written.
    :param null_label: the network's null class label (None: none).
    :param is_main: rank 0 (the only rank that samples and scores).
    """

    def __init__(
        self, config: TrainConfig, schedule: NoiseSchedule, formulation: Formulation | None,
        conditioning: ConditioningPart, val_set: Any, device: torch.device, run_dir: Path, *,
        null_label: int | None = None, is_main: bool = True,
    ) -> None:  # fmt: skip
        self.cfg = config
        self.schedule = schedule
        self.formulation = formulation
        self.conditioning = conditioning
        self.val_set = val_set
        self.device = device
        self.run_dir = run_dir
        self.null_label = null_label
        self.is_main = is_main
        self._eval_extractor: Any = None  # built on the first periodic eval
        self._eval_prompts: tuple[list[str], bool] | None = None  # a text run's prompts

    def grids(self, step: int, model: nn.Module, ema_model: nn.Module) -> list[Path]:
        """Sample grids of the raw and the EMA weights (``samples/step_NNNNNN_{raw,ema}.png``)."""
        if not self.is_main:
            return []
        out = []
        for name, net in (("raw", model), ("ema", ema_model)):
            path = self.run_dir / "samples" / f"step_{step:06d}_{name}.png"
            out.append(
                sample_grid(
                    net,
                    self.cfg,
                    self.schedule,
                    path,
                    device=self.device,
                    null_label=self.null_label,
                    prompts=self.conditioning.grid_prompts,
                    text_encoder=self.conditioning.prompt_encoder(net),
                    vae=self.conditioning.vae,
                    formulation=self.formulation,
                )
            )
        return out

    def validation(self, step: int, model: nn.Module, ema_model: nn.Module) -> dict[str, Any]:
        """Validation loss of the raw and EMA weights (rank 0; ``{}`` elsewhere or without
        held-out data)."""
        if not self.is_main or self.val_set is None:
            return {}
        tc = self.cfg.train
        record: dict[str, Any] = {"step": step, "event": "validation"}
        with torch.random.fork_rng(devices=[]):
            for key, net in (("val_loss", model), ("val_loss_ema", ema_model)):
                record[key] = validation_loss(
                    net,
                    self.val_set,
                    self.schedule,
                    self.cfg.diffusion,
                    timesteps=tc.val_timesteps,
                    seed=subseed(self.cfg.seed, 51),
                    batch_size=tc.batch_size,
                    null_label=self.null_label,
                    device=self.device,
                    prepare=self.conditioning.validation_inputs,
                )
        return record

    def periodic_eval(self, step: int, ema_model: nn.Module) -> dict[str, Any]:
        """Score ``train.eval_n`` EMA samples (``difflab.eval.periodic_eval``).

        Rank 0 only; samples use the run's ``sample:`` defaults and the run seed, inside a
        forked RNG so evaluating never changes the training run.
        """
        if not self.is_main:
            return {}
        from ..eval.sweep import PromptedPipeline, periodic_eval, text_run_prompts
        from ..pipeline import Pipeline

        tc, mcfg = self.cfg.train, self.cfg.model_config()
        if self._eval_extractor is None and tc.eval_inception_weights is not None:
            from ..eval.features import InceptionV3Features

            self._eval_extractor = InceptionV3Features(
                tc.eval_inception_weights, device=self.device
            )
        net = ema_model
        was_training = net.training
        pipe: Pipeline | PromptedPipeline = Pipeline(
            net,
            self.schedule,
            prediction=self.cfg.diffusion.prediction,
            variance=self.cfg.diffusion.variance,
            image_shape=(mcfg.in_channels, mcfg.image_size, mcfg.image_size),
            num_classes=mcfg.num_classes,
            context_dim=mcfg.context_dim,
            sample_defaults=dataclasses.asdict(self.cfg.sample),
            text_encoder=self.conditioning.prompt_encoder(net),
            device=self.device,
            vae=self.conditioning.vae,  # latent runs are scored on decoded images
            formulation=self.formulation,
        )
        if self.cfg.text.enabled:  # classes drawn from their captions (text_run_prompts)
            if self._eval_prompts is None:
                self._eval_prompts = text_run_prompts(self.cfg.data)
            prompts, labelled = self._eval_prompts
            pipe = PromptedPipeline(pipe, prompts, labelled=labelled)
        try:
            with torch.random.fork_rng(devices=[]):
                scores = periodic_eval(
                    pipe,
                    [m.strip() for m in tc.eval_metrics.split(",")],
                    tc.eval_n,
                    seed=self.cfg.seed,
                    reference=self.cfg.data,
                    extractor=self._eval_extractor,
                )
        finally:
            net.train(was_training)
        record = {"step": step, "event": "eval"}
        record.update(
            {k: v for k, v in scores.items() if isinstance(v, (int, float, str)) and k != "step"}
        )
        return record
