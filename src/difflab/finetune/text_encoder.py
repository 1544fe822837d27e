"""Adapters on a Stable Diffusion run's CLIP text encoder(s) (``finetune.text_encoder``), as
kohya's ``train_network.py`` trains them beside the U-Net's.

Owns which text-model layers are adapted (:data:`TEXT_TARGETS`: every CLIP layer's attention
projections ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` and MLP ``fc1``, ``fc2``; both
encoders of SDXL), and where the adapted text models live: in the network itself, as the
``nn.ModuleList`` attribute :data:`TEXT_ENCODERS` of the U-Net, so that the optimiser, the
EMA copy, the checkpoints and ``lora.safetensors`` hold them with the U-Net's adapters (the
U-Net's ``forward`` never reads it; the trainer encodes prompts with the network's text
models, :func:`encoder_for`).  The adapters are difflab's own (:func:`~difflab.finetune.add_lora`:
LoRA, LoHa, LoKr); the kohya names are :mod:`~difflab.finetune.lycoris`'.  Knows nothing of
the training loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .lora import add_lora

__all__ = [
    "TEXT_ENCODERS",
    "TEXT_TARGETS",
    "add_text_adapters",
    "detach_text_encoders",
    "encoder_for",
    "text_encoders_of",
    "text_models",
]

TEXT_ENCODERS = "text_encoders"  # the network's attribute holding the adapted text models
# kohya's CLIPAttention + CLIPMLP targets (module-name patterns over a transformers CLIP).
TEXT_TARGETS = [
    "*.self_attn.q_proj",
    "*.self_attn.k_proj",
    "*.self_attn.v_proj",
    "*.self_attn.out_proj",
    "*.mlp.fc1",
    "*.mlp.fc2",
]
LR_ATTR = "difflab_lr"  # a parameter's own learning rate (difflab.train.optim)


def text_models(encoder: Any) -> list[nn.Module]:
    """The transformers text model(s) behind a trainer's frozen encoder: CLIP's one
    (``PretrainedTextEncoder``), SDXL's two (``SDXLTrainingText``)."""
    inner = getattr(encoder, "encoder", None)  # SDXLTrainingText -> SDTextEncoder
    if inner is not None and hasattr(inner, "models"):
        return list(inner.models)
    return [encoder.model]


def add_text_adapters(
    net: nn.Module,
    encoder: Any,
    rank: int,
    alpha: float | None = None,
    *,
    kind: str = "lora",
    rslora: bool = False,
    dora: bool = False,
    factor: int = -1,
    lr: float | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Wrap :data:`TEXT_TARGETS` of ``encoder``'s text model(s) in adapters of ``kind`` (the
    rest of each text model frozen) and attach the models to ``net`` as :data:`TEXT_ENCODERS`.

    The encoder keeps using the same model objects, so it encodes with the adapters.
    :param lr: the adapters' own learning rate (``finetune.text_encoder_lr``); None: the run's.
    :return: the wrapped module names, ``"<i>.<module>"`` with ``i`` the text model's index.
    :raises ValueError: ``net`` has text models attached already, or no layer matches.
    """
    if hasattr(net, TEXT_ENCODERS):
        raise ValueError(f"{type(net).__name__} already has adapted text encoders")
    models = text_models(encoder)
    names = []
    for i, model in enumerate(models):
        wrapped = add_lora(
            model, rank, alpha, TEXT_TARGETS, kind=kind, rslora=rslora, dora=dora,
            factor=factor, generator=generator,
        )  # fmt: skip
        names += [f"{i}.{name}" for name in wrapped]
        if lr is not None:
            for p in model.parameters():
                if p.requires_grad:
                    setattr(p, LR_ATTR, float(lr))
    net.add_module(TEXT_ENCODERS, nn.ModuleList(models))
    return names


def text_encoders_of(net: nn.Module) -> list[nn.Module] | None:
    """The adapted text models attached to ``net`` (None when its text encoder is frozen)."""
    models = getattr(net, TEXT_ENCODERS, None)
    return None if models is None else list(models)


def detach_text_encoders(net: nn.Module) -> list[nn.Module]:
    """Take the adapted text models off ``net`` (in place) and return them; ``[]`` if none."""
    models = text_encoders_of(net)
    if models is None:
        return []
    delattr(net, TEXT_ENCODERS)
    return models


def encoder_for(net: nn.Module, encoder: Any) -> Any:
    """``encoder`` reading ``net``'s adapted text models (e.g. the EMA copy's), or
    ``encoder`` itself when ``net`` has none."""
    models = text_encoders_of(net)
    if models is None:
        return encoder
    return encoder.with_models(models)
