"""Validation loss: a held-out split of the data, scored the same way at every evaluation.

Owns the train / validation split (a permutation drawn from the run seed, identical on every
rank and after a resume) and the validation loss: the run's own training objective
(``difflab.losses.training_loss``: its parametrisation, weighting and, for learned
variances, the hybrid VLB term) on the held-out images at ``val_timesteps`` evenly spaced
timesteps, with noise from a generator seeded afresh each time — so two evaluations differ
only because the weights did.  edm / flow runs (``difflab.formulations``) are scored by their
formulation's own loss and weight at ``val_timesteps`` fixed levels, the mid-quantiles of
their training level distribution (EDM's log-normal σ, flow's uniform / logit-normal / mode
t: ``Formulation.validation_levels``).  Offset noise and input perturbation are training-time
augmentations and are left out.  Class-conditional models see the true labels and
text-conditional ones the true captions (no condition dropout); a ``prepare`` hook from the
trainer turns items into model inputs (autoencoder latents, caption tokens).  Knows nothing
of the optimiser or of checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..formulations import Formulation, FormulationSchedule
from ..losses import training_loss
from ..schedules import NoiseSchedule

__all__ = ["split_dataset", "validation_loss", "validation_timesteps"]


def split_dataset(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Subset | None]:
    """``(train, validation)``: ``round(fraction·N)`` (at least 1) held-out samples.

    Indices come from ``randperm(N)`` with a generator seeded by ``seed``; both parts keep
    ascending index order.  ``fraction == 0`` returns the data set itself and None.
    """
    if fraction == 0:
        return dataset, None
    n = len(dataset)  # type: ignore[arg-type]
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"train.val_fraction={fraction} leaves no training data ({n} samples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val = sorted(perm[:n_val].tolist())
    train = sorted(perm[n_val:].tolist())
    return Subset(dataset, train), Subset(dataset, val)


def _item(val_set: Dataset, i: int, seed: int) -> dict[str, Any]:
    """Item ``i`` with any random flip drawn from a generator fixed by ``(seed, i)``.

    The data sets of ``difflab.data`` draw flips from their ``generator`` attribute; it is
    swapped for the call, so validation sees the same images every time and never advances
    the training data's generator.
    """
    base = val_set.dataset if isinstance(val_set, Subset) else val_set
    saved = getattr(base, "generator", None)
    if not isinstance(saved, torch.Generator):
        return val_set[i]
    base.generator = torch.Generator().manual_seed(seed * 1_000_003 + i)  # type: ignore[attr-defined]
    try:
        return val_set[i]
    finally:
        base.generator = saved  # type: ignore[attr-defined]


def validation_timesteps(T: int, k: int) -> list[int]:
    """``k`` evenly spaced integer timesteps from 0 to T-1 (distinct, ascending).

    ``round(i·(T-1)/(k-1))`` for i = 0..k-1; ``k == 1`` gives the middle step T//2 and
    ``k >= T`` every timestep once.
    """
    if k == 1:
        return [T // 2]
    return sorted({round(i * (T - 1) / (k - 1)) for i in range(k)})


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    val_set: Dataset,
    schedule: NoiseSchedule,
    diffusion: Any,
    *,
    timesteps: int,
    seed: int,
    batch_size: int,
    null_label: int | None = None,
    device: torch.device | str = "cpu",
    prepare: Callable[[Tensor, list[dict[str, Any]]], tuple[Tensor, dict[str, Tensor]]]
    | None = None,
    formulation: Formulation | None = None,
) -> float:
    """Mean training objective of ``model`` over ``val_set`` × the validation timesteps.

    :param diffusion: the run's ``DiffusionConfig`` (prediction, variance, weighting, ...);
        unused for edm / flow.
    :param timesteps: how many timesteps (ddpm) or fixed noise levels (edm / flow).
    :param formulation: the run's edm / flow formulation; default: the one whose sampling
        table ``schedule`` is (``FormulationSchedule``), else None (ddpm).
    :param seed: seeds the noise; the same seed gives the same noise at every call.
    :param null_label: the model's null class label when it is class-conditional (samples
        without a label are scored through it).
    :param prepare: ``(images, items) -> (x0, extra cond)``: what the model is trained on
        (e.g. scaled latents, caption tokens); must be deterministic.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    if formulation is None and isinstance(schedule, FormulationSchedule):
        formulation = schedule.formulation
    if formulation is None:
        levels = [float(t) for t in validation_timesteps(schedule.num_timesteps, timesteps)]
    else:
        levels = formulation.validation_levels(timesteps).tolist()
    total, count = 0.0, 0
    try:
        n = len(val_set)  # type: ignore[arg-type]
        for start in range(0, n, batch_size):
            items = [_item(val_set, i, seed) for i in range(start, min(start + batch_size, n))]
            x0 = torch.stack([it["image"] for it in items]).to(device).float()
            cond: dict[str, Tensor] = {}
            if null_label is not None:
                labels = [it.get("class_label", null_label) for it in items]
                cond["class_labels"] = torch.tensor(labels, dtype=torch.long, device=device)
            if prepare is not None:
                x0, extra = prepare(x0, items)
                cond.update(extra)
            for level in levels:
                noise = torch.randn(x0.shape, generator=gen).to(device)
                if formulation is not None:  # EDM's σ or flow's t, the formulation's loss
                    at = torch.full((len(x0),), level, device=device)
                    per_sample = formulation.training_loss(model, x0, at, noise, cond).per_sample
                else:
                    t = torch.full((len(x0),), int(level), dtype=torch.long, device=device)
                    per_sample = training_loss(
                        model,
                        schedule,
                        x0,
                        prediction=diffusion.prediction,
                        variance=diffusion.variance,
                        weighting=diffusion.weighting,
                        snr_gamma=diffusion.snr_gamma,
                        vlb_weight=diffusion.vlb_weight,
                        cond=cond,
                        t=t,
                        noise=noise,
                    ).per_sample
                total += float(per_sample.double().sum())
                count += len(x0)
    finally:
        model.train(was_training)
    return total / count
