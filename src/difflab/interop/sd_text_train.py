"""SDXL's prompt side as a training run's text encoder (``text.encoder: sdxl``), so that
``difflab finetune`` trains adapters on an imported SDXL model.

Owns :class:`SDXLTrainingText` and :func:`training_text_encoder`, the trainer's one door to
a frozen pretrained text encoder of any kind. The encoding itself is
:class:`~difflab.interop.text.SDTextEncoder`'s and the ``vector`` is
:class:`~difflab.interop.sd.SDConditioner`'s: the two encoders' penultimate layers
concatenated as ``context`` and the pooled embedding of the second followed by the
embeddings of the size / crop ids (Podell et al. 2023 sec. 2.1-2.2), as diffusers'
``StableDiffusionXLPipeline`` builds ``add_time_ids`` = original size + crop top-left +
target size. Training images are resized to the run's ``data.image_size`` and not cropped,
so the ids are ``(S, S, 0, 0, S, S)``. Knows nothing of the training loop.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["SDXLTrainingText", "sdxl_time_embed_dim", "training_text_encoder"]

TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)


def sdxl_time_embed_dim(vector_dim: int, pooled_width: int, where: str = "the U-Net") -> int:
    """The width of each size-id embedding: ``(vector_dim - pooled_width) / 6``.

    :raises ValueError: a ``vector_dim`` that is not the pooled width plus six embeddings.
    """
    extra = int(vector_dim) - int(pooled_width)
    if extra <= 0 or extra % TIME_IDS:
        raise ValueError(
            f"{where} takes a vector of {vector_dim}, which is not SDXL's pooled embedding "
            f"({pooled_width}) plus {TIME_IDS} equal size-id embeddings"
        )
    return extra // TIME_IDS


class SDXLTrainingText:
    """SDXL's two CLIP text encoders behind the trainer's frozen-encoder contract.

    ``encoder(prompts) -> (context [B, 77, D1 + D2], mask [B, 77])`` (all True: SDXL attends
    to the padding), and :meth:`keywords` gives the whole keyword conditioning of a training
    step (``context``, ``context_mask`` and ``vector [B, vector_dim]``). :meth:`conditioning`
    is the ``Pipeline``'s hook, so sampling from the run follows diffusers' SDXL pipeline.

    :param path: a folder with ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/`` and
        ``tokenizer_2/`` (a diffusers SDXL folder, or what ``import_stable_diffusion`` writes).
    :param image_size: the training images' side in pixels (the size ids).
    :param vector_dim: the U-Net's ``vector_dim`` (pooled width + 6 size-id embeddings).
    """

    kind = "sdxl"
    mask_padding = False

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str | None = None,
        *,
        image_size: int,
        vector_dim: int,
    ) -> None:
        from .sd import SDConditioner
        from .text import SDTextEncoder

        encoder = SDTextEncoder.from_diffusers(path, "sdxl")
        if len(encoder.models) != 2:
            raise ValueError(
                f"{path} holds only text_encoder_2/ (an SDXL refiner); fine-tuning needs SDXL "
                "base's two text encoders"
            )
        tdim = sdxl_time_embed_dim(vector_dim, int(encoder.pooled_width or 0), f"{path}'s U-Net")
        self.encoder = encoder.to(device or "cpu")
        self.conditioner = SDConditioner(encoder, "sdxl", time_embed_dim=tdim)
        self.path = str(path)
        self.size = (int(image_size), int(image_size))
        self.max_length = encoder.max_length
        self.tokenizer = encoder.tokenizers[0]  # the trainer counts cut captions with it
        self.model = encoder.models[0]
        self.words: dict[int, Tensor] = {}  # no textual inversion on SDXL (see add_word)

    @property
    def width(self) -> int:
        return self.encoder.width

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(context [B, 77, D], mask [B, 77])`` of ``prompts``, without gradients."""
        context = self.keywords(prompts)["context"]
        return context, torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)

    def keywords(self, prompts: Sequence[str], *, grad: bool = False) -> dict[str, Tensor]:
        """The U-Net's keyword conditioning of ``prompts`` at the training size (``grad``:
        with autograd on, for adapters on the text encoders)."""
        with contextlib.nullcontext() if grad else torch.no_grad():
            encoded = self.encoder(list(prompts), grad=grad)
            out = self.conditioner._kwargs(encoded, self.size)
        context = out["context"]
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        return {**out, "context_mask": mask}  # (B, 77, D), (B, 77), vector (B, V)

    def conditioning(
        self, prompts: list[str], negatives: list[str] | None, *, size: tuple[int, int]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(cond, uncond)`` as diffusers' SDXL pipeline builds them (``Pipeline``'s hook)."""
        return self.conditioner.conditioning(prompts, negatives, size=size)

    def with_models(self, models: Sequence[Any]) -> SDXLTrainingText:
        """This encoder reading other copies of its two text models, e.g. a network's
        adapted ones (``finetune.text_encoder``)."""
        from .sd import SDConditioner

        other = copy.copy(self)
        other.encoder = self.encoder.with_models(models)
        other.conditioner = SDConditioner(
            other.encoder, "sdxl", time_embed_dim=self.conditioner.time_embed_dim
        )
        other.model = other.encoder.models[0]
        return other

    def word_embedding(self, word: str) -> Tensor:
        raise ValueError(_NO_INVERSION)

    def add_word(self, word: str, vector: Tensor) -> int:
        raise ValueError(_NO_INVERSION)


_NO_INVERSION = (
    "textual inversion (finetune.new_word) is not supported on SDXL runs: it would need one "
    "word vector per text encoder; train an adapter instead"
)


def training_text_encoder(
    text: Any, device: torch.device | str | None, *, image_size: int, vector_dim: int | None
) -> Any:
    """The frozen encoder of a run's ``text`` section (``TextConfig`` with a pretrained
    ``encoder``): :class:`SDXLTrainingText` for ``sdxl``, else ``PretrainedTextEncoder``."""
    if text.encoder == "sdxl":
        if vector_dim is None:
            raise ValueError(
                "text.encoder: sdxl needs a U-Net with model.vector_dim (SDXL's pooled "
                "embedding and size ids)"
            )
        return SDXLTrainingText(text.path, device, image_size=image_size, vector_dim=vector_dim)
    from ..models.text import PretrainedTextEncoder

    return PretrainedTextEncoder(
        str(text.path), text.max_length, device, kind=text.encoder,
        mask_padding=text.mask_padding,
    )  # fmt: skip
