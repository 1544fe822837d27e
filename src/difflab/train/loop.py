"""The training loop: config → data + model + schedule → loss → optimiser step → EMA → checkpoint.

Owns :func:`train` and the :class:`Trainer` behind it: AdamW with linear warm-up then cosine
or constant learning rate, gradient accumulation and clipping, EMA (one update per optimiser
step), mixed precision, classifier-free-guidance condition dropout, non-finite detection,
DDP or FSDP2 (``difflab.train.fsdp``) under torchrun, ``torch.compile`` (``train.compile``),
logging, sample grids and exact resume.  Every loss, weighting and timestep sampler comes
from ``difflab.losses``; sampling from ``difflab.samplers``.

Randomness: no global RNG is drawn by the loop.  A trainer-owned generator (seeded from
``config.seed``, the same on every rank) draws condition dropout, timesteps and noise for
the whole *global* batch, and each rank keeps its rows, so N ranks compute exactly what
one process does with the same global batch.  Dropout layers inside the model use torch's
global RNG; it is seeded at start (``seed + rank``), saved per rank in the checkpoint and
restored on resume (and the caller's global RNG state is restored when :func:`train` returns).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..finetune.inversion import WORD_PARAM
from ..finetune.lora import LORA_FILE
from ..formulations import formulation_from_config
from ..losses import LossSecondMomentSampler, training_loss
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
from ..samplers.common import progress as progress_bar
from ..schedules import NoiseSchedule
from .adapt import adapt_to_data, build_stream, set_bucket_step
from .amp import resolve_precision
from .budget import TimeBudget, format_duration, parse_duration
from .cache import EncoderCache, content_key, module_digest, tensor_key
from .checkpoint import (
    Checkpoint,
    atomic_write_bytes,
    find_checkpoint,
    load_checkpoint,
    repair_run_dir,
    save_checkpoint,
)
from .compiled import COMPILE_CACHE, inductor_cache
from .config import TrainConfig, load_config, save_config
from .distributed import all_gather_objects, setup_distributed, teardown_distributed
from .early_stop import BEST_FILE, EarlyStopping
from .ema import EMA
from .fsdp import (
    clip_grad_norm,
    is_sharded,
    is_sharded_checkpoint,
    load_sharded,
    no_sync,
    parallelize,
    save_sharded,
)
from .monitor import MetricsLog, log_line, plot_metrics, sample_grid, truncate_metrics
from .nonfinite import NonFiniteError, first_nonfinite_grad, first_nonfinite_module
from .optim import build_optimizer, step_lr_schedule
from .posthoc_ema import PostHocEMA, PostHocEMAConfig
from .validation import split_dataset, validation_loss

__all__ = ["TrainResult", "Trainer", "TrainingInterrupted", "train"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped training after a step; its checkpoint is saved.

    :param step: the step saved (``--resume`` continues from it).
    :param signum: the signal received.
    :param run_dir: the run directory holding the checkpoint.
    """

    def __init__(self, step: int, signum: int, run_dir: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: checkpoint saved in {run_dir}")
        self.step, self.signum, self.run_dir = step, signum, run_dir


@dataclass
class TrainResult:
    """What :func:`train` returns.

    :param run_dir: the run directory.
    :param step: optimiser steps done (skipped non-finite steps included).
    :param final_loss: loss of the last step (averaged over ranks and micro-batches).
    :param losses: the loss of every step run by this call.
    :param skipped_steps: steps skipped by ``on_nonfinite: skip`` in this call.
    :param ema_updates: EMA updates so far.
    :param grids: sample-grid PNGs written by this call.
    :param evals: the periodic metric records (``train.eval_every``) written by this call.
    :param validation: the validation-loss records (``train.val_every``) of this call
        (rank 0 only; empty on the other ranks).
    :param stop_reason: ``max_steps``, ``time budget`` (``train.max_time``) or ``early
        stopping`` (``train.patience``).
    """

    run_dir: Path
    step: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    ema_updates: int = 0
    grids: list[Path] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = "max_steps"


@dataclass
class _MicroBatch:
    x0: Tensor
    cond: dict[str, Tensor]
    t: Tensor
    noise: Tensor
    importance: Tensor | None
    rng: dict[str, Tensor]  # global + aux RNG states before its forward (for diagnosis)
    prior: Tensor | None = None  # DreamBooth: which rows are prior-preservation images
    mix: Tensor | None = None  # data.mix: which rows come from the general data set


class Trainer:
    """One training run; :func:`train` is the usual way in.

    :param config: the run's configuration (its model section is resolved).
    :param dataset: data set of dicts; default ``difflab.data.build_dataset(config.data)``.
    :param model: a network honouring the model contract; default
        ``difflab.models.UNet(config.model_config())`` initialised from ``config.seed``.
    :param progress: progress bar on/off; None: on when stderr is a terminal (rank 0 only).
    :param clock: seconds from any origin, read for ``train.max_time`` (default
        ``time.monotonic``; tests inject a scripted one).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        dataset: Dataset | None = None,
        model: nn.Module | None = None,
        progress: bool | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.cfg = cfg = config.resolve()
        tc = cfg.train
        self.dist = setup_distributed(tc.device)
        # Dropout layers draw from torch's global RNG: seed it per rank (train() restores the
        # caller's state afterwards; a checkpoint saves and restores it).
        torch.manual_seed(_subseed(cfg.seed, 100 + self.dist.rank))
        self.device = self.dist.device
        self.run_dir = Path(cfg.run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run_dir {str(self.run_dir)!r} is a file, not a directory")
        self.precision = resolve_precision(tc.mixed_precision, self.device)
        self.schedule = NoiseSchedule.from_config(cfg.diffusion.schedule)
        # edm / flow (difflab.formulations): their own noise levels, loss and sampling table
        self.formulation = formulation_from_config(
            cfg.diffusion.formulation, cfg.diffusion.formulation_options
        )
        if self.formulation is not None:
            self.schedule = self.formulation.schedule
        rank = self.dist.rank
        # Shared by all ranks: condition dropout, timesteps, noise of the global batch.
        self.gen = torch.Generator().manual_seed(_subseed(cfg.seed, 0))
        # Per rank: offset noise / input perturbation inside the loss, and data flips.
        self.aux_gen = torch.Generator().manual_seed(_subseed(cfg.seed, 1 + 2 * rank))
        self.data_gen = torch.Generator().manual_seed(_subseed(cfg.seed, 2 + 2 * rank))

        set_bucket_step(cfg)  # data.buckets: sides in multiples the network takes
        report = None  # printed once the captions' token counts are known
        if dataset is None:
            from ..data import build_dataset

            dataset, report = build_dataset(cfg.data, generator=self.data_gen)
            if self.dist.is_main and cfg.data.source == "captions" and not cfg.text.enabled:
                warnings.warn(
                    "data.source=captions, but text.encoder is none: the captions are read and "
                    "do not condition the model, which trains unconditionally; set "
                    "text.encoder=transformer (trained on these captions), clip or t5 to "
                    "condition on them",
                    stacklevel=2,
                )
        else:
            gen = getattr(dataset, "generator", None)
            self.data_gen = gen if isinstance(gen, torch.Generator) else self.data_gen
        if cfg.finetune.prior_condition is not None:
            dataset = self._with_prior(dataset)
        # Held-out validation data: the same split on every rank and after a resume.
        dataset, self.val_set = split_dataset(dataset, tc.val_fraction, _subseed(cfg.seed, 50))
        if self.val_set is not None and self.dist.is_main:
            print(f"validation: {len(self.val_set)} held-out samples, {len(dataset)} for training")
        notes = adapt_to_data(
            cfg, dataset, num_classes_given=model is not None or "num_classes" in config.model,
            world_size=self.dist.world_size,
        )  # fmt: skip
        self.stream = build_stream(
            cfg, dataset, rank=rank, world_size=self.dist.world_size,
            mix_seed=_subseed(cfg.seed, 60), generator=self.data_gen,
        )  # fmt: skip

        self.tokenizer: WordTokenizer | None = None  # text.encoder: transformer
        self.frozen_text: PretrainedTextEncoder | None = None  # text.encoder: clip or t5
        self.grid_prompts: list[str] | None = None
        if cfg.text.enabled:
            texts = self._train_texts = self._captions(dataset)
            n = cfg.sample.num_images
            distinct = list(dict.fromkeys(texts))
            self.grid_prompts = [distinct[i % len(distinct)] for i in range(n)]
            if cfg.text.pretrained:
                self.frozen_text = PretrainedTextEncoder(
                    str(cfg.text.path), cfg.text.max_length, self.device, kind=cfg.text.encoder,
                    mask_padding=cfg.text.mask_padding,
                )  # fmt: skip
            else:
                self.tokenizer = self._build_tokenizer(texts)
        if self.dist.is_main:
            if report is not None:
                self._count_truncated(report)
                print(report)
            if notes:
                print("\n".join(notes))
        self.vae: AutoencoderKL | None = None  # latent diffusion: the frozen autoencoder
        if cfg.latent.vae is not None:
            self.vae = AutoencoderKL.from_pretrained(cfg.latent.vae).to(self.device)
            self.vae.requires_grad_(False)
        self._latents_checked = False
        self.latent_cache, self.text_cache = self._encoder_caches(tc.encoder_cache)
        self.model = self._build_model(model).to(self.device)
        if self.frozen_text is not None and hasattr(self.model, WORD_PARAM):
            self.frozen_text.add_word(str(cfg.finetune.new_word), getattr(self.model, WORD_PARAM))
        self.ema = EMA(self.model, tc.ema_decay, warmup=tc.ema_warmup)
        self.posthoc: PostHocEMA | None = None  # EDM2 power-function EMA snapshots
        if tc.posthoc_ema is not None:
            self.posthoc = PostHocEMA(
                self.model, PostHocEMAConfig.from_dict(tc.posthoc_ema), self.run_dir,
                last_step=tc.max_steps, write=self.dist.is_main,
            )  # fmt: skip
        self.null_label: int | None = getattr(self.model, "null_class_label", None)
        # DDP or FSDP2 by train.parallel (difflab.train.fsdp); the model itself in one process
        self.ddp: nn.Module = parallelize(cfg, self.model, self.ema, self.dist, self.precision)
        self._exit = contextlib.ExitStack()  # undone by close()
        self._compile_pending = tc.compile  # the first step compiles; its time is logged
        if tc.compile:  # DDP first, then compile (DDP's buckets split the compiled graph)
            self._exit.enter_context(inductor_cache(self.run_dir / COMPILE_CACHE))
            self.ddp = torch.compile(self.ddp)
        self.budget: TimeBudget | None = None  # train.max_time
        if tc.max_time is not None:
            seconds = parse_duration(tc.max_time)
            self.budget = TimeBudget(seconds, tc.max_steps, clock=clock or time.monotonic)
        self.early = EarlyStopping(tc.patience, tc.min_delta) if tc.patience else None
        self.stop_reason = ""
        progress_of = self.budget.effective_step if self.budget is not None else None
        self.optimizer, self.lr_schedule = build_optimizer(self.model, tc, progress=progress_of)
        self.scaler = self.precision.grad_scaler()
        self.timestep_sampler = None
        if cfg.diffusion.timestep_sampler == "importance":
            T = self.schedule.num_timesteps
            self.timestep_sampler = LossSecondMomentSampler(T, _subseed(cfg.seed, 3))
        self.step = 0
        self.last_loss = float("nan")
        self.show_progress = progress
        self.log: MetricsLog | None = None
        self._eval_extractor: Any = None  # built on the first periodic eval
        self._eval_prompts: tuple[list[str], bool] | None = None  # a text run's prompts
        self._last_records: dict[str, dict[str, Any]] = {}  # latest val / eval record

    # ------------------------------------------------------------------ setup helpers
    def _with_prior(self, dataset: Any) -> Any:
        """The instance data mixed with the base run's prior images (rank 0 draws them,
        the other ranks read them once written)."""
        from ..finetune.prior import PriorMixture, prior_images

        ft = self.cfg.finetune
        args = (ft.base_run, ft.prior_condition, ft.prior_images, self.run_dir / "prior")
        if self.dist.is_main:
            images = prior_images(*args, seed=self.cfg.seed)
        if self.dist.distributed:
            dist.barrier()
        if not self.dist.is_main:
            images = prior_images(*args, seed=self.cfg.seed)
        return PriorMixture(dataset, images, ft.prior_condition)

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

    def _count_truncated(self, report: Any) -> None:
        """The data report's count of captions longer than the text encoder takes."""
        from ..data.captions import count_truncated

        texts = getattr(self, "_train_texts", None)
        if not texts:
            return
        if self.tokenizer is not None:  # the trained encoder keeps max_length - 1 words
            limit = self.cfg.text.max_length - 1
            report.truncated_captions = count_truncated(texts, lambda t: len(words(t)), limit)
        elif self.frozen_text is not None:  # CLIP / T5 tokens, the special ones included
            tok, limit = self.frozen_text.tokenizer, self.frozen_text.max_length
            length = lambda t: len(tok(t)["input_ids"])  # noqa: E731
            report.truncated_captions = count_truncated(texts, length, limit)
        else:
            return
        report.token_limit = limit

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
                    stacklevel=3,
                )
        else:
            tokenizer = WordTokenizer.from_texts(texts, tc.max_length, min_count=tc.min_count)
        longest = max(len(words(t)) for t in texts)
        if longest > tc.max_length - 1:
            warnings.warn(
                f"the longest caption has {longest} words, but text.max_length="
                f"{tc.max_length} keeps {tc.max_length - 1}; raise text.max_length to use "
                "whole captions",
                stacklevel=3,
            )
        return tokenizer

    def _adapt(self, model: nn.Module) -> None:
        """Load the base run's weights into ``model`` and wrap its target layers in LoRA /
        LoHa / LoKr adapters; only the adapters train (``finetune`` config section)."""
        from ..finetune import add_lora
        from ..runs import WEIGHTS, load_weights

        ft = self.cfg.finetune
        load_weights(model, Path(str(ft.base_run)) / WEIGHTS[ft.weights])
        what = []
        if ft.new_word is not None and self.frozen_text is not None:
            # textual inversion through a frozen CLIP/T5: the word's vector is a parameter
            # of the U-Net that the encoder puts in place of the word's token embedding
            from ..finetune.inversion import attach_word_vector

            enc = self.frozen_text
            table = enc.model.get_input_embeddings().weight
            init = enc.word_embedding(ft.init_word) if ft.init_word else table.mean(0)
            model.requires_grad_(False)
            attach_word_vector(model, init)
            what.append(f"the new word {ft.new_word!r}")
        elif ft.new_word is not None:  # textual inversion: one new, trainable token row
            from ..finetune.inversion import add_word

            if not isinstance(model, TextConditionedUNet) or self.tokenizer is None:
                raise ValueError(
                    "finetune.new_word needs a base run with a text encoder "
                    "(text.encoder: transformer, clip or t5)"
                )
            self.tokenizer, _ = add_word(model, self.tokenizer, ft.new_word, ft.init_word)
            what.append(f"the new word {ft.new_word!r}")
        if ft.targets != "none":
            gen = torch.Generator().manual_seed(_subseed(self.cfg.seed, 5))
            names = add_lora(
                model, ft.rank, ft.alpha, ft.targets, kind=ft.adapter, rslora=ft.rslora,
                dora=ft.dora, factor=ft.lokr_factor, generator=gen,
            )  # fmt: skip
            if ft.new_word is not None:  # add_lora froze the rest, the new word included
                _word_parameter(model).requires_grad_(True)
            label = {"lora": "DoRA" if ft.dora else "LoRA", "loha": "LoHa", "lokr": "LoKr"}
            what.append(f"{label[ft.adapter]} rank {ft.rank} on {len(names)} layers")
        if self.dist.is_main:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if ft.new_word is not None and self.frozen_text is None:  # a one-row mask
                table = model.text.token.weight  # type: ignore[union-attr]
                trainable -= table.numel() - table.shape[1]
            total = sum(p.numel() for p in model.parameters())
            print(
                f"fine-tuning {ft.base_run}: {' and '.join(what)}; "
                f"{trainable:,} of {total:,} parameters train"
            )

    def _build_model(self, model: nn.Module | None) -> nn.Module:
        tc = self.cfg.train
        if model is None:
            from ..models import build_model

            mcfg = self.cfg.model_config()
            if mcfg.context_dim is not None and not self.cfg.text.enabled:
                raise ValueError(
                    "model.context_dim is set, but there is no text encoder to feed it; set "
                    "text.encoder: transformer (trained on the data's captions) or clip"
                )
            model = build_model(mcfg, generator=torch.Generator().manual_seed(self.cfg.seed))
            if self.tokenizer is not None:
                gen = torch.Generator().manual_seed(_subseed(self.cfg.seed, 4))
                text = TextTransformer(len(self.tokenizer), self.cfg.text, generator=gen)
                model = TextConditionedUNet(model, text)
            if self.cfg.finetune.base_run is not None:
                self._adapt(model)
        if tc.grad_checkpointing:
            if not hasattr(model, "set_gradient_checkpointing"):
                raise ValueError(f"{type(model).__name__} has no set_gradient_checkpointing()")
            model.set_gradient_checkpointing(True)
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.train()

    # ------------------------------------------------------------------ one step
    def _draw(self, batch: dict[str, Any]) -> _MicroBatch:
        """This rank's inputs, from draws over the whole global batch (same as 1 process)."""
        B, dev = self.cfg.train.batch_size, self.device
        b = B // self.dist.world_size
        rows = slice(self.dist.rank * b, (self.dist.rank + 1) * b)
        x0 = batch["image"].to(dev).float()
        if self.vae is not None:
            x0 = self._latents(x0, B, rows)
        if self.cfg.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        cond: dict[str, Tensor] = {}
        if self.null_label is not None:
            if "class_label" in batch:
                labels = batch["class_label"].to(dev).long()
                if "mix" in batch:  # data.mix: the general data trains the null label
                    labels = torch.where(batch["mix"].to(dev), 0, labels)
                bad = labels[(labels < 0) | (labels >= self.null_label)]
                if bad.numel():
                    raise ValueError(
                        f"the data has class label {int(bad[0])}, but the model has "
                        f"model.num_classes={self.null_label} (labels 0..{self.null_label - 1}"
                        "); set model.num_classes to the data's class count"
                    )
            else:  # no labels in the data: train the unconditional (null-label) model
                labels = torch.full((b,), self.null_label, device=dev, dtype=torch.long)
            drop = torch.rand(B, generator=self.gen)[rows].to(dev)
            null = torch.full_like(labels, self.null_label)
            if "mix" in batch and "class_label" in batch:
                labels = torch.where(batch["mix"].to(dev), null, labels)
            cond["class_labels"] = torch.where(
                drop < self.cfg.diffusion.cond_drop_prob, null, labels
            )
        if self.cfg.text.enabled:
            drop = torch.rand(B, generator=self.gen)[rows]
            texts = [
                "" if d < self.cfg.diffusion.cond_drop_prob else text
                for d, text in zip(drop.tolist(), batch["text"])
            ]
            cond.update(self._text_cond(texts, dev))
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
        return _MicroBatch(x0, cond, t, noise, importance, self._local_rng(), prior, mix)

    def _text_cond(self, texts: list[str], dev: torch.device) -> dict[str, Tensor]:
        """The model's text inputs: token ids for an encoder that trains inside the model,
        ready tokens from a frozen one (computed here, without gradients)."""
        if self.tokenizer is not None:
            ids, mask = self.tokenizer.encode(texts)
            return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
        assert self.frozen_text is not None
        if self.frozen_text.words:  # textual inversion: gradients reach the word's vector
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
        if self.frozen_text is not None:
            ft = self.frozen_text
            settings = (f"max_length={ft.max_length}", type(ft.tokenizer).__name__,
                        str(len(ft.tokenizer)), "float32")  # fmt: skip
            if not ft.mask_padding:  # other values; masked runs keep their old cache names
                settings += ("unmasked",)
            text = EncoderCache("text-" + module_digest(ft.model, *settings), folder)
        return latent, text

    @torch.no_grad()
    def _latents(self, images: Tensor, B: int, rows: slice) -> Tensor:
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
            noise = torch.randn((B, *z.shape[1:]), generator=self.gen)[rows].to(z.device)
            z = z + std * noise
        z = self.vae.scale(z)
        if not self._latents_checked:  # once per run: a wrong scale ruins the noise levels
            self.vae.check_latent_scale(z)
            self._latents_checked = True
        return z

    def _forward(self, model: nn.Module, mb: _MicroBatch) -> tuple[Tensor, Tensor]:
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

    def _update_timestep_sampler(self, mb: _MicroBatch, per_sample: Tensor) -> None:
        """Feed the importance sampler every rank's losses, in global-batch order."""
        if self.timestep_sampler is None:
            return
        pairs = all_gather_objects((mb.t.cpu(), per_sample.detach().float().cpu()), self.dist)
        self.timestep_sampler.update(
            torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        )

    def train_step(self) -> dict[str, Any]:
        """One optimiser step over ``grad_accum`` micro-batches; returns its metrics."""
        tc = self.cfg.train
        k = self.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        parts = torch.zeros(4)
        micro = []
        for i in range(tc.grad_accum):
            mb = self._draw(self.stream.next())
            sync = i == tc.grad_accum - 1 or not self.dist.distributed
            with contextlib.nullcontext() if sync else no_sync(self.ddp):
                loss, per_sample = self._forward(self.ddp, mb)
                self.scaler.scale(loss / tc.grad_accum).backward()
            self._update_timestep_sampler(mb, per_sample)
            total += loss.detach().float() / tc.grad_accum
            split = mb.prior if mb.prior is not None else mb.mix
            if split is not None:  # instance / prior (or main / mix) loss sums and counts
                ps = per_sample.detach().float()
                prior = split.float()
                parts += torch.stack([(ps * (1 - prior)).sum(), (1 - prior).sum(),
                                      (ps * prior).sum(), prior.sum()]).cpu()  # fmt: skip
            micro.append(mb)
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm)  # global over shards
        flags = torch.stack([total, (~torch.isfinite(total)).float(), 1.0 - _finite(grad_norm)])
        if self.dist.distributed:
            dist.all_reduce(flags)
        loss_value = float(flags[0]) / self.dist.world_size
        bad_loss = bool(flags[1] > 0)
        bad_grad = bool(flags[2] > 0) and not self.precision.needs_scaler  # fp16: scaler skips
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"step": k, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}
        if self.cfg.finetune.prior_condition is not None or self.cfg.data.mix is not None:
            if self.dist.distributed:
                parts = parts.to(self.device)
                dist.all_reduce(parts)
            inst_sum, inst_n, prior_sum, prior_n = parts.tolist()
            names = (
                ("loss_main", "loss_mix") if self.cfg.data.mix else ("loss_instance", "loss_prior")
            )
            record[names[0]] = inst_sum / inst_n if inst_n else None
            record[names[1]] = prior_sum / prior_n if prior_n else None
        if bad_loss or bad_grad:
            what = "loss" if bad_loss else "gradient"
            module = self._diagnose(micro)
            if tc.on_nonfinite == "stop":
                self._log({"step": k, "event": "nonfinite", "nonfinite": what, "module": module})
                raise NonFiniteError(k, what, module)
            self.optimizer.zero_grad(set_to_none=True)
            if self.precision.needs_scaler:
                self.scaler.update()
            self._lr_step()
            self.step = k
            return {**record, "skipped": True, "nonfinite": what, "module": module}
        scale = self.scaler.get_scale() if self.precision.needs_scaler else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._lr_step()
        self.step = k
        self.last_loss = loss_value
        if self.precision.needs_scaler and self.scaler.get_scale() < scale:
            return {**record, "fp16_overflow": True}  # GradScaler skipped the step: no EMA
        self.ema.update(self.model)
        if self.posthoc is not None:
            self.posthoc.update(self.model, k)
        return record

    def _lr_step(self) -> None:
        step_lr_schedule(self.lr_schedule)

    def _diagnose(self, micro: list[_MicroBatch]) -> str | None:
        """Re-run each micro-batch with hooks (same RNG states) to name the first bad module."""
        now = self._local_rng()
        found = None
        try:
            for mb in micro:
                self._set_local_rng(mb.rng)
                found = first_nonfinite_module(
                    self.model, lambda mb=mb: self._forward(self.model, mb)
                )
                if found is not None:
                    break
            if found is None:
                found = first_nonfinite_grad(self.model)
        finally:
            self._set_local_rng(now)
        names = [n for n in all_gather_objects(found, self.dist) if n is not None]
        return names[0] if names else None

    # ------------------------------------------------------------------ RNG state
    def _local_rng(self) -> dict[str, Tensor]:
        """RNG states that differ per rank: global CPU/CUDA (dropout), aux and data flips."""
        out = {"torch_cpu": torch.get_rng_state(), "aux": self.aux_gen.get_state()}
        out["data"] = self.data_gen.get_state()
        if self.device.type == "cuda":
            out["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def _set_local_rng(self, states: dict[str, Tensor]) -> None:
        torch.set_rng_state(states["torch_cpu"])
        self.aux_gen.set_state(states["aux"])
        self.data_gen.set_state(states["data"])
        if self.device.type == "cuda" and "torch_cuda" in states:
            torch.cuda.set_rng_state(states["torch_cuda"], self.device)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Write a checkpoint (rank 0; every rank's RNG states are gathered first)."""
        per_rank = all_gather_objects(self._local_rng(), self.dist)
        sharded = is_sharded(self.model)  # FSDP: every rank writes its shards
        if self.dist.is_main or sharded:
            rng = {f"rank{r}.{k}": v for r, st in enumerate(per_rank) for k, v in st.items()}
            rng["shared.noise"] = self.gen.get_state()
            ts = self.timestep_sampler
            meta = {
                "step": self.step,
                "loss": self.last_loss,
                "ema_updates": self.ema.num_updates,
                "data_position": self.stream.position,
                "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "timestep_sampler": ts.state_dict() if ts is not None else None,
                "world_size": self.dist.world_size,
            }
            if self.budget is not None:
                meta["train_time"] = self.budget.elapsed
            if self.early is not None:
                meta["early_stopping"] = self.early.state_dict()
            if sharded:
                save_sharded(self.run_dir, self.model, self.ema, self.optimizer, rng, meta,
                             self.dist)  # fmt: skip
            else:
                ckpt = Checkpoint(
                    model=self.model.state_dict(),
                    ema=self.ema.state_dict(),
                    optimizer=self.optimizer.state_dict(),
                    rng=rng,
                    meta=meta,
                )
                if self.posthoc is not None:  # before the checkpoint that refers to it
                    self.posthoc.save_state(self.step)
                save_checkpoint(self.run_dir, ckpt)
        if self.dist.is_main:
            if self.cfg.train.plot_metrics and self.log is not None:
                try:  # the picture of metrics.jsonl so far; never worth stopping a run for
                    plot_metrics(self.run_dir)
                except Exception as err:  # noqa: BLE001 - reported, and training goes on
                    warnings.warn(f"metrics.png not drawn: {err!r}", stacklevel=2)
            if self.cfg.finetune.base_run is not None:
                from ..finetune import save_lora

                meta = {"base_run": str(self.cfg.finetune.base_run), "step": str(self.step),
                        "weights": "ema"}  # fmt: skip
                if self.cfg.finetune.targets != "none":
                    save_lora(self.ema.model, self.run_dir / LORA_FILE, metadata=meta)
                if self.cfg.finetune.new_word is not None:
                    from ..finetune.inversion import EMBEDDING_FILE, save_word_vector

                    meta["init_word"] = str(self.cfg.finetune.init_word)
                    save_word_vector(
                        self.cfg.finetune.new_word, word_weight(self.ema.model),
                        self.run_dir / EMBEDDING_FILE, meta,
                    )  # fmt: skip
        if self.dist.distributed:
            dist.barrier()

    def restore(self) -> bool:
        """Load the run directory's checkpoint if there is one; returns whether it did."""
        if find_checkpoint(self.run_dir) is None:
            return False
        saved = self.run_dir / TOKENIZER_FILE
        if self.tokenizer is not None and saved.is_file():
            old = WordTokenizer.load(saved)
            if (old.vocab, old.max_length) != (self.tokenizer.vocab, self.tokenizer.max_length):
                new_words = sorted(set(self.tokenizer.vocab) ^ set(old.vocab))[:5]
                raise ValueError(
                    f"the captions' vocabulary differs from the run's {saved} "
                    f"(e.g. {new_words}, max_length {old.max_length} -> "
                    f"{self.tokenizer.max_length}); resume with the data the run started with"
                )
        if is_sharded(self.model) or is_sharded_checkpoint(self.run_dir):  # DCP reshards
            ck = load_sharded(self.run_dir, self.model, self.ema, self.optimizer)
        else:
            ck = load_checkpoint(self.run_dir, optimizer_like=self.optimizer.state_dict())
            try:
                self.model.load_state_dict(ck.model)
            except RuntimeError as err:  # size mismatch / missing keys: one line, not a page
                detail = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
                raise ValueError(
                    f"{self.run_dir} holds a checkpoint of another architecture ({detail}); "
                    "resume with the run's own config.yaml, or train into a new run_dir"
                ) from None
            self.ema.load_state_dict(ck.ema, ck.meta["ema_updates"])
            self.optimizer.load_state_dict(ck.optimizer)
            _match_param_layout(self.optimizer)
        meta = ck.meta
        if self.posthoc is not None:
            self.posthoc.load_state(int(meta["step"]))
        self.lr_schedule.load_state_dict(meta["lr_schedule"])
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        if self.timestep_sampler is not None and meta["timestep_sampler"] is not None:
            self.timestep_sampler.load_state_dict(meta["timestep_sampler"])
        self.step, self.last_loss = int(meta["step"]), float(meta["loss"])
        if self.budget is not None:
            self.budget.spent = float(meta.get("train_time", 0.0))
        if self.early is not None and meta.get("early_stopping") is not None:
            self.early.load_state_dict(meta["early_stopping"])
        self.stream.set_position(meta["data_position"])
        self.gen.set_state(ck.rng["shared.noise"])
        prefix = f"rank{self.dist.rank}."
        if meta["world_size"] != self.dist.world_size or prefix + "torch_cpu" not in ck.rng:
            warnings.warn(
                f"checkpoint was written by {meta['world_size']} process(es), now "
                f"{self.dist.world_size}: per-rank RNG states restart from rank 0's",
                stacklevel=2,
            )
            prefix = "rank0."
        local = {k[len(prefix) :]: v for k, v in ck.rng.items() if k.startswith(prefix)}
        self._set_local_rng(local)
        return True

    # ------------------------------------------------------------------ the run
    def run(self, *, resume: bool = False, stop_at: int | None = None) -> TrainResult:
        """Train to ``train.max_steps`` (continuing from the checkpoint when ``resume``).

        :param stop_at: stop (and save) after this step, as if the job were cut off there;
            the LR schedule still runs to ``max_steps``.
        """
        tc = self.cfg.train
        last = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        if self.dist.is_main:  # what a killed save left: temp files, a stale top-level file
            for fixed in repair_run_dir(self.run_dir):
                print(f"{self.run_dir}: {fixed}")
        if self.dist.distributed:
            dist.barrier()
        if resume:
            resumed = self.restore()
            self._warn_config_changes()
            if resumed and self.dist.is_main:
                print(f"resuming {self.run_dir} from step {self.step}", flush=True)
        elif find_checkpoint(self.run_dir) is not None:
            raise ValueError(
                f"{self.run_dir} already holds a checkpoint; pass resume=True to continue it "
                "or choose another run_dir"
            )
        else:
            resumed = False
        result = TrainResult(self.run_dir, self.step, self.last_loss)
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            if self.tokenizer is not None:
                text = self.tokenizer.to_json().encode("utf-8")
                atomic_write_bytes(self.run_dir / TOKENIZER_FILE, text)
            if resumed:  # the steps after the checkpoint run again: log them once
                truncate_metrics(self.run_dir, self.step)
            self.log = MetricsLog(self.run_dir, tensorboard=tc.tensorboard)
            self.log.log({"event": "resume" if resumed else "start", "step": self.step})
        disable = (not main) or (None if self.show_progress is None else not self.show_progress)
        # Output to a file (no terminal) gets a plain line per logged step instead of a bar.
        plain = main and self.show_progress is None and not sys.stderr.isatty()
        start_step, start_time = self.step, time.perf_counter()
        if self.budget is not None:
            self.budget.start()
            if self.budget.exhausted:  # a resumed run whose budget was already spent
                last, self.stop_reason = self.step, "time budget"
        bar = progress_bar(
            range(self.step, last), total=max(0, last - self.step), desc="train",
            disable=disable, leave=True,
        )  # fmt: skip
        window: list[float] = []
        parts: dict[str, list[float]] = {}
        good: dict[str, Any] = {}
        tick = time.perf_counter()
        with _stop_on_signals() as stop:
            for _ in bar:
                began = time.perf_counter()
                rec = self.train_step()
                step = self.step
                if self._compile_pending:
                    self._compile_pending = False
                    self._report_compile(step, time.perf_counter() - began)
                result.losses.append(rec["loss"])
                if rec.get("skipped"):
                    result.skipped_steps.append(step)
                    self._log(rec)
                else:
                    window.append(rec["loss"])
                    for key in ("loss_instance", "loss_prior", "loss_main", "loss_mix"):
                        if rec.get(key) is not None:
                            parts.setdefault(key, []).append(rec[key])
                    good = rec
                if step < last and self._budget_spent():  # train.max_time: this is the last
                    last = self._end_early(step, "time budget")
                if hasattr(bar, "set_postfix"):
                    left = {} if self.budget is None else {
                        "left": format_duration(self.budget.remaining)}  # fmt: skip
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", **left)
                if window and (step % tc.log_every == 0 or step == last):
                    elapsed = max(time.perf_counter() - tick, 1e-9)
                    n = len(window) * tc.batch_size * tc.grad_accum
                    mean = sum(window) / len(window)
                    extra = {"step": step, "loss": mean, "imgs_per_s": n / elapsed, **self._extra()}
                    extra.update({key: sum(v) / len(v) for key, v in parts.items()})
                    record = {**good, **extra}
                    self._log(record)
                    if plain:
                        since = time.perf_counter() - start_time
                        left_s = None if self.budget is None else self.budget.remaining
                        line = log_line(record, last, since, start_step, time_left=left_s)
                        print(line, flush=True)
                    window, parts, tick = [], {}, time.perf_counter()
                if tc.sample_every and step % tc.sample_every == 0:
                    result.grids += self._grids()
                if tc.val_every and (step % tc.val_every == 0 or step == last):
                    if record := self._validation():  # {} on ranks other than 0
                        result.validation.append(record)
                    if self._early_stop("val") and step < last:
                        last = self._end_early(step, "early stopping")
                if tc.eval_every and (step % tc.eval_every == 0 or step == last):
                    if record := self._periodic_eval():  # {} on ranks other than 0
                        result.evals.append(record)
                    if self._early_stop("eval") and step < last:
                        last = self._end_early(step, "early stopping")
                saved = (tc.save_every and step % tc.save_every == 0) or step == last
                if saved:
                    self.save()
                if self._stopping(stop) and step < last:  # Ctrl-C / SIGTERM: save and stop
                    if not saved:
                        self.save()
                    raise TrainingInterrupted(step, stop[0], self.run_dir)
                if step >= last:  # the time budget or early stopping ended the run here
                    break
        if hasattr(bar, "close"):
            bar.close()
        result.step, result.final_loss = self.step, self.last_loss
        result.stop_reason = self.stop_reason or "max_steps"
        if main:
            spent = self.budget.elapsed if self.budget is not None else None
            print(self._summary(start_step, time.perf_counter() - start_time, spent), flush=True)
        result.ema_updates = self.ema.num_updates
        if result.skipped_steps and main:  # never silent: a skipped step trained nothing
            shown = ", ".join(map(str, result.skipped_steps[:10]))
            more = len(result.skipped_steps) - 10
            warnings.warn(
                f"on_nonfinite=skip skipped {len(result.skipped_steps)} of "
                f"{len(result.losses)} steps for a non-finite loss or gradient (step "
                f"{shown}{f' and {more} more' if more > 0 else ''}; see metrics.jsonl)",
                stacklevel=2,
            )
        return result

    def _summary(self, start_step: int, seconds: float, spent: float | None) -> str:
        """The run's last line: steps, time, last loss, why it stopped, where it is."""
        total = f", {format_duration(spent)} in all" if spent is not None else ""
        best = ""
        if self.early is not None and self.early.best_step >= 0:
            best = (f"; best {self.cfg.train.early_stop_metric} {self.early.best:.4g} at step "
                    f"{self.early.best_step} ({self.run_dir / BEST_FILE})")  # fmt: skip
        return (
            f"done: step {self.step} ({self.step - start_step} this session in "
            f"{format_duration(seconds)}{total}); last loss {self.last_loss:.4f}; stopped "
            f"by {self.stop_reason or 'max_steps'}{best}; run in {self.run_dir}"
        )

    def _end_early(self, step: int, reason: str) -> int:
        """This step is the run's last (time budget, early stopping): the post-hoc EMA gets
        its final snapshot here, as at ``max_steps``; returns the new last step."""
        self.stop_reason = reason
        ph = self.posthoc
        if ph is not None and ph.write and step % ph.config.every:
            ph.snapshot(step)
        return step

    def _budget_spent(self) -> bool:
        """Whether ``train.max_time`` is used up (every rank agrees, as rank 0 says)."""
        if self.budget is None:
            return False
        flag = torch.tensor([float(self.budget.exhausted)], device=self.device)
        if self.dist.distributed:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _early_stop(self, kind: str) -> bool:
        """Early stopping after a validation (``kind="val"``) or periodic evaluation: keep
        the best EMA weights; True when patience ran out (every rank agrees)."""
        metric = self.cfg.train.early_stop_metric
        if self.early is None or metric.startswith("val") != (kind == "val"):
            return False
        flag = torch.zeros(1, device=self.device)
        if self.dist.is_main:
            record = self._last_records.get(kind, {})
            if metric not in record:
                raise ValueError(
                    f"train.early_stop_metric={metric!r} is not among the measured metrics "
                    f"({', '.join(k for k in record if k not in ('step', 'event'))}); add it "
                    "to train.eval_metrics or choose another"
                )
            improved, stop = self.early.update(float(record[metric]), self.step)
            if improved:
                from safetensors.torch import save_file

                tmp = self.run_dir / (BEST_FILE + ".tmp")
                meta = {"step": str(self.step), metric: repr(self.early.best)}
                save_file(self.ema.state_dict(), str(tmp), metadata=meta)
                os.replace(tmp, self.run_dir / BEST_FILE)
            flag[0] = float(stop)
        if self.dist.distributed:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _stopping(self, stop: list[int]) -> bool:
        """Whether a stop signal arrived on any rank (every rank stops after the same step)."""
        if not self.dist.distributed:
            return bool(stop)
        flag = torch.tensor([float(bool(stop))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not stop:
            stop.append(int(signal.SIGTERM))
        return bool(flag.item())

    def _report_compile(self, step: int, seconds: float) -> None:
        """Log (once) how long the first compiled step took, compilation included."""
        cache = self.run_dir / COMPILE_CACHE
        self._log({"step": step, "event": "compile", "seconds": seconds, "cache": str(cache)})
        if self.dist.is_main:
            print(
                f"train.compile: the first step took {seconds:.1f} s, compilation included "
                f"(inductor cache {cache})",
                flush=True,
            )

    def _warn_config_changes(self) -> None:
        """Resuming with a different config is allowed (e.g. more steps) but is worth a word."""
        path = self.run_dir / "config.yaml"
        if not path.is_file():
            return
        try:  # through today's config: keys a newer difflab added, at their defaults, are
            # not changes (a run written before ``diffusion.formulation`` existed, say)
            old = _flat(load_config(path).to_dict())
        except (ValueError, TypeError, OSError):  # a config today's code no longer reads
            old = _flat(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        new = _flat(self.cfg.to_dict())
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            warnings.warn(f"resuming with changed config keys: {', '.join(changed)}", stacklevel=3)

    def _extra(self) -> dict[str, Any]:
        return {
            "epoch": self.stream.epoch,
            "ema_decay": self.ema.current_decay,
            "ema_updates": self.ema.num_updates,
        }

    def _log(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.log(record)

    def _prompt_encoder(self, net: nn.Module) -> Any:
        """``prompts -> (context, mask)`` for sampling ``net`` (None without text)."""
        if self.frozen_text is not None:
            if self.frozen_text.words:  # the word vector of the network being sampled
                (token,) = self.frozen_text.words
                return self.frozen_text.with_words({token: getattr(net, WORD_PARAM)})
            return self.frozen_text
        if self.tokenizer is not None:
            return PromptEncoder(net, self.tokenizer)  # type: ignore[arg-type]
        return None

    def _grids(self) -> list[Path]:
        if not self.dist.is_main:
            return []
        out = []
        for name, net in (("raw", self.model), ("ema", self.ema.model)):
            path = self.run_dir / "samples" / f"step_{self.step:06d}_{name}.png"
            out.append(
                sample_grid(
                    net,
                    self.cfg,
                    self.schedule,
                    path,
                    device=self.device,
                    null_label=self.null_label,
                    prompts=self.grid_prompts,
                    text_encoder=self._prompt_encoder(net),
                    vae=self.vae,
                    formulation=self.formulation,
                )
            )
        return out

    def _validation(self) -> dict[str, Any]:
        """Validation loss of the raw and EMA weights (rank 0), logged to metrics.jsonl."""
        if not self.dist.is_main or self.val_set is None:
            return {}
        tc = self.cfg.train
        record: dict[str, Any] = {"step": self.step, "event": "validation"}
        with torch.random.fork_rng(devices=[]):
            for key, net in (("val_loss", self.model), ("val_loss_ema", self.ema.model)):
                record[key] = validation_loss(
                    net,
                    self.val_set,
                    self.schedule,
                    self.cfg.diffusion,
                    timesteps=tc.val_timesteps,
                    seed=_subseed(self.cfg.seed, 51),
                    batch_size=tc.batch_size,
                    null_label=self.null_label,
                    device=self.device,
                    prepare=self._validation_inputs,
                )
        self._log(record)
        self._last_records["val"] = record
        return record

    @torch.no_grad()
    def _validation_inputs(
        self, images: Tensor, items: list[dict[str, Any]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Model inputs of validation items: posterior-mean latents for latent runs, the
        true captions for text runs (deterministic, unlike training's draws)."""
        x0 = images if self.vae is None else self.vae.latents(images)  # posterior means
        if not self.cfg.text.enabled:
            return x0, {}
        return x0, self._text_cond([str(it["text"]) for it in items], x0.device)

    def _periodic_eval(self) -> dict[str, Any]:
        """Score ``train.eval_n`` EMA samples (``difflab.eval.periodic_eval``) and log them.

        Rank 0 only; samples use the run's ``sample:`` defaults and the run seed, inside a
        forked RNG so evaluating never changes the training run.
        """
        if not self.dist.is_main:
            return {}
        from ..eval.sweep import PromptedPipeline, periodic_eval, text_run_prompts
        from ..pipeline import Pipeline

        tc, mcfg = self.cfg.train, self.cfg.model_config()
        if self._eval_extractor is None and tc.eval_inception_weights is not None:
            from ..eval.features import InceptionV3Features

            self._eval_extractor = InceptionV3Features(
                tc.eval_inception_weights, device=self.device
            )
        net = self.ema.model
        was_training = net.training
        pipe = Pipeline(
            net,
            self.schedule,
            prediction=self.cfg.diffusion.prediction,
            variance=self.cfg.diffusion.variance,
            image_shape=(mcfg.in_channels, mcfg.image_size, mcfg.image_size),
            num_classes=mcfg.num_classes,
            context_dim=mcfg.context_dim,
            sample_defaults=dataclasses.asdict(self.cfg.sample),
            text_encoder=self._prompt_encoder(net),
            device=self.device,
            vae=self.vae,  # latent runs are scored on decoded images
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
        record = {"step": self.step, "event": "eval"}
        record.update(
            {k: v for k, v in scores.items() if isinstance(v, (int, float, str)) and k != "step"}
        )
        self._log(record)
        self._last_records["eval"] = record
        return record

    def close(self) -> None:
        """Close logs, the data loader's workers and the process group this trainer created."""
        self.stream.close()
        if self.log is not None:
            self.log.close()
        self._exit.close()
        teardown_distributed(self.dist)


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


def _match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded optimiser state tensor its parameter's memory format (strides).

    ``load_state_dict`` leaves the moments contiguous; with channels-last parameters the
    fused element-wise update then runs in another order and the first step after a resume
    differs in the last bits from the uninterrupted run.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, value in state.items():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    if value.stride() != p.stride():
                        state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _subseed(seed: int, stream: int) -> int:
    """Distinct, reproducible generator seeds for the trainer's independent streams."""
    return (seed * 1_000_003 + 7919 * stream) % (2**63)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _finite(x: Tensor) -> Tensor:
    return torch.isfinite(x).float()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """While training: SIGINT (Ctrl-C) and SIGTERM append their number to the yielded list,
    which the loop reads after each step (then saves and stops); a second Ctrl-C interrupts
    at once.  The previous handlers come back on exit; off the main thread, nothing changes."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum: int, frame: Any) -> None:
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)
        name = signal.Signals(signum).name
        note = f"\n{name}: saving a checkpoint after this step (Ctrl-C again stops at once)\n"
        with contextlib.suppress(OSError, ValueError, AttributeError):  # e.g. no real stderr
            os.write(sys.stderr.fileno(), note.encode())

    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for sig, old in before.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _preserve_global_rng() -> Iterator[None]:
    """Restore torch's global RNG state (CPU and every CUDA device) on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def train(
    config: TrainConfig,
    *,
    dataset: Dataset | None = None,
    model: nn.Module | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> TrainResult:
    """Train a diffusion model as ``config`` says; works alone and under ``torchrun``.

    :param config: the run (``load_config(path, overrides)``); the resolved config is written
        to ``run_dir/config.yaml``.
    :param dataset: data set of dicts; default ``difflab.data.build_dataset(config.data)``.
    :param model: a network honouring the contract; default the config's U-Net.
    :param resume: continue from ``run_dir``'s checkpoint bit for bit (fresh start if none).
    :param progress: progress bar on/off; None: on when stderr is a terminal.
    :raises NonFiniteError: on a NaN/inf loss or gradient with ``on_nonfinite: stop``.
    :raises TrainingInterrupted: on Ctrl-C or SIGTERM, after saving the step it stopped at.
    """
    with _preserve_global_rng():
        trainer = Trainer(config, dataset=dataset, model=model, progress=progress)
        try:
            return trainer.run(resume=resume)
        finally:
            trainer.close()
