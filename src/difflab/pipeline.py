"""``Pipeline``: a trained run directory turned back into a sampler of images.

Owns reading a run (``config.yaml`` + ``ema.safetensors`` / ``model.safetensors``),
rebuilding the U-Net and the ``NoiseSchedule`` it was trained with, checking that the
checkpoint matches the architecture, and the conditioning plumbing of a call (class labels,
the null label for classifier-free guidance, prompts).  The sampling itself is
``difflab.samplers.sample``; this module knows no sampler maths.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formulations import FormulationSchedule, formulation_from_config
from .runs import load_weights, read_run_config, weights_file
from .samplers.api import Img2ImgResult
from .schedules import NoiseSchedule

if TYPE_CHECKING:
    from .models.vae import AutoencoderKL

__all__ = ["Pipeline", "load_weights", "read_run_config"]

TextEncoder = Callable[[list[str]], tuple[Tensor, Tensor | None]]


def _build_model(cfg: Mapping[str, Any], run_dir: Path) -> tuple[nn.Module, Any, Any]:
    """The run's network (a ``TextConditionedUNet`` for a text run), its tokenizer, and the
    prompt encoder whose adapted text models the network holds (``finetune.text_encoder``;
    else None)."""
    from .models import build_model, model_config_from_dict
    from .models.text import (
        TOKENIZER_FILE,
        TextConditionedUNet,
        TextConfig,
        TextTransformer,
        WordTokenizer,
    )

    unet = build_model(model_config_from_dict(cfg["model"]))  # model.arch: unet | dit
    text = TextConfig(**(cfg.get("text") or {}))
    model: nn.Module = unet
    tokenizer = None
    if text.encoder == "transformer":
        tokenizer = WordTokenizer.load(run_dir / TOKENIZER_FILE)
        model = TextConditionedUNet(unet, TextTransformer(len(tokenizer), text))
    ft = cfg.get("finetune") or {}
    if text.pretrained and ft.get("new_word") is not None:  # a word for the frozen encoder
        from .finetune.inversion import attach_word_vector

        attach_word_vector(unet, torch.zeros(text.context_dim))
    if ft.get("base_run") is not None and ft.get("targets") != "none":  # weights hold adapters
        from .finetune import add_lora

        add_lora(
            model, ft["rank"], ft.get("alpha"), ft["targets"], kind=ft.get("adapter", "lora"),
            rslora=ft.get("rslora", False), dora=ft.get("dora", False),
            factor=ft.get("lokr_factor", -1), generator=torch.Generator(),  # weights follow
        )  # fmt: skip
    encoder = None
    if ft.get("text_encoder"):  # adapters on the CLIP encoder(s), held by the network
        from .finetune.text_encoder import add_text_adapters
        from .interop.sd_text_train import training_text_encoder

        image_size = int((cfg.get("data") or {}).get("image_size") or 0)
        vector_dim = getattr(unet.config, "vector_dim", None)
        encoder = training_text_encoder(text, None, image_size=image_size, vector_dim=vector_dim)
        add_text_adapters(
            unet, encoder, ft["rank"], ft.get("alpha"), kind=ft.get("adapter", "lora"),
            rslora=ft.get("rslora", False), dora=ft.get("dora", False),
            factor=ft.get("lokr_factor", -1), generator=torch.Generator(),  # weights follow
        )  # fmt: skip
    return model, tokenizer, encoder


class Pipeline:
    """A trained model with its schedule and sampling defaults: ``pipe(n, class_labels, ...)``.

    :param model: a network honouring ``model(x_t, t, class_labels=, context=, ...)``.
    :param schedule: the schedule it was trained with.
    :param prediction: eps | x0 | v.
    :param variance: fixedsmall | fixedlarge | learned | learned_range.
    :param image_shape: ``(C, H, W)`` of one sample.
    :param num_classes: ``None`` for an unconditional model; the null label is this value.
    :param sample_defaults: ``sampler``, ``steps``, ``guidance_scale`` used when a call omits them.
    :param text_encoder: ``prompts -> (context [B, L, D], mask [B, L] | None)`` for a
        text-conditional model.
    :param vae: for latent diffusion, the autoencoder whose latents the model samples
        (``image_shape`` is then the latent's); calls return its decoded images.
    :param scheduler_config: a diffusers ``scheduler_config.json`` (models loaded with
        :meth:`from_pretrained`): a sampler named without a spacing then walks the timesteps
        diffusers' scheduler for that sampler would (``interop.scheduler.sampling_plan``), so
        the same sampler name gives the same images as diffusers.
    :param formulation: ``"edm"``, ``"flow"`` or a ``difflab.formulations`` object for
        networks trained in those formulations (the run's ``diffusion.formulation``); the
        schedule is then the formulation's sampling table.  None / ``"ddpm"``: the default.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        *,
        prediction: str = "eps",
        variance: str = "fixedsmall",
        image_shape: tuple[int, int, int],
        num_classes: int | None = None,
        context_dim: int | None = None,
        sample_defaults: Mapping[str, Any] | None = None,
        text_encoder: TextEncoder | None = None,
        run_dir: str | None = None,
        weights: str | None = None,
        device: torch.device | str | None = None,
        vae: AutoencoderKL | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        formulation: Any = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.vae = None if vae is None else vae.to(self.device).eval()
        self.schedule = schedule
        self.prediction = prediction
        self.variance = variance
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.sample_defaults: dict[str, Any] = {
            "sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 1.0
        }
        self.sample_defaults.update(
            {k: v for k, v in (sample_defaults or {}).items() if k in self.sample_defaults}
        )
        self.text_encoder = text_encoder
        self.run_dir = run_dir
        self.weights = weights
        self.loras: list[dict[str, Any]] = []  # adapters applied by load_lora (PNG params)
        self.embeddings: list[dict[str, Any]] = []  # words added by load_embedding
        self.dtype = torch.float32  # the networks' weights (Pipeline.to changes it)
        self.scheduler_config = None if scheduler_config is None else dict(scheduler_config)
        self._adapters: Any = None  # an SD model's AdapterSet, built by the first load_lora
        # edm / flow networks (difflab.formulations; None: ddpm) and their sampling table
        self.formulation = formulation_from_config(formulation)
        if self.formulation is not None and not isinstance(schedule, FormulationSchedule):
            self.schedule = self.formulation.schedule

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ) -> Pipeline:
        """Move the networks to ``device`` and/or cast their weights to ``dtype``.

        ``dtype`` is a float dtype or its name: ``"fp32"``, ``"bf16"``, ``"fp16"``.  Half
        precision roughly halves sampling time and memory on GPUs; the samplers keep their
        state and update arithmetic in float32 and only the network runs in ``dtype``
        (``dl.sample(model_dtype=...)``).  A pretrained text encoder stays in float32 and its
        output is cast.  Returns ``self``.
        """
        if dtype is not None:
            self.dtype = _resolve_dtype(dtype)
        if device is not None:
            self.device = torch.device(device)
        self.model.to(self.device, self.dtype)
        if self.vae is not None:
            self.vae.to(self.device, self.dtype)
        return self

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        weights: str = "ema",
        device: torch.device | str | None = None,
        *,
        text_encoder: TextEncoder | None = None,
    ) -> Pipeline:
        """Rebuild model and schedule from ``run_dir/config.yaml`` and load the weights.

        :param weights: ``"ema"`` (``ema.safetensors``, default), ``"raw"``
            (``model.safetensors``), or another weights file of the run by name, e.g. a
            post-hoc EMA reconstruction ``"ema_sigma0.050"`` (``difflab ema``).
        :param text_encoder: for a text run, defaults to the run's own encoder and
            ``tokenizer.json`` (``difflab.models.PromptEncoder``).
        :raises FileNotFoundError: no such run directory, config or weights file.
        :raises ValueError: the checkpoint does not fit the configured architecture.
        """
        cfg = read_run_config(run_dir)
        path = weights_file(Path(run_dir), weights)
        text_cfg = cfg.get("text") or {}
        own_text = text_encoder is None  # built here from the run's files
        vae = None
        # The networks' random initialisation is overwritten by the loaded weights; it must
        # not draw from (and so change) the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            model, tokenizer, adapted_text = _build_model(cfg, Path(run_dir))
            load_weights(model, path)
            if text_encoder is None and adapted_text is not None:  # finetune.text_encoder
                text_encoder = adapted_text
            vae_path = (cfg.get("latent") or {}).get("vae")
            if vae_path is not None:
                from .models.vae import AutoencoderKL

                vae = AutoencoderKL.from_pretrained(vae_path)
            if text_encoder is None and tokenizer is not None:
                from .models.text import PromptEncoder

                text_encoder = PromptEncoder(model, tokenizer)  # type: ignore[arg-type]
            elif text_encoder is None and text_cfg.get("encoder") == "sdxl":
                from .interop.sd_text_train import SDXLTrainingText

                unet_cfg: Any = model.config
                text_encoder = SDXLTrainingText(
                    text_cfg["path"], device, vector_dim=unet_cfg.vector_dim,
                    image_size=unet_cfg.image_size * (vae.config.downsample_factor if vae else 1),
                )  # fmt: skip
            elif text_encoder is None and text_cfg.get("encoder") in ("clip", "t5"):
                from .models.text import PretrainedTextEncoder

                text_encoder = PretrainedTextEncoder(
                    text_cfg["path"], text_cfg.get("max_length", 77), device,
                    kind=text_cfg["encoder"], mask_padding=text_cfg.get("mask_padding", True),
                )  # fmt: skip
            word = (cfg.get("finetune") or {}).get("new_word")
            if own_text and word is not None and text_cfg.get("encoder") in ("clip", "t5"):
                from .finetune.inversion import WORD_PARAM  # a textual-inversion run's word

                text_encoder.add_word(word, getattr(model, WORD_PARAM).detach())  # type: ignore[union-attr]
        diffusion = cfg.get("diffusion") or {}
        schedule = NoiseSchedule.from_config(diffusion.get("schedule", {"name": "cosine"}))
        formulation = formulation_from_config(
            diffusion.get("formulation", "ddpm"), diffusion.get("formulation_options")
        )
        mc: Any = model.config  # a UNetConfig or DiTConfig
        return cls(
            model,
            schedule,
            prediction=diffusion.get("prediction", "eps"),
            variance=diffusion.get("variance", "fixedsmall"),
            image_shape=(mc.in_channels, mc.image_size, mc.image_size),
            num_classes=mc.num_classes,
            context_dim=mc.context_dim,
            sample_defaults=cfg.get("sample") or {},
            text_encoder=text_encoder,
            run_dir=str(run_dir),
            weights=weights,
            device=device,
            vae=vae,
            formulation=formulation,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        tokenizer: str | Path | None = None,
        prediction: str | None = None,
        weights: str = "ema",
    ) -> Pipeline:
        """A difflab run, a diffusers Stable Diffusion folder (``model_index.json``) or an
        original single ``.safetensors`` checkpoint (SD 1.x, 2.x, SDXL), from a local path.

        SD models run on difflab's own U-Net and autoencoder (so LoRA, channels-last and
        difflab's speed work apply) with their text encoders from ``transformers``; the
        folder's scheduler config decides the timesteps of each sampler as in diffusers.

        :param dtype: ``"fp32"`` (default), ``"bf16"``, ``"fp16"`` or a torch dtype.
        :param tokenizer: single files only: a local folder with the tokenizer(s) (e.g. a
            diffusers folder of the same family).
        :param prediction: override the prediction type (an SD 2.x single file needs it).
        :param weights: difflab runs only: ``"ema"`` or ``"raw"``.
        """
        from .interop.sd import load_stable_diffusion, path_kind

        if path_kind(path) == "run":
            pipe = cls.from_run(path, weights=weights, device=device)
            return pipe if dtype is None else pipe.to(dtype=dtype)
        parts = load_stable_diffusion(path, tokenizer=tokenizer, prediction=prediction)
        from .interop.scheduler import default_sampler, schedule_from_diffusers

        f = int(parts.vae.config.downsample_factor)
        latent = parts.image_size // f
        pipe = cls(
            parts.unet,
            schedule_from_diffusers(parts.scheduler),
            prediction=parts.prediction,
            image_shape=(int(parts.unet.config.in_channels), latent, latent),
            context_dim=parts.unet.config.context_dim,
            sample_defaults={"sampler": default_sampler(parts.scheduler), **parts.sample_defaults},
            text_encoder=parts.conditioner,
            run_dir=str(path),
            device=device,
            vae=parts.vae,
            scheduler_config=parts.scheduler,
        )
        return pipe if dtype is None else pipe.to(dtype=dtype)

    def compile(self) -> Pipeline:
        """``torch.compile`` the network in place (``nn.Module.compile``): every model call of
        the sampling loop then runs one compiled graph, built at the first call (and again
        for a new batch size or dtype).  The module, its weights and its parameter names
        stay what they were.  Returns ``self``."""
        self.model.compile()
        return self

    def load_lora(self, path: str | Path, scale: float = 1.0, *, strict: bool = True) -> Any:
        """Apply a LoRA adapter file (``difflab.finetune.load_lora``) at strength ``scale``.

        Loud by default: every adapted module must exist with matching shapes, or nothing
        is applied and the ValueError lists what did not fit. Returns the load report.
        """
        from .finetune import load_lora

        sd = self._sd_adapters()
        if sd is not None:  # kohya / LyCORIS / diffusers-PEFT files on an SD model
            report = sd.load(path, scale=scale, strict=strict)
            applied = len(report.applied)
            for encoder in self.text_encoder.encoder.models:  # type: ignore[union-attr]
                encoder.to(self.device)
        else:
            report = load_lora(self.model, path, scale=scale, strict=strict)
            applied = len(report.applied)
        self.model.to(self.device, self.dtype)  # the adapter's weights join the network's
        self.loras.append({"path": str(path), "scale": float(scale), "layers": applied})
        return report

    def _sd_adapters(self) -> Any:
        """The ``AdapterSet`` over an SD model's U-Net and text encoders (adapter files name
        their modules the diffusers / transformers way, or the original ldm way for SDXL's
        U-Net); ``None`` for a difflab run."""
        from .interop.sd import SDConditioner

        if not isinstance(self.text_encoder, SDConditioner):
            return None
        if self._adapters is None:
            from .finetune.lycoris import AdapterSet, AdapterTarget
            from .interop.unet import diffusers_module_map, ldm_module_map

            cfg: Any = self.model.config  # an SD model's UNetConfig
            names = {**diffusers_module_map(cfg), **ldm_module_map(cfg)}
            targets: dict[str, Any] = {"unet": AdapterTarget(self.model, names)}
            models = list(self.text_encoder.encoder.models)
            keys = ["text_encoder", "text_encoder_2"]
            if len(models) == 1 and self.text_encoder.family == "sdxl":  # the refiner
                keys = ["text_encoder_2"]
            targets.update(zip(keys, models))
            self._adapters = AdapterSet(targets)
        return self._adapters

    def load_embedding(self, path: str | Path) -> str:
        """Add a textual-inversion word (``difflab.finetune.inversion``) to this text run's
        vocabulary and token table; returns the word. Loud: a foreign file, a width that does
        not fit or a word already known raises."""
        from .finetune.inversion import load_embedding, read_word_vector
        from .interop.sd import SDConditioner
        from .models.text import PretrainedTextEncoder, PromptEncoder

        if isinstance(self.text_encoder, SDConditioner):  # A1111 / diffusers embeddings
            from .interop.text import load_embedding as load_sd_embedding

            word = load_sd_embedding(self.text_encoder.encoder, path)
            self.embeddings.append({"path": str(path), "word": word})
            return word

        if isinstance(self.text_encoder, PretrainedTextEncoder):  # a frozen CLIP / T5
            word, vector = read_word_vector(path)
            self.text_encoder.add_word(word, vector.to(self.device))
            self.embeddings.append({"path": str(path), "word": word})
            return word
        if not isinstance(self.text_encoder, PromptEncoder):
            raise ValueError(
                "embeddings extend a text run (text.encoder: transformer, clip or t5); this "
                "pipeline has no text encoder"
            )
        before = set(self.text_encoder.tokenizer.vocab)
        tokenizer = load_embedding(self.model, self.text_encoder.tokenizer, path)  # type: ignore[arg-type]
        self.text_encoder.tokenizer = tokenizer
        self.model.to(self.device, self.dtype)
        word = next(w for w in tokenizer.vocab if w not in before)
        self.embeddings.append({"path": str(path), "word": word})
        return word

    # ------------------------------------------------------------------ conditioning
    def _labels(self, class_labels: int | Sequence[int] | Tensor | None, n: int) -> Tensor | None:
        if class_labels is None:
            return None
        if self.num_classes is None:
            if self.context_dim is not None:
                raise ValueError(
                    "class_labels given, but this model is conditioned on text, not class "
                    "labels (num_classes=None); pass prompt= instead"
                )
            raise ValueError(
                "class_labels given, but this model is unconditional (num_classes=None)"
            )
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if labels.numel() == 1 and n != 1:
            labels = labels.expand(n)
        if labels.numel() != n:
            raise ValueError(f"got {labels.numel()} class labels for n={n} images")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(
                f"class labels must lie in 0..{self.num_classes - 1}, got {bad.tolist()[:5]}"
            )
        return labels

    def _guidance(self, guidance_scale: float | None, conditional: bool) -> float:
        if guidance_scale is None:  # the run's default, only meaningful with a condition
            return float(self.sample_defaults["guidance_scale"]) if conditional else 1.0
        scale = float(guidance_scale)
        if scale != 1.0 and self.num_classes is None and self.context_dim is None:
            raise ValueError(
                f"guidance_scale={scale} needs a conditional model, but this model is "
                "unconditional; use guidance_scale=1 (no classifier-free guidance)"
            )
        if scale != 1.0 and not conditional:
            raise ValueError(
                f"guidance_scale={scale} needs a condition: pass class_labels or a prompt"
            )
        return scale

    def _clip_skip(self, clip_skip: int | None) -> int | None:
        """A1111's "Clip skip" (1 = the text encoder's last layer, 2 = the one before, ...),
        checked; only Stable Diffusion's CLIP encoders take it."""
        if clip_skip is None:
            return None
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
            raise ValueError(f"clip_skip must be an integer >= 1 (A1111's), got {clip_skip!r}")
        if not hasattr(self.text_encoder, "clip_skip"):
            raise ValueError("clip_skip applies to Stable Diffusion's CLIP text encoders only")
        return clip_skip

    def _negative_labels(
        self, negative_class: int | Sequence[int] | Tensor | None, n: int
    ) -> Tensor | None:
        if negative_class is None:
            return None
        if self.num_classes is None:
            raise ValueError(
                "negative_class given, but this model has no class conditioning "
                "(num_classes=None); a text model takes negative_prompt="
            )
        return self._labels(negative_class, n)

    @staticmethod
    def _prompts(prompt: str | Sequence[str] | None, n: int, what: str) -> list[str] | None:
        if prompt is None:
            return None
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{what} must be a string or {n} strings (one per image)")
        return prompts

    def _conditioning(
        self,
        labels: Tensor | None,
        prompt: str | Sequence[str] | None,
        n: int,
        negative_prompt: str | Sequence[str] | None = None,
        negative_labels: Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(cond, uncond)`` keyword conditioning of one call: the class labels or prompt
        embeddings, and the unconditional side of classifier-free guidance (the null label
        or the empty prompt, unless a negative class / negative prompt replaces them)."""
        cond: dict[str, Any] = {}
        uncond: dict[str, Any] = {}
        if labels is not None:
            cond["class_labels"] = labels.to(self.device)
            null = torch.full_like(cond["class_labels"], self.num_classes)  # type: ignore[arg-type]
            negative = null if negative_labels is None else negative_labels.to(self.device)
            uncond["class_labels"] = negative
        elif negative_labels is not None:
            raise ValueError("negative_class needs class_labels for the positive side")
        negatives = self._prompts(negative_prompt, n, "negative_prompt")
        if prompt is None and negatives is not None:
            raise ValueError("negative_prompt needs a prompt for the positive side")
        if prompt is not None:
            if self.context_dim is None:
                raise ValueError(
                    "a prompt was given, but this model has no text conditioning "
                    "(context_dim=None); use class_labels or an unconditional call"
                )
            if self.text_encoder is None:
                raise ValueError(
                    "this model is text-conditional but the Pipeline has no text_encoder; "
                    "pass text_encoder= to Pipeline.from_run"
                )
            prompts = self._prompts(prompt, n, "prompt")
            assert prompts is not None
            unknown = getattr(getattr(self.text_encoder, "tokenizer", None), "unknown_words", None)
            seen = prompts + (negatives or [])
            if unknown is not None and unknown(seen):
                warnings.warn(
                    f"words never seen in the training captions: {', '.join(unknown(seen))} "
                    "(each is encoded as <unk>)",
                    stacklevel=3,
                )
            rich = getattr(self.text_encoder, "conditioning", None)
            if rich is not None:  # an encoder that builds whole keyword dicts (SD, SDXL)
                pos, neg = rich(prompts, negatives, size=size)
            else:
                ctx, mask = self.text_encoder(prompts)
                empty, empty_mask = self.text_encoder(negatives or [""] * n)
                pos, neg = {"context": ctx}, {"context": empty}
                if mask is not None and empty_mask is not None:
                    pos["context_mask"], neg["context_mask"] = mask, empty_mask
            cond.update(self._on_device(pos))
            uncond.update(self._on_device(neg))
        elif self.context_dim is not None:
            raise ValueError("this model is text-conditional: pass prompt=")
        return cond, uncond

    def _on_device(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Conditioning tensors on the pipeline's device; floating ones in its dtype."""
        return {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in tensors.items()
        }

    # ------------------------------------------------------------------ sampling
    def resolve_params(
        self,
        n: int = 16,
        class_labels: int | Sequence[int] | Tensor | None = None,
        prompt: str | Sequence[str] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        spacing: str | None = None,
        clip_x0: bool | None = None,
        *,
        eta: float | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        apg: Mapping[str, float] | None = None,
        strength: float | None = None,
        inpaint: bool = False,
        negative_prompt: str | Sequence[str] | None = None,
        negative_class: int | Sequence[int] | Tensor | None = None,
        size: tuple[int | None, int | None] | None = None,
        custom_noise: bool = False,
        clip_skip: int | None = None,
        **sampler_options: Any,
    ) -> dict[str, Any]:
        """Every parameter a call would use, defaults filled in (JSON-able; for PNG chunks).

        ``size`` is the ``(height, width)`` in pixels of the images (``None``: the model's
        own); ``custom_noise`` records that the caller passed the initial ``noise``."""
        from ._version import __version__
        from .samplers import SAMPLERS
        from .samplers.guidance import check_apg_options, check_guidance_interval

        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        labels = self._labels(class_labels, n)
        negative_labels = self._negative_labels(negative_class, n)
        negatives = self._prompts(negative_prompt, n, "negative_prompt")
        scale = self._guidance(guidance_scale, labels is not None or prompt is not None)
        name = sampler if sampler is not None else str(self.sample_defaults["sampler"])
        spec, implied = SAMPLERS.resolve(name)
        interval = check_guidance_interval(guidance_interval)
        height, width = self.pixel_size(size)
        skip = self._clip_skip(clip_skip)
        return {
            "run": self.run_dir,
            "weights": self.weights,
            "sampler": name,
            "steps": int(steps if steps is not None else self.sample_defaults["steps"]),
            "spacing": spacing or implied or spec.default_spacing,
            **self._recorded_plan(name, steps, spacing),
            "guidance_scale": scale,
            "guidance_rescale": float(guidance_rescale),
            "guidance_interval": None if interval is None else list(interval),
            "apg": None if apg is None else check_apg_options(apg),
            "eta": eta,
            **({"sampler_options": dict(sampler_options)} if sampler_options else {}),
            **({"strength": float(strength)} if strength is not None else {}),
            **({"inpaint": True} if inpaint else {}),
            "clip_x0": self._clip_x0(clip_x0),
            "seed": int(seed),
            "n": n,
            "class_labels": None if labels is None else labels.tolist(),
            "prompt": prompt if prompt is None or isinstance(prompt, str) else list(prompt),
            **({"negative_prompt": _one_or_all(negatives)} if negatives is not None else {}),
            **(
                {"negative_class": negative_labels.tolist()} if negative_labels is not None else {}
            ),
            "size": [height, width],
            **({"clip_skip": skip} if skip is not None else {}),
            **({"noise": "custom"} if custom_noise else {}),
            "prediction": self.prediction,
            **({"latent": True} if self.vae is not None else {}),
            **({"lora": self.loras} if self.loras else {}),
            **({"embeddings": self.embeddings} if self.embeddings else {}),
            **({"dtype": _dtype_name(self.dtype)} if self.dtype != torch.float32 else {}),
            "schedule": self.schedule.to_config(),
            "difflab_version": __version__,
        }

    @torch.no_grad()
    def __call__(
        self,
        n: int = 16,
        class_labels: int | Sequence[int] | Tensor | None = None,
        prompt: str | Sequence[str] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        progress: bool | None = None,
        *,
        spacing: str | None = None,
        clip_x0: bool | None = None,
        eta: float | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        apg: Mapping[str, float] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_class: int | Sequence[int] | Tensor | None = None,
        noise: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        clip_skip: int | None = None,
        callback: Callable[[int, float, Tensor, Tensor | None], None] | None = None,
        **sampler_options: Any,
    ) -> Tensor:
        """Draw ``n`` images ``[n, C, H, W]`` in [-1, 1].

        ``negative_prompt`` (one string or one per image) replaces the empty prompt on the
        unconditional side of classifier-free guidance, and ``negative_class`` the null
        label of a class model: guidance then pushes away from them.  ``noise`` is the
        initial state ``[n, *image_shape]`` (unit variance; latents for a latent model) instead
        of the seeded draw; ancestral samplers still draw their later noise from the seeds.
        ``height`` / ``width`` choose another image size in pixels (multiples of the
        network's and autoencoder's downsampling), for models that allow it.  ``clip_skip``
        is A1111's "Clip skip" for SD models (1 = the text encoder's last layer, 2 = the
        layer before it, ...; diffusers' ``clip_skip`` is this minus one).
        ``callback(i, t, x_t, x0_pred)`` is called after each sampler step (as ``dl.sample``'s).

        Image ``i`` uses its own generator seeded ``seed + i`` (initial and any ancestral noise), so
        it equals the same seed drawn alone. ``class_labels`` (an int or ``n`` ints) conditions a
        class-conditional model; ``None`` samples it unconditionally with the null label.
        ``guidance_scale`` w is classifier-free guidance (Ho & Salimans 2022): ε̃ = ε(∅) + w·(ε(c) -
        ε(∅)), with the null label as ∅; ``None`` takes the run's ``sample.guidance_scale``;
        ``guidance_rescale`` φ (Lin et al. 2023), ``guidance_interval`` (σ_lo, σ_hi)
        (Kynkäänniemi et al. 2024) and ``apg`` (adaptive projected guidance's options, Sadat et
        al. 2025) refine it, and ``eta`` sets the stochasticity of the samplers
        that take it, as in ``dl.sample`` (all recorded by ``resolve_params``, with any other
        sampler options). ``clip_x0`` clips every x̂0 to [-1, 1], the data range, as DDPM's sampler
        does (Ho et al. 2020, Alg. 2 with ``clip_denoised``); without it, ε̂ → x̂0 = (x_t - σ ε̂)/α
        amplifies the model's error by 1/α at the first step (1/α ≈ 2·10⁴ at t = T-1 of the cosine
        schedule) and the samples saturate. ``None`` (default) clips pixel models and leaves latent
        models alone (latents have no fixed range); a latent model's samples are then decoded by its
        autoencoder.
        """
        options = dict(
            eta=eta, guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
            apg=apg, **sampler_options,
        )  # fmt: skip
        args = dict(
            n=n, class_labels=class_labels, prompt=prompt, sampler=sampler, steps=steps,
            guidance_scale=guidance_scale, seed=seed, spacing=spacing, clip_x0=clip_x0,
            negative_prompt=negative_prompt, negative_class=negative_class,
            size=None if height is None and width is None else (height, width),
            clip_skip=clip_skip,
        )  # fmt: skip
        out = self._generate(args, None, None, progress, options, noise=noise, callback=callback)
        return out[0]

    @torch.no_grad()
    def img2img(
        self,
        images: Tensor,
        strength: float,
        class_labels: int | Sequence[int] | Tensor | None = None,
        prompt: str | Sequence[str] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        progress: bool | None = None,
        *,
        spacing: str | None = None,
        clip_x0: bool | None = None,
        eta: float | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        apg: Mapping[str, float] | None = None,
        mask: Tensor | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_class: int | Sequence[int] | Tensor | None = None,
        clip_skip: int | None = None,
        **sampler_options: Any,
    ) -> Img2ImgResult:
        """SDEdit image-to-image (Meng et al. 2022) from ``images`` ``[N, C, H, W]`` in [-1, 1]
        at this run's pixel size (:attr:`pixel_shape`): each is noised to the level of the
        first step kept, then denoised through the last ``int(steps·strength)`` steps of the
        sequence (``dl.img2img``); a latent model noises and denoises the autoencoder's
        latents (posterior means) and decodes the result.  Returns ``Img2ImgResult(images,
        timesteps)``: ``[N, C, H, W]`` in [-1, 1] and the timesteps actually used.  Other
        arguments as in ``__call__``; image ``i`` draws its noise from seed ``seed + i``.

        With ``mask`` (``[N or 1, 1 or C, H, W]`` in [0, 1], 1 = generate, 0 = keep) this is
        inpainting (``dl.sample``'s ``inpaint_mask``, DDNM's x̂0 replacement): the kept
        pixels are reproduced and the hole is generated consistently with them
        (``strength=1`` regenerates the hole from pure noise).  A latent run generates every
        latent cell that touches the hole, then pastes the kept pixels back over the decoded
        images, so they come out exactly.
        """
        if not isinstance(images, Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [N, C, H, W], got {got}")
        c, h, w = images.shape[1:]
        if c != self.pixel_shape[0]:
            raise ValueError(
                f"images have {c} channels but this model makes {self.pixel_shape[0]}-channel "
                "images"
            )
        if (h, w) != self.pixel_shape[1:]:
            self.pixel_size((h, w))  # another size: it must fit the network
        if mask is not None:
            mask = self._check_mask(mask, images)
        options = dict(
            eta=eta, guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
            apg=apg, **sampler_options,
        )  # fmt: skip
        n = images.shape[0]
        args = dict(
            n=n, class_labels=class_labels, prompt=prompt, sampler=sampler, steps=steps,
            guidance_scale=guidance_scale, seed=seed, spacing=spacing, clip_x0=clip_x0,
            negative_prompt=negative_prompt, negative_class=negative_class,
            size=None if (h, w) == self.pixel_shape[1:] else (int(h), int(w)),
            clip_skip=clip_skip,
        )  # fmt: skip
        out, timesteps = self._generate(args, images, strength, progress, options, mask)
        return Img2ImgResult(out, timesteps or [])

    def _scheduler_plan(self, sampler: str, steps: int | None, spacing: Any) -> dict[str, Any]:
        """The timesteps (and options) diffusers' scheduler for ``sampler`` would use with
        this model's scheduler config; empty without one, or when the call (or the sampler's
        name, e.g. "... Karras") chooses the spacing itself."""
        if self.scheduler_config is None or spacing is not None:
            return {}
        from .interop.scheduler import has_plan, sampling_plan

        if not has_plan(sampler):  # difflab's own grid for the samplers diffusers lacks
            return {}
        n = int(steps if steps is not None else self.sample_defaults["steps"])
        return dict(sampling_plan(self.scheduler_config, sampler, n))

    def _recorded_plan(self, sampler: str, steps: int | None, spacing: Any) -> dict[str, Any]:
        """The JSON-able part of :meth:`_scheduler_plan` for a call's parameters: the
        diffusers scheduler it follows and the timesteps it walks."""
        from .schedules import NoiseLevels

        plan = self._scheduler_plan(sampler, steps, spacing)
        if not plan:
            return {}
        walk = plan["spacing"]
        ts = walk.t if isinstance(walk, NoiseLevels) else walk
        assert self.scheduler_config is not None
        return {"spacing": [float(t) for t in ts], "scheduler": self.scheduler_config.get(
            "_class_name", "diffusers")}  # fmt: skip

    def _check_mask(self, mask: Tensor, images: Tensor) -> Tensor:
        if not isinstance(mask, Tensor) or mask.ndim != 4:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a tensor [N or 1, 1 or C, H, W], got {got}")
        n, c, h, w = images.shape
        if mask.shape[0] not in (1, n) or mask.shape[1] not in (1, c) or mask.shape[2:] != (h, w):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit images {tuple(images.shape)}; "
                f"use [{n} or 1, 1 or {c}, {h}, {w}] with 1 = generate, 0 = keep"
            )
        return mask.float()

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images this run makes (the decoded ones for a latent model)."""
        if self.vae is None:
            return self.image_shape  # type: ignore[return-value]
        c, h, w = self.image_shape
        config: Any = self.vae.config
        f = int(config.downsample_factor)
        return (int(config.in_channels), h * f, w * f)

    @property
    def downsample_factor(self) -> int:
        """Image sides must be multiples of this: the network's downsampling times the
        autoencoder's for a latent model."""
        f = int(getattr(getattr(self.model, "config", None), "downsample_factor", 1))
        if self.vae is not None:
            f *= int(self.vae.config.downsample_factor)
        return f

    def pixel_size(self, size: tuple[int | None, int | None] | None) -> tuple[int, int]:
        """``(height, width)`` in pixels of a call's images: ``size`` checked, its ``None``
        sides taken from the model's own size."""
        _, h0, w0 = self.pixel_shape
        if size is None:
            return h0, w0
        f = self.downsample_factor
        h, w = (h0 if size[0] is None else size[0]), (w0 if size[1] is None else size[1])
        for name, v in (("height", h), ("width", w)):
            if isinstance(v, bool) or not isinstance(v, int) or v < f or v % f:
                raise ValueError(
                    f"{name} must be a positive multiple of {f} (this model's downsampling), "
                    f"got {v!r}"
                )
        return int(h), int(w)

    def latent_shape(self, size: tuple[int, int] | None) -> tuple[int, ...]:
        """The sampled state's ``(C, h, w)`` for images of ``size`` pixels."""
        if size is None:
            return tuple(self.image_shape)
        h, w = self.pixel_size(size)
        f = 1 if self.vae is None else int(self.vae.config.downsample_factor)
        return (self.image_shape[0], h // f, w // f)

    def _generate(
        self,
        args: dict[str, Any],
        init: Tensor | None,
        strength: float | None,
        progress: bool | None,
        options: dict[str, Any],
        mask: Tensor | None = None,
        noise: Tensor | None = None,
        callback: Callable[[int, float, Tensor, Tensor | None], None] | None = None,
    ) -> tuple[Tensor, list[float] | None]:
        """Images sampled from noise (``init`` None) or from ``init`` images, and the
        timesteps used (img2img only); the shared body of ``__call__`` and ``img2img``."""
        from .samplers import img2img, sample
        from .samplers.common import randn

        n = args["n"]
        p = self.resolve_params(
            **args, strength=strength, inpaint=mask is not None, custom_noise=noise is not None,
            **options,
        )  # fmt: skip
        labels = self._labels(args["class_labels"], n)
        negative_labels = self._negative_labels(args["negative_class"], n)
        size = args["size"]
        encoder = self.text_encoder
        if p.get("clip_skip") is not None:  # A1111's N is diffusers' N - 1 (1: the last layer)
            encoder.clip_skip = p["clip_skip"] - 1 or None  # type: ignore[union-attr]
        try:
            cond, uncond = self._conditioning(
                labels, args["prompt"], n, args["negative_prompt"], negative_labels,
                size=tuple(p["size"]),
            )  # fmt: skip
        finally:
            if p.get("clip_skip") is not None:
                encoder.clip_skip = None  # type: ignore[union-attr]
        gens = [torch.Generator().manual_seed(p["seed"] + i) for i in range(n)]
        shape = (n, *self.latent_shape(size))
        if noise is None:
            noise = randn(shape, gens, device=self.device)
        elif not isinstance(noise, Tensor) or tuple(noise.shape) != shape:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a tensor of shape {shape}, got {got}")
        else:
            noise = noise.to(self.device, torch.float32)
        common = dict(
            schedule=self.schedule,
            sampler=p["sampler"],
            steps=p["steps"],
            prediction=self.prediction,
            variance=self.variance,
            spacing=args["spacing"],
            guidance_scale=p["guidance_scale"],
            cond=cond or None,
            uncond=uncond if p["guidance_scale"] != 1.0 else None,
            noise=noise,
            generator=gens,
            progress=progress,
            clip_x0=p["clip_x0"] or None,
            model_dtype=self.dtype,
            callback=callback,  # (i, t, x_t, x0_pred) after each step, as dl.sample's
            formulation=self.formulation,
            **options,  # eta, guidance_rescale, guidance_interval and the sampler's own
        )
        plan = self._scheduler_plan(p["sampler"], p["steps"], args["spacing"])
        if plan:  # diffusers' timesteps for this sampler, from its starting latents
            from .interop.scheduler import initial_noise_scale

            assert self.scheduler_config is not None
            if init is None:
                scale = initial_noise_scale(self.scheduler_config, p["sampler"], p["steps"])
                common["noise"] = noise * scale
            common.update(plan, prediction=self.prediction)  # an override of it stands
        if init is None:
            x, timesteps = sample(self.model, shape, **common), None
        else:
            pixels = init.to(self.device, torch.float32)
            x0, hole = pixels, None if mask is None else mask.to(self.device)
            if self.vae is not None:  # posterior means: no randomness in the encoding
                x0 = self.vae.latents(x0.to(next(self.vae.parameters()).dtype)).float()
                if hole is not None:  # a latent cell is generated if any of its pixels is
                    f = self.vae.config.downsample_factor
                    hole = F.max_pool2d(hole.amax(1, keepdim=True), f)
            if hole is not None:
                common.update(inpaint_image=x0, inpaint_mask=hole)
            result = img2img(self.model, x0, strength=float(strength or 0.0), **common)
            x, timesteps = result.images, result.timesteps
        if self.vae is not None:
            x = self.vae.images(x.to(next(self.vae.parameters()).dtype))
        x = x.float().clamp(-1.0, 1.0)  # float32 images whatever the networks ran in
        if mask is not None:  # the kept pixels exactly (the decoder only approximates them)
            x = mask.to(x.device) * x + (1 - mask.to(x.device)) * pixels
        return x, timesteps

    def _clip_x0(self, clip_x0: bool | None) -> bool:
        if clip_x0 is None:
            return self.vae is None
        if clip_x0 and self.vae is not None:
            raise ValueError(
                "clip_x0 clips x̂0 to the pixel range [-1, 1], but this model samples "
                "autoencoder latents; leave clip_x0 unset (or False) for latent diffusion"
            )
        return bool(clip_x0)

    def __repr__(self) -> str:
        cond = f"num_classes={self.num_classes}" if self.num_classes else "unconditional"
        return (
            f"Pipeline(run={self.run_dir!r}, weights={self.weights!r}, "
            f"image_shape={self.image_shape}, {cond}, prediction={self.prediction!r})"
        )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _one_or_all(texts: list[str]) -> str | list[str]:
    """One string when every image shares it, else the list (for PNG parameters)."""
    return texts[0] if len(set(texts)) == 1 else texts


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choices: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype
