"""The diffusion loss of one micro-batch: the part the trainer's core step calls.

Owns :class:`DiffusionLoss`, built by :func:`difflab.train.parts.build_parts` and handed to
:class:`difflab.train.loop.Trainer`:

* :meth:`~DiffusionLoss.draw`: this rank's inputs of one micro-batch — the (latent) images
  and ``cond`` from the conditioning part, timesteps (uniform, importance-sampled, or the
  formulation's levels) and noise, drawn for the whole *global* batch from the shared
  generator so that N ranks compute what one process does; DreamBooth's prior rows weigh
  ``finetune.prior_weight`` (Ruiz et al. 2023, eq. 2);
* :meth:`~DiffusionLoss.loss`: the importance-weighted loss of the micro-batch
  (:func:`difflab.losses.training_loss`, or the edm / flow formulation's own loss);
* :meth:`~DiffusionLoss.observe` and :meth:`~DiffusionLoss.step_record`: the importance
  sampler's update (every rank's losses, in global-batch order) and the instance / prior
  (or main / mix) split of the step's loss.

Knows nothing of optimisers, EMA, checkpoints or the loop; the trainer saves
:meth:`~DiffusionLoss.state_dict` (the importance sampler's) in its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..formulations import Formulation
from ..losses import LossSecondMomentSampler, training_loss
from ..models.contract import DenoiserNet
from ..schedules import NoiseSchedule
from .amp import Precision
from .config import TrainConfig
from .distributed import DistInfo, all_gather_objects
from .protocols import ConditioningPart
from .seeds import subseed

__all__ = ["DiffusionLoss", "MicroBatch"]


@dataclass
class MicroBatch:
    """One micro-batch's network inputs and draws (this rank's rows of the global batch)."""

    x0: Tensor
    cond: dict[str, Tensor]
    t: Tensor
    noise: Tensor
    importance: Tensor | None
    prior: Tensor | None = None  # DreamBooth: which rows are prior-preservation images
    mix: Tensor | None = None  # data.mix: which rows come from the general data set
    rng: dict[str, Tensor] = field(default_factory=dict)  # the trainer's per-rank RNG
    # states before its forward (set by the trainer, to re-run it for diagnosis)


class DiffusionLoss:
    """The diffusion task's loss of one micro-batch (see the module docstring).

    :param config: the resolved run config (``diffusion``, ``train.batch_size``,
        ``finetune.prior_weight``, ``data.mix``).
    :param conditioning: batch -> (latent) images and ``cond``.
    :param schedule: the noise schedule (the formulation's table for edm / flow).
    :param formulation: ``diffusion.formulation`` (None: ddpm's ``training_loss``).
    :param precision: the autocast the network runs under.
    :param info: this process's rank and device.
    :param shared: the generator every rank shares (condition dropout, timesteps, noise).
    :param aux: this rank's generator (offset noise, input perturbation).
    :param null_label: the network's null class label (None: none).
    """

    def __init__(
        self, config: TrainConfig, conditioning: ConditioningPart, schedule: NoiseSchedule,
        formulation: Formulation | None, precision: Precision, info: DistInfo, *,
        shared: torch.Generator, aux: torch.Generator, null_label: int | None,
    ) -> None:  # fmt: skip
        self.cfg = config
        self.conditioning = conditioning
        self.schedule = schedule
        self.formulation = formulation
        self.precision = precision
        self.dist = info
        self.gen, self.aux_gen = shared, aux
        self.null_label = null_label
        self.timestep_sampler: LossSecondMomentSampler | None = None
        if config.diffusion.timestep_sampler == "importance":
            T = schedule.num_timesteps
            self.timestep_sampler = LossSecondMomentSampler(T, subseed(config.seed, 3))
        split = config.finetune.prior_condition is not None or config.data.mix is not None
        self._split: Tensor | None = torch.zeros(4) if split else None  # sums and counts

    def draw(self, batch: dict[str, Any]) -> MicroBatch:
        """This rank's inputs, from draws over the whole global batch (same as 1 process)."""
        B, dev = self.cfg.train.batch_size, self.dist.device
        b = B // self.dist.data_world  # a TP group's ranks share their rows
        rows = slice(self.dist.data_rank * b, (self.dist.data_rank + 1) * b)
        x0, cond = self.conditioning.inputs(batch, self.gen, B, rows, self.null_label)
        importance = None
        if self.timestep_sampler is not None:
            t, w = self.timestep_sampler.sample(B)
            t, importance = t[rows].to(dev), w[rows].to(dev)
        elif self.formulation is not None:  # EDM's σ or flow's t, float [B]
            t = self.formulation.draw_levels(B, self.gen)[rows].to(dev)
        else:
            t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=self.gen)
            t = t[rows].to(dev)
        noise = torch.randn((B, *x0.shape[1:]), generator=self.gen)[rows].to(dev)
        prior = batch.get("prior")
        if prior is not None:  # DreamBooth eq. 2: prior samples weigh prior_weight
            prior = torch.as_tensor(prior, device=dev).bool()
            weight = torch.where(prior, self.cfg.finetune.prior_weight, 1.0)
            importance = weight if importance is None else importance * weight
        mix = batch["mix"].to(dev) if "mix" in batch else None
        return MicroBatch(x0, cond, t, noise, importance, prior, mix)

    def loss(self, model: DenoiserNet, mb: MicroBatch) -> tuple[Tensor, Tensor]:
        """Scalar loss (importance-weighted mean) and per-sample losses of one micro-batch."""
        if self.formulation is not None:  # edm / flow: the formulation's loss at its levels
            with self.precision.autocast():
                f = self.formulation.training_loss(model, mb.x0, mb.t, mb.noise, mb.cond)
            weight = 1.0 if mb.importance is None else mb.importance
            return (f.per_sample * weight).mean(), f.per_sample
        d = self.cfg.diffusion
        with self.precision.autocast():
            out = training_loss(
                model,
                self.schedule,
                mb.x0,
                prediction=d.prediction,
                variance=d.variance,
                weighting=d.weighting,
                snr_gamma=d.snr_gamma,
                vlb_weight=d.vlb_weight,
                cond=mb.cond,
                t=mb.t,
                noise=mb.noise,
                offset_noise=d.offset_noise,
                input_perturbation=d.input_perturbation,
                generator=self.aux_gen,
            )
        if mb.importance is None:
            return out.loss, out.per_sample
        return (out.per_sample * mb.importance).mean(), out.per_sample

    def observe(self, mb: MicroBatch, per_sample: Tensor) -> None:
        """After a micro-batch's backward: feed the importance sampler every rank's losses
        (global-batch order) and add to the instance / prior (main / mix) sums."""
        if self.timestep_sampler is not None:
            pairs = all_gather_objects((mb.t.cpu(), per_sample.detach().float().cpu()), self.dist)
            pairs = pairs[:: self.dist.tensor_parallel]  # one copy per TP group
            self.timestep_sampler.update(
                torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
            )
        split = mb.prior if mb.prior is not None else mb.mix
        if self._split is not None and split is not None:
            ps = per_sample.detach().float()
            prior = split.float()
            self._split += torch.stack([(ps * (1 - prior)).sum(), (1 - prior).sum(),
                                        (ps * prior).sum(), prior.sum()]).cpu()  # fmt: skip

    def step_record(self) -> dict[str, float | None]:
        """The step's split losses (``loss_instance`` / ``loss_prior``, or ``loss_main`` /
        ``loss_mix``; every rank's rows) and a fresh start for the next step; {} when the
        run has no split."""
        if self._split is None:
            return {}
        sums, self._split = self._split, torch.zeros(4)
        if self.dist.distributed:
            sums = sums.to(self.dist.device)
            dist.all_reduce(sums)
        inst_sum, inst_n, prior_sum, prior_n = sums.tolist()
        names = ("loss_main", "loss_mix") if self.cfg.data.mix else ("loss_instance", "loss_prior")
        return {
            names[0]: inst_sum / inst_n if inst_n else None,
            names[1]: prior_sum / prior_n if prior_n else None,
        }

    def state_dict(self) -> dict[str, Any] | None:
        """The importance sampler's state for the checkpoint (None: uniform timesteps)."""
        ts = self.timestep_sampler
        return ts.state_dict() if ts is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what :meth:`state_dict` saved."""
        if self.timestep_sampler is not None and state is not None:
            self.timestep_sampler.load_state_dict(state)
