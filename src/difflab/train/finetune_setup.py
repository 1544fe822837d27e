"""Fine-tuning a trained run: the trainer's fine-tuning part (``finetune`` config section).

Owns :class:`FinetuneSetup`, built by the trainer from the config and handed to the loop:
loading the base run's weights, LoRA / LoHa / LoKr adapters (rsLoRA, DoRA) around its target
layers, textual inversion (a new trainable token row of a trained text encoder, or a word
vector beside a frozen CLIP / T5), DreamBooth's prior-preservation data
(:func:`with_prior_images`), and the files a fine-tuning run publishes at each checkpoint
(``lora.safetensors``, the word's embedding), and ``finetune.text_encoder``'s adapters on
the CLIP text encoder(s) (:mod:`difflab.finetune.text_encoder`).  Without
``finetune.base_run`` every method does nothing.  The adapters themselves live in
:mod:`difflab.finetune`; this module knows nothing of the optimiser or the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..finetune.inversion import WORD_PARAM
from ..finetune.lora import LORA_FILE
from ..models.text import TextConditionedUNet
from .config import TrainConfig
from .distributed import DistInfo
from .seeds import subseed

__all__ = ["FinetuneSetup", "with_prior_images", "word_weight"]


def _word_parameter(model: nn.Module) -> nn.Parameter:
    """What a textual-inversion run trains: the U-Net's ``ti_word`` (frozen CLIP/T5), else
    the text encoder's token table (its last row, through a gradient mask)."""
    if hasattr(model, WORD_PARAM):
        return getattr(model, WORD_PARAM)
    return model.text.token.weight  # type: ignore[union-attr,return-value]


def word_weight(model: nn.Module) -> Tensor:
    """The trained vector of a textual-inversion run's new word."""
    param = _word_parameter(model)
    return param if hasattr(model, WORD_PARAM) else param[-1]


def with_prior_images(config: TrainConfig, dataset: Any, info: DistInfo, run_dir: Path) -> Any:
    """DreamBooth: the instance data mixed with the base run's prior images (rank 0 draws
    them, the other ranks read them once written); ``dataset`` itself without
    ``finetune.prior_condition``."""
    ft = config.finetune
    if ft.prior_condition is None:
        return dataset
    import torch.distributed as dist

    from ..prior import PriorMixture, prior_images

    assert ft.base_run is not None  # config: prior_condition needs base_run
    args = (ft.base_run, ft.prior_condition, ft.prior_images, run_dir / "prior")
    if info.is_main:
        images = prior_images(*args, seed=config.seed)
    if info.distributed:
        dist.barrier()
    if not info.is_main:
        images = prior_images(*args, seed=config.seed)
    return PriorMixture(dataset, images, ft.prior_condition)


class FinetuneSetup:
    """The ``finetune`` section applied to a freshly built network, and its output files.

    :param config: the resolved run config.
    :param is_main: whether this rank prints and writes files.
    """

    def __init__(self, config: TrainConfig, *, is_main: bool = True) -> None:
        self.cfg = config
        self.ft = config.finetune
        self.is_main = is_main

    @property
    def enabled(self) -> bool:
        """Whether this run fine-tunes a base run."""
        return self.ft.base_run is not None

    def adapt(self, model: nn.Module, conditioning: Any) -> None:
        """Load the base run's weights into ``model`` and wrap its target layers in LoRA /
        LoHa / LoKr adapters; only the adapters (and a new word) train.  A textual-inversion
        run over a trained text encoder gets its grown tokenizer set on ``conditioning``."""
        if not self.enabled:
            return
        from ..finetune import add_lora
        from ..runs import WEIGHTS, load_weights

        ft = self.ft
        load_weights(model, Path(str(ft.base_run)) / WEIGHTS[ft.weights])
        what = []
        frozen_text = conditioning.frozen_text
        if ft.new_word is not None and frozen_text is not None:
            # textual inversion through a frozen CLIP/T5: the word's vector is a parameter
            # of the U-Net that the encoder puts in place of the word's token embedding
            from ..finetune.inversion import attach_word_vector

            table = frozen_text.model.get_input_embeddings().weight
            init = frozen_text.word_embedding(ft.init_word) if ft.init_word else table.mean(0)
            model.requires_grad_(False)
            attach_word_vector(model, init)
            what.append(f"the new word {ft.new_word!r}")
        elif ft.new_word is not None:  # textual inversion: one new, trainable token row
            from ..finetune.inversion import add_word

            if not isinstance(model, TextConditionedUNet) or conditioning.tokenizer is None:
                raise ValueError(
                    "finetune.new_word needs a base run with a text encoder "
                    "(text.encoder: transformer, clip or t5)"
                )
            conditioning.tokenizer, _ = add_word(
                model, conditioning.tokenizer, ft.new_word, ft.init_word
            )
            what.append(f"the new word {ft.new_word!r}")
        if ft.targets != "none":
            gen = torch.Generator().manual_seed(subseed(self.cfg.seed, 5))
            names = add_lora(
                model, ft.rank, ft.alpha, ft.targets, kind=ft.adapter, rslora=ft.rslora,
                dora=ft.dora, factor=ft.lokr_factor, generator=gen,
            )  # fmt: skip
            if ft.new_word is not None:  # add_lora froze the rest, the new word included
                _word_parameter(model).requires_grad_(True)
            what.append(f"{self._label()} rank {ft.rank} on {len(names)} layers")
        if ft.text_encoder:
            what.append(self._adapt_text(model, conditioning))
        if self.is_main:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if ft.new_word is not None and frozen_text is None:  # a one-row mask
                assert isinstance(model, TextConditionedUNet)  # a text run's word lives here
                table = model.text.token.weight
                trainable -= table.numel() - table.shape[1]
            total = sum(p.numel() for p in model.parameters())
            print(
                f"fine-tuning {ft.base_run}: {' and '.join(what)}; "
                f"{trainable:,} of {total:,} parameters train"
            )

    def _label(self) -> str:
        ft = self.ft
        return {"lora": "DoRA" if ft.dora else "LoRA", "loha": "LoHa", "lokr": "LoKr"}[ft.adapter]

    def _adapt_text(self, model: nn.Module, conditioning: Any) -> str:
        """``finetune.text_encoder``: adapters on the frozen CLIP encoder(s), attached to
        ``model`` (:mod:`difflab.finetune.text_encoder`); what was done, for the report."""
        from ..finetune.text_encoder import add_text_adapters

        ft, text = self.ft, self.cfg.text
        if conditioning.frozen_text is None or text.encoder not in ("clip", "sdxl"):
            raise ValueError(
                f"finetune.text_encoder adapts a CLIP text encoder (text.encoder: clip or "
                f"sdxl); this run has text.encoder: {text.encoder}"
            )
        if self.cfg.train.parallel == "fsdp":
            raise ValueError(
                "finetune.text_encoder trains the text models outside the U-Net's forward, "
                "which train.parallel: fsdp does not shard; use train.parallel: ddp"
            )
        if ft.targets == "none" and ft.new_word is None:  # the text encoder alone trains
            model.requires_grad_(False)
        gen = torch.Generator().manual_seed(subseed(self.cfg.seed, 6))
        names = add_text_adapters(
            model, conditioning.frozen_text, ft.rank, ft.alpha, kind=ft.adapter,
            rslora=ft.rslora, dora=ft.dora, factor=ft.lokr_factor, lr=ft.text_encoder_lr,
            generator=gen,
        )  # fmt: skip
        n = len(model.text_encoders)  # type: ignore[arg-type]
        return f"{self._label()} rank {ft.rank} on {len(names)} layers of {n} text encoder(s)"

    def attach_word(self, model: nn.Module, conditioning: Any) -> None:
        """Textual inversion through a frozen CLIP / T5: the encoder puts the network's word
        vector in place of the new word's token embedding."""
        if conditioning.frozen_text is not None and hasattr(model, WORD_PARAM):
            conditioning.frozen_text.add_word(str(self.ft.new_word), getattr(model, WORD_PARAM))

    def save(self, ema_model: nn.Module, run_dir: Path, step: int) -> None:
        """Publish the fine-tuned parts of the EMA weights: ``lora.safetensors`` and the new
        word's embedding file (rank 0, at each checkpoint)."""
        if not self.enabled:
            return
        from ..finetune import save_lora

        ft = self.ft
        meta = {"base_run": str(ft.base_run), "step": str(step), "weights": "ema"}
        if ft.targets != "none" or ft.text_encoder:
            save_lora(ema_model, run_dir / LORA_FILE, metadata=meta)
        if ft.new_word is not None:
            from ..finetune.inversion import EMBEDDING_FILE, save_word_vector

            meta["init_word"] = str(ft.init_word)
            save_word_vector(
                ft.new_word, word_weight(ema_model), run_dir / EMBEDDING_FILE, meta,
            )  # fmt: skip
