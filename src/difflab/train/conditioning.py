"""What the network is conditioned on, and the space it denoises: the trainer's conditioning part.

Owns :class:`Conditioning`, built by the trainer from the config and handed to the loop:

* class labels and classifier-free-guidance condition dropout (the null label / the empty
  caption with probability ``diffusion.cond_drop_prob``);
* text: the word tokenizer of a text encoder trained with the U-Net (``text.encoder:
  transformer``; the base run's vocabulary when fine-tuning) or a frozen CLIP / T5
  (``text.encoder: clip | t5``), the captions' truncation count, the grid prompts, the
  prompt encoder that samples a network;
* latent diffusion: the frozen autoencoder (``latent.vae``) whose scaled latents the
  network denoises (posterior samples, or means for validation);
* ``train.encoder_cache``: content-addressed caches of the frozen encoders' outputs (SDXL's
  whole keyword conditioning included); none for a text encoder whose adapters train
  (``finetune.text_encoder``: its prompts are encoded with gradients at every step).

Randomness comes from the generator the loop passes (the global batch's draws, so N ranks
compute what one process does).  Knows nothing of optimisers, checkpoints or sampling.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..finetune.inversion import WORD_PARAM
from ..models.text import (
    TOKENIZER_FILE,
    PretrainedTextEncoder,
    PromptEncoder,
    TextConditionedUNet,
    TextTransformer,
    WordTokenizer,
    words,
)
from ..models.vae import AutoencoderKL
from ..runs import atomic_write_bytes
from .cache import EncoderCache, content_key, module_digest, tensor_key
from .config import TrainConfig
from .seeds import subseed

__all__ = ["Conditioning"]


class Conditioning:
    """Turns a batch into the network's inputs: (latent) images and the ``cond`` dict.

    :param config: the resolved run config.
    :param dataset: the training data (its captions build the vocabulary and the prompts).
    :param device: where the frozen encoders run.
    """

    def __init__(self, config: TrainConfig, dataset: Any, device: torch.device) -> None:
        self.cfg = cfg = config
        self.device = device
        self.tokenizer: WordTokenizer | None = None  # text.encoder: transformer
        self.frozen_text: PretrainedTextEncoder | None = None  # text.encoder: clip or t5
        self.grid_prompts: list[str] | None = None
        self.texts: list[str] = []
        if cfg.text.enabled:
            texts = self.texts = self._captions(dataset)
            n = cfg.sample.num_images
            distinct = list(dict.fromkeys(texts))
            self.grid_prompts = [distinct[i % len(distinct)] for i in range(n)]
            if cfg.text.pretrained:  # CLIP / T5, or SDXL's two encoders
                from ..interop.sd_text_train import training_text_encoder

                self.frozen_text = training_text_encoder(
                    cfg.text, device, image_size=cfg.data.image_size,
                    vector_dim=getattr(cfg.model_config(), "vector_dim", None),
                )  # fmt: skip
            else:
                self.tokenizer = self._build_tokenizer(texts)
        self.vae: AutoencoderKL | None = None  # latent diffusion: the frozen autoencoder
        if cfg.latent.vae is not None:
            self.vae = AutoencoderKL.from_pretrained(cfg.latent.vae).to(device)
            self.vae.requires_grad_(False)
        self._latents_checked = False
        # finetune.text_encoder: adapters on the frozen encoder train (gradients, no cache)
        self.text_trains = bool(cfg.finetune.text_encoder) and self.frozen_text is not None
        self.latent_cache, self.text_cache = self._encoder_caches(cfg.train.encoder_cache)

    # ------------------------------------------------------------------ set-up
    def _captions(self, dataset: Any) -> list[str]:
        """Every training caption; an error when any image has none."""
        texts = getattr(dataset, "texts", None)
        if texts is None:
            texts = [dataset[i].get("text") for i in range(len(dataset))]
        missing = sum(t is None for t in texts)
        if missing or not texts:
            raise ValueError(
                f"text.encoder={self.cfg.text.encoder!r} needs a caption for every image; "
                f"{missing} of {len(texts)} have none (see the data report)"
            )
        return list(texts)

    def _build_tokenizer(self, texts: list[str]) -> WordTokenizer:
        """The caption vocabulary (the same on every rank), or the base run's when
        fine-tuning."""
        tc = self.cfg.text
        if self.cfg.finetune.base_run is not None:  # the base run's vocabulary and weights
            tokenizer = WordTokenizer.load(Path(self.cfg.finetune.base_run) / TOKENIZER_FILE)
            new = {self.cfg.finetune.new_word}
            unknown = [w for w in tokenizer.unknown_words(texts) if w not in new]
            if unknown:
                warnings.warn(
                    f"caption words the base run never saw encode as <unk>: "
                    f"{', '.join(unknown[:10])}",
                    stacklevel=5,
                )
        else:
            tokenizer = WordTokenizer.from_texts(texts, tc.max_length, min_count=tc.min_count)
        longest = max(len(words(t)) for t in texts)
        if longest > tc.max_length - 1:
            warnings.warn(
                f"the longest caption has {longest} words, but text.max_length="
                f"{tc.max_length} keeps {tc.max_length - 1}; raise text.max_length to use "
                "whole captions",
                stacklevel=5,
            )
        return tokenizer

    def count_truncated(self, report: Any) -> None:
        """The data report's count of captions longer than the text encoder takes."""
        from ..data.captions import count_truncated

        if not self.texts:
            return
        if self.tokenizer is not None:  # the trained encoder keeps max_length - 1 words
            limit = self.cfg.text.max_length - 1
            report.truncated_captions = count_truncated(self.texts, lambda t: len(words(t)), limit)
        elif self.frozen_text is not None:  # CLIP / T5 tokens, the special ones included
            tok, limit = self.frozen_text.tokenizer, self.frozen_text.max_length
            length = lambda t: len(tok(t)["input_ids"])  # noqa: E731
            report.truncated_captions = count_truncated(self.texts, length, limit)
        else:
            return
        report.token_limit = limit

    def _encoder_caches(
        self, setting: str | None
    ) -> tuple[EncoderCache | None, EncoderCache | None]:
        """``train.encoder_cache``: one cache per frozen encoder, named by its weights."""
        if setting is None:
            return None, None
        folder = None if setting == "memory" else setting
        latent = text = None
        if self.vae is not None:
            latent = EncoderCache("vae-" + module_digest(self.vae, "float32"), folder)
        if self.frozen_text is not None and self.text_trains:
            warnings.warn(
                "train.encoder_cache caches the autoencoder's latents only: the text encoder's "
                "adapters train (finetune.text_encoder), so prompts are encoded at every step",
                stacklevel=4,
            )
        elif getattr(self.frozen_text, "kind", None) == "sdxl":  # both encoders + size ids
            xl: Any = self.frozen_text
            models = nn.ModuleList(xl.encoder.models)
            xl_settings = (f"max_length={xl.max_length}", f"size={xl.size}",
                           f"time_embed_dim={xl.conditioner.time_embed_dim}",
                           *(str(len(t)) for t in xl.encoder.tokenizers), "float32")  # fmt: skip
            text = EncoderCache("sdxl-" + module_digest(models, *xl_settings), folder)
        elif self.frozen_text is not None:
            ft = self.frozen_text
            settings: tuple[str, ...] = (f"max_length={ft.max_length}", type(ft.tokenizer).__name__,
                        str(len(ft.tokenizer)), "float32")  # fmt: skip
            if not ft.mask_padding:  # other values; masked runs keep their old cache names
                settings += ("unmasked",)
            text = EncoderCache("text-" + module_digest(ft.model, *settings), folder)
        return latent, text

    def wrap(self, model: nn.Module) -> nn.Module:
        """A fresh network with the text encoder that trains inside it (``text.encoder:
        transformer``; initialised from the run seed's stream 4), else ``model`` itself."""
        if self.tokenizer is None:
            return model
        gen = torch.Generator().manual_seed(subseed(self.cfg.seed, 4))
        text = TextTransformer(len(self.tokenizer), self.cfg.text, generator=gen)
        return TextConditionedUNet(model, text)  # type: ignore[arg-type]  # a U-Net or DiT

    # ------------------------------------------------------------------ run directory
    def write(self, run_dir: Path) -> None:
        """Write the vocabulary of a trained text encoder next to the weights."""
        if self.tokenizer is not None:
            text = self.tokenizer.to_json().encode("utf-8")
            atomic_write_bytes(run_dir / TOKENIZER_FILE, text)

    def check_resume(self, run_dir: Path) -> None:
        """Refuse to resume a run whose saved vocabulary differs from the captions'."""
        saved = run_dir / TOKENIZER_FILE
        if self.tokenizer is None or not saved.is_file():
            return
        old = WordTokenizer.load(saved)
        if (old.vocab, old.max_length) != (self.tokenizer.vocab, self.tokenizer.max_length):
            new_words = sorted(set(self.tokenizer.vocab) ^ set(old.vocab))[:5]
            raise ValueError(
                f"the captions' vocabulary differs from the run's {saved} "
                f"(e.g. {new_words}, max_length {old.max_length} -> "
                f"{self.tokenizer.max_length}); resume with the data the run started with"
            )

    # ------------------------------------------------------------------ per batch
    def inputs(
        self, batch: dict[str, Any], gen: torch.Generator, B: int, rows: slice,
        null_label: int | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        """This rank's ``(x0, cond)`` of a batch: (latent) images and the model's condition
        inputs, with condition dropout drawn from ``gen`` over the whole global batch ``B``
        (this rank keeps ``rows``)."""
        dev = self.device
        x0 = batch["image"].to(dev).float()
        if self.vae is not None:
            x0 = self._latents(x0, gen, B, rows)
        if self.cfg.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        drop_prob = self.cfg.diffusion.cond_drop_prob
        cond: dict[str, Tensor] = {}
        if null_label is not None:
            cond["class_labels"] = self._labels(batch, gen, B, rows, null_label, len(x0))
        if self.cfg.text.enabled:
            drop = torch.rand(B, generator=gen)[rows]
            texts = ["" if d < drop_prob else text for d, text in zip(drop.tolist(), batch["text"])]
            cond.update(self.text_inputs(texts, dev))
        return x0, cond

    def _labels(
        self, batch: dict[str, Any], gen: torch.Generator, B: int, rows: slice,
        null_label: int, b: int,
    ) -> Tensor:  # fmt: skip
        """Class labels after condition dropout (and ``data.mix`` rows: the null label)."""
        dev = self.device
        if "class_label" in batch:
            labels = batch["class_label"].to(dev).long()
            if "mix" in batch:  # data.mix: the general data trains the null label
                labels = torch.where(batch["mix"].to(dev), 0, labels)
            bad = labels[(labels < 0) | (labels >= null_label)]
            if bad.numel():
                raise ValueError(
                    f"the data has class label {int(bad[0])}, but the model has "
                    f"model.num_classes={null_label} (labels 0..{null_label - 1}"
                    "); set model.num_classes to the data's class count"
                )
        else:  # no labels in the data: train the unconditional (null-label) model
            labels = torch.full((b,), null_label, device=dev, dtype=torch.long)
        drop = torch.rand(B, generator=gen)[rows].to(dev)
        null = torch.full_like(labels, null_label)
        if "mix" in batch and "class_label" in batch:
            labels = torch.where(batch["mix"].to(dev), null, labels)
        return torch.where(drop < self.cfg.diffusion.cond_drop_prob, null, labels)

    def text_inputs(self, texts: list[str], dev: torch.device) -> dict[str, Tensor]:
        """The model's text inputs: token ids for an encoder that trains inside the model,
        ready tokens from a frozen one (computed here, without gradients)."""
        if self.tokenizer is not None:
            ids, mask = self.tokenizer.encode(texts)
            return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
        assert self.frozen_text is not None
        keywords = getattr(self.frozen_text, "keywords", None)
        if keywords is not None:  # SDXL: context and the vector (pooled text + size ids)
            if self.text_cache is not None:

                def encode_xl(i: int) -> dict[str, Tensor]:
                    return {k: v[0] for k, v in keywords([texts[i]]).items()}

                entries = self.text_cache.get([content_key(t) for t in texts], encode_xl)
                return {k: torch.stack([e[k] for e in entries]).to(dev) for k in entries[0]}
            return {k: v.to(dev) for k, v in keywords(texts, grad=self.text_trains).items()}
        if self.frozen_text.words or self.text_trains:  # gradients reach the word / adapters
            context, mask = self.frozen_text.encode(texts)
        elif self.text_cache is not None:
            encoder = self.frozen_text

            def encode(i: int) -> dict[str, Tensor]:
                context, mask = encoder([texts[i]])
                return {"context": context[0], "mask": mask[0]}

            entries = self.text_cache.get([content_key(text) for text in texts], encode)
            context = torch.stack([e["context"] for e in entries])
            mask = torch.stack([e["mask"] for e in entries])
        else:
            context, mask = self.frozen_text(texts)
        return {"context": context.to(dev), "context_mask": mask.to(dev)}

    @torch.no_grad()
    def _latents(self, images: Tensor, gen: torch.Generator, B: int, rows: slice) -> Tensor:
        """Scaled autoencoder latents of this rank's images: posterior samples whose noise
        is drawn for the whole global batch (as one process would), or posterior means."""
        assert self.vae is not None
        if self.latent_cache is not None:
            vae = self.vae

            def encode(i: int) -> dict[str, Tensor]:
                post = vae.encode(images[i : i + 1])
                return {"mean": post.mean[0], "logvar": post.logvar[0]}

            keys = [tensor_key(image) for image in images.detach().cpu()]
            entries = self.latent_cache.get(keys, encode)
            z = torch.stack([e["mean"] for e in entries]).to(images.device)
            std = torch.exp(0.5 * torch.stack([e["logvar"] for e in entries]).to(images.device))
        else:
            posterior = self.vae.encode(images)
            z, std = posterior.mean, posterior.std
        if self.cfg.latent.sample_posterior:
            noise = torch.randn((B, *z.shape[1:]), generator=gen)[rows].to(z.device)
            z = z + std * noise
        z = self.vae.scale(z)
        if not self._latents_checked:  # once per run: a wrong scale ruins the noise levels
            self.vae.check_latent_scale(z)
            self._latents_checked = True
        return z

    @torch.no_grad()
    def validation_inputs(
        self, images: Tensor, items: list[dict[str, Any]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Model inputs of validation items: posterior-mean latents for latent runs, the
        true captions for text runs (deterministic, unlike training's draws)."""
        x0 = images if self.vae is None else self.vae.latents(images)  # posterior means
        if not self.cfg.text.enabled:
            return x0, {}
        return x0, self.text_inputs([str(it["text"]) for it in items], x0.device)

    def prompt_encoder(self, net: nn.Module) -> Any:
        """``prompts -> (context, mask)`` for sampling ``net`` (None without text)."""
        if self.frozen_text is not None:
            from ..finetune.text_encoder import encoder_for

            encoder = encoder_for(net, self.frozen_text)  # the network's adapted text models
            if encoder.words:  # the word vector of the network being sampled
                (token,) = encoder.words
                return encoder.with_words({token: getattr(net, WORD_PARAM)})
            return encoder
        if self.tokenizer is not None:
            return PromptEncoder(net, self.tokenizer)  # type: ignore[arg-type]
        return None
