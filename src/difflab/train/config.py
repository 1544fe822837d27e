"""Training configuration: typed dataclasses that round-trip through YAML.

Owns the run's configuration (``seed``, ``run_dir`` and the sections ``model``,
``diffusion``, ``data``, ``train``, ``sample`` described in ``notes/run_layout.md``), its
validation (unknown keys and closed choices raise ``ValueError`` with a did-you-mean hint)
and ``--set key.sub=value`` overrides.  Knows nothing of the training loop.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .._validate import check_choice, unknown_message
from ..data import DataConfig
from ..losses import WEIGHTINGS
from ..models.text import TextConfig
from ..parametrization import PREDICTIONS, VARIANCES

__all__ = [
    "DataConfig",
    "DiffusionConfig",
    "LoopConfig",
    "SampleConfig",
    "TrainConfig",
    "apply_overrides",
    "changed_keys",
    "load_config",
    "save_config",
]

TIMESTEP_SAMPLERS = ("uniform", "importance")
LR_SCHEDULES = ("cosine", "constant")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
# How several processes share the work (difflab.train.fsdp): "ddp" replicates the model on
# every rank; "fsdp" shards parameters, gradients and optimiser state (FSDP2 fully_shard).
PARALLELS = ("ddp", "fsdp")
ON_NONFINITE = ("stop", "skip")
# What early stopping watches: a validation loss (train.val_every) or a periodic metric
# (train.eval_every); lower is better for all of them.
EARLY_STOP_METRICS = ("val_loss", "val_loss_ema", "fid", "kid")
# YAML 1.1 reads an unquoted `no` / `off` as false: these keys take it as their "off" word.
_FALSE_MEANS = {("train", "mixed_precision"): "no"}


# --------------------------------------------------------------------------- generic helpers
def _coerce(section: str, name: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a field's type hint; turn YAML strings like ``2e-4`` into floats."""
    where = f"{section}.{name}" if section else name
    if value is False and (section, name) in _FALSE_MEANS:
        return _FALSE_MEANS[section, name]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads "2e-4" as a string (YAML 1.1)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is dict or hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:  # pragma: no cover - every field is one of the types above
        return value
    name_ = getattr(hint, "__name__", str(hint))
    raise ValueError(f"config key {where!r} must be {name_}, got {value!r}")


def _section_from_dict(cls: type, data: Mapping[str, Any] | None, section: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise with a did-you-mean hint."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ValueError(f"config section {section!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(unknown_message(f"config key in {section!r}", key, names))
        kwargs[key] = _coerce(section, key, hints[key], value)
    return cls(**kwargs)


def _check_range(where: str, value: float, lo: float, hi: float | None = None) -> None:
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"config key {where!r} must be {allowed}, got {value!r}")


# --------------------------------------------------------------------------- sections
@dataclass
class DiffusionConfig:
    """The forward process and the training objective (see ``difflab.losses``).

    :param schedule: ``NoiseSchedule.to_config()`` dict, e.g. ``{name: cosine, T: 1000}``.
    :param prediction: what the network predicts: eps | x0 | v.
    :param variance: fixedsmall | fixedlarge | learned | learned_range (learned ones train
        with the hybrid loss L_simple + vlb_weight * L_vlb, Nichol & Dhariwal 2021 §3.1).
    :param weighting: per-timestep loss weight: none | snr | min_snr (Hang et al. 2023).
    :param snr_gamma: γ of min-SNR-γ weighting.
    :param vlb_weight: λ of the hybrid loss (0.001 in improved DDPM).
    :param timestep_sampler: uniform | importance (p_t ∝ √E[L_t²], Nichol & Dhariwal 2021
        eq. 18; ``losses.LossSecondMomentSampler``).
    :param offset_noise: strength of per-channel offset noise (0 = off).
    :param input_perturbation: strength of input perturbation (Ning et al. 2023; 0 = off).
    :param cond_drop_prob: probability a class label is replaced by the null label, so the
        same network learns the unconditional model for classifier-free guidance (Ho &
        Salimans 2022).
    :param formulation: ddpm (the discrete VP process of ``schedule``, default) | edm
        (Karras et al. 2022) | flow (rectified flow, Esser et al. 2024); see
        ``difflab.formulations``.  edm and flow draw their own noise levels and ignore
        ``schedule``, ``prediction`` and ``timestep_sampler``.
    :param formulation_options: the edm / flow options (``EDM`` / ``Flow`` fields, e.g.
        ``{sigma_data: 0.5}`` or ``{timestep_sampling: logit_normal, shift: 3.0}``).
    """

    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "cosine", "T": 1000})
    prediction: str = "eps"
    variance: str = "fixedsmall"
    weighting: str = "none"
    snr_gamma: float = 5.0
    vlb_weight: float = 0.001
    timestep_sampler: str = "uniform"
    offset_noise: float = 0.0
    input_perturbation: float = 0.0
    cond_drop_prob: float = 0.1
    formulation: str = "ddpm"
    formulation_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_formulation()
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("variance", self.variance, VARIANCES)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS)
        _check_range("diffusion.cond_drop_prob", self.cond_drop_prob, 0.0, 1.0)
        from ..schedules import NoiseSchedule

        try:  # a wrong schedule key fails here, with a suggestion, not at the first step
            NoiseSchedule.from_config(self.schedule)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"config key 'diffusion.schedule': {err}") from None
        for name in ("snr_gamma", "vlb_weight", "offset_noise", "input_perturbation"):
            _check_range(f"diffusion.{name}", getattr(self, name), 0.0)

    def _check_formulation(self) -> None:
        from ..formulations import formulation_from_config

        try:
            form = formulation_from_config(self.formulation, self.formulation_options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"config key 'diffusion.formulation': {err}") from None
        if form is None:
            return
        unsupported = {
            "variance": (self.variance, "fixedsmall"),
            "weighting": (self.weighting, "none"),
            "timestep_sampler": (self.timestep_sampler, "uniform"),
            "offset_noise": (self.offset_noise, 0.0),
            "input_perturbation": (self.input_perturbation, 0.0),
        }
        for key, (value, default) in unsupported.items():
            if value != default:
                raise ValueError(
                    f"diffusion.{key}={value!r} applies to formulation ddpm; formulation "
                    f"{self.formulation} sets its own noise levels and loss weight "
                    f"(leave {key} at {default!r})"
                )

    @property
    def learned_variance(self) -> bool:
        """True when the network also outputs the reverse-step variance."""
        return self.variance in ("learned", "learned_range")


@dataclass
class LoopConfig:
    """The optimisation loop (the ``train:`` section).

    ``batch_size`` is the global micro-batch (split across ranks under torchrun); one
    optimiser step consumes ``batch_size * grad_accum`` samples.
    """

    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2.0e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    max_steps: int = 2000
    # Wall-clock budget (difflab.train.budget): "90s", "15m", "2h", "1h30m" or seconds; the
    # run stops (with a checkpoint) at whichever of max_time and max_steps comes first, and
    # the LR warm-up and decay follow the share of the budget used.  None = steps only.
    max_time: Any = None
    ema_decay: float = 0.999
    ema_warmup: bool = True
    mixed_precision: str = "no"
    # Torch device: None = cuda:LOCAL_RANK when CUDA is available, else cpu ("cpu", "cuda",
    # "cuda:1", ... force one).
    device: str | None = None
    # Cache of the frozen encoders' outputs (autoencoder posteriors of the images, frozen
    # text-encoder tokens of the captions; difflab.train.cache): None = off, "memory", or a
    # folder where entries persist across runs.
    encoder_cache: str | None = None
    grad_checkpointing: bool = False
    channels_last: bool = False
    # torch.compile the network for the training steps (the first step compiles, its time is
    # logged once); inductor's cache lives in RUN/compile_cache, so a resume reuses it.
    compile: bool = False
    # Under torchrun (ignored by one process): "ddp" keeps a whole replica per rank, "fsdp"
    # shards weights, gradients, optimiser state and EMA across ranks (difflab.train.fsdp).
    parallel: str = "ddp"
    # fsdp only, CUDA only: keep the sharded parameters and optimiser state in CPU memory.
    cpu_offload: bool = False
    # Tensor parallelism of the DiT blocks' attention and MLP projections over groups of N
    # ranks (difflab.train.tensor_parallel); 1 = off.  The world size must be divisible by
    # N; the remaining "dp" dimension is sharded by FSDP (train.parallel=fsdp, or any
    # parallel setting when all ranks form one TP group).
    tensor_parallel: int = 1
    on_nonfinite: str = "stop"
    log_every: int = 50
    sample_every: int = 500  # 0 = never
    save_every: int = 500  # 0 = only at the end
    num_workers: int = 0
    tensorboard: bool = True
    plot_metrics: bool = True  # RUN/metrics.png at every checkpoint
    # Metrics of eval_n EMA samples every eval_every steps, logged to metrics.jsonl
    # (difflab.eval.periodic_eval); FID/KID in the digits classifier's feature space unless
    # eval_inception_weights names a local pytorch-fid Inception file.
    eval_every: int = 0  # 0 = never
    eval_metrics: str = "fid,accuracy"
    eval_n: int = 500
    eval_inception_weights: str | None = None
    # Validation loss (difflab.train.validation): val_fraction of the data is held out of
    # training and scored every val_every steps (and at the last) at val_timesteps timesteps.
    val_fraction: float = 0.0
    val_every: int = 0  # 0 = never
    val_timesteps: int = 10
    # Post-hoc EMA snapshots (difflab.train.posthoc_ema, EDM2): None = off, else
    # {sigma_rels: [0.05, 0.10], every: 100}; `difflab ema RUN` reconstructs any sigma_rel.
    posthoc_ema: dict[str, Any] | None = None
    # Early stopping (difflab.train.early_stop): stop when early_stop_metric (logged by
    # val_every or eval_every) has not improved by min_delta for `patience` evaluations;
    # the best EMA weights are kept as best.safetensors.  0 = off.
    patience: int = 0
    early_stop_metric: str = "val_loss_ema"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.mixed_precision, str) and self.mixed_precision.lower() in (
            "false", "off", "none"
        ):  # fmt: skip
            self.mixed_precision = "no"
        if self.max_time is not None:
            from .budget import parse_duration

            parse_duration(self.max_time)  # validates
        check_choice("early_stop_metric", self.early_stop_metric, EARLY_STOP_METRICS)
        _check_range("train.patience", self.patience, 0)
        _check_range("train.min_delta", self.min_delta, 0.0)
        if self.patience:
            watched = (
                self.val_every if self.early_stop_metric.startswith("val") else self.eval_every
            )
            if not watched:
                needs = "val_every" if self.early_stop_metric.startswith("val") else "eval_every"
                raise ValueError(
                    f"train.patience watches {self.early_stop_metric!r}, which is only measured "
                    f"with train.{needs} > 0; set it (or train.patience=0)"
                )
        if self.posthoc_ema is not None:
            from .posthoc_ema import PostHocEMAConfig

            PostHocEMAConfig.from_dict(self.posthoc_ema)  # validates
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        check_choice("train.parallel", self.parallel, PARALLELS)
        if self.cpu_offload and self.parallel != "fsdp":
            raise ValueError("train.cpu_offload offloads FSDP shards; it needs train.parallel=fsdp")
        for name in ("batch_size", "grad_accum", "log_every", "tensor_parallel"):
            _check_range(f"train.{name}", getattr(self, name), 1)
        for name in ("lr", "warmup_steps", "weight_decay", "grad_clip"):
            _check_range(f"train.{name}", getattr(self, name), 0)
        if self.max_steps < 1:  # a run of no steps would write no weights
            raise ValueError(
                f"config key 'train.max_steps' must be >= 1 (a run trains at least one "
                f"step), got {self.max_steps!r}"
            )
        for name in ("sample_every", "save_every", "num_workers", "eval_every"):
            _check_range(f"train.{name}", getattr(self, name), 0)
        _check_range("train.eval_n", self.eval_n, 2)
        _check_range("train.val_every", self.val_every, 0)
        _check_range("train.val_timesteps", self.val_timesteps, 1)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(
                f"config key 'train.val_fraction' must be in [0, 1), got {self.val_fraction!r}"
            )
        if self.val_every and self.val_fraction == 0:
            raise ValueError(
                "train.val_every needs held-out data: set train.val_fraction > 0 (e.g. 0.05)"
            )
        if self.eval_every:
            from ..eval.metrics import METRICS

            for metric in self.eval_metrics.split(","):
                check_choice("train.eval_metrics entry", metric.strip(), METRICS)
        _check_range("train.ema_decay", self.ema_decay, 0.0, 1.0)
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(
                    f"config key 'train.device' must be a torch device such as 'cpu', 'cuda' "
                    f"or 'cuda:1', got {self.device!r}"
                ) from None


@dataclass
class LatentConfig:
    """Latent diffusion (Rombach et al. 2022): the U-Net learns the latents of a frozen KL
    autoencoder instead of pixels.

    :param vae: folder of an ``AutoencoderKL`` (``difflab train-vae`` output or a Stable
        Diffusion VAE folder); ``None`` = pixel-space diffusion. The U-Net's ``in_channels``
        and ``image_size`` follow the autoencoder's latent.
    :param sample_posterior: train on posterior samples (LDM) rather than posterior means.
    """

    vae: str | None = None
    sample_posterior: bool = True

    def __post_init__(self) -> None:
        if self.vae is not None and not (Path(self.vae) / "config.json").is_file():
            raise FileNotFoundError(
                f"latent.vae {self.vae!r} holds no autoencoder (config.json); train one with "
                "difflab train-vae or point it at a saved AutoencoderKL folder"
            )

    def vae_config(self) -> Any:
        """The autoencoder's ``VAEConfig`` (``None`` without ``vae``)."""
        if self.vae is None:
            return None
        import json

        from ..models.vae import VAEConfig

        data = json.loads((Path(self.vae) / "config.json").read_text(encoding="utf-8"))
        return VAEConfig.from_diffusers(data)


@dataclass
class FinetuneConfig:
    """Adapter fine-tuning of a finished run (``difflab finetune``; ``difflab.finetune``).

    :param base_run: the run whose weights are adapted (``None`` = ordinary training). The
        network is rebuilt from this config's ``model`` / ``text`` sections, which
        ``difflab finetune`` copies from the base run.
    :param weights: ``ema`` or ``raw`` weights of the base run.
    :param adapter: ``lora`` (Hu et al. 2021), ``loha`` (LyCORIS' Hadamard product) or
        ``lokr`` (LyCORIS' Kronecker product); see ``difflab.finetune.loha_lokr``. On
        ``conv`` targets each is LyCORIS' "LoCon" form.
    :param rank: adapter rank ``r``. :param alpha: ``α`` (``None`` = ``rank``, i.e. scale 1).
    :param lokr_factor: LoKr's factor size (``-1``: LyCORIS' automatic split).
    :param targets: ``attention``, ``conv``, ``attention+conv`` or a list of module-name
        patterns. :param rslora: scale by ``α/√r`` (rank-stabilised LoRA).
    :param dora: weight-decomposed LoRA (Liu et al. 2024): a trained magnitude per unit.
    :param new_word: textual inversion (Gal et al. 2023): a word added to a text run's
        vocabulary whose token embedding trains, initialised from ``init_word``'s. With
        ``targets: none`` it is the only thing that trains.
    :param prior_condition: DreamBooth's prior preservation (Ruiz et al. 2023): the class
        prompt (or label) whose ``prior_images`` base-run samples are trained alongside the
        instance data, weighted by ``prior_weight`` (λ of eq. 2). ``None`` = off.
    :param text_encoder: adapters of the same kind and rank on the frozen CLIP text
        encoder(s) too (``text.encoder: clip | sdxl``; kohya's ``lora_te_``), trained with
        gradients through the encoder (``difflab.finetune.text_encoder``).
    :param text_encoder_lr: their learning rate (``None``: ``train.lr``).
    """

    base_run: str | None = None
    weights: str = "ema"
    adapter: str = "lora"
    rank: int = 4
    alpha: float | None = None
    targets: Any = "attention"
    rslora: bool = False
    dora: bool = False
    lokr_factor: int = -1
    new_word: str | None = None
    init_word: str | None = None
    prior_condition: Any = None
    prior_images: int = 100
    prior_weight: float = 1.0
    text_encoder: bool = False
    text_encoder_lr: float | None = None

    def __post_init__(self) -> None:
        from ..finetune.lora import ADAPTER_KINDS, TARGET_SETS

        check_choice("finetune.weights", self.weights, ("ema", "raw"))
        check_choice("finetune.adapter", self.adapter, ADAPTER_KINDS)
        if self.adapter != "lora" and (self.rslora or self.dora):
            raise ValueError(
                f"finetune.{'rslora' if self.rslora else 'dora'} is a LoRA option; "
                f"finetune.adapter: {self.adapter} has no such form"
            )
        if self.lokr_factor != -1:
            _check_range("finetune.lokr_factor", self.lokr_factor, 1)
        if self.prior_condition is not None:
            if self.base_run is None:
                raise ValueError("finetune.prior_condition needs finetune.base_run (the prior)")
            if isinstance(self.prior_condition, bool) or not isinstance(
                self.prior_condition, (str, int)
            ):
                raise ValueError(
                    "finetune.prior_condition must be a prompt or a class label, got "
                    f"{self.prior_condition!r}"
                )
        _check_range("finetune.prior_images", self.prior_images, 1)
        _check_range("finetune.prior_weight", self.prior_weight, 0.0)
        _check_range("finetune.rank", self.rank, 1)
        if self.alpha is not None:
            _check_range("finetune.alpha", self.alpha, 0.0)
        patterns = isinstance(self.targets, list) and all(isinstance(p, str) for p in self.targets)
        if self.text_encoder_lr is not None:
            _check_range("finetune.text_encoder_lr", self.text_encoder_lr, 0.0)
            if not self.text_encoder:
                raise ValueError("finetune.text_encoder_lr needs finetune.text_encoder: true")
        if self.text_encoder and self.base_run is None:
            raise ValueError("finetune.text_encoder needs finetune.base_run (the run to adapt)")
        if self.targets == "none":
            if self.new_word is None and not self.text_encoder:
                raise ValueError(
                    "finetune.targets: none trains nothing without finetune.new_word or "
                    "finetune.text_encoder"
                )
        elif not patterns and self.targets not in TARGET_SETS:
            raise ValueError(
                f"finetune.targets must be one of {', '.join(TARGET_SETS)}, none (with "
                f"new_word) or a list of module-name patterns, got {self.targets!r}"
            )
        if self.new_word is not None and self.base_run is None:
            raise ValueError("finetune.new_word needs finetune.base_run (the run to extend)")


@dataclass
class SampleConfig:
    """Defaults for the training-time sample grids and for ``difflab sample``."""

    sampler: str = "dpmpp_2m"
    steps: int = 20
    guidance_scale: float = 2.0
    num_images: int = 16

    def __post_init__(self) -> None:
        from ..samplers import resolve  # unknown names raise with a did-you-mean

        resolve(self.sampler)
        _check_range("sample.steps", self.steps, 1)
        _check_range("sample.num_images", self.num_images, 1)


def _default_model() -> dict[str, Any]:
    # image_size and in_channels follow the data (or the latent) unless set.
    return {"preset": "digits", "num_classes": 10}


_SECTIONS: dict[str, type] = {
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "text": TextConfig,
    "latent": LatentConfig,
    "finetune": FinetuneConfig,
    "train": LoopConfig,
    "sample": SampleConfig,
}


@dataclass
class TrainConfig:
    """A whole training run: ``TrainConfig.from_dict(yaml.safe_load(...))``.

    ``model`` is a ``UNetConfig`` dict, optionally with ``preset: <name>`` plus overrides;
    :meth:`resolve` expands it to the full field list that is written to ``config.yaml``.
    ``text`` (``difflab.models.TextConfig``) conditions on the data's captions through a
    text encoder trained with the U-Net or a frozen CLIP; the U-Net's ``context_dim`` then
    follows the encoder's width.
    """

    seed: int = 0
    run_dir: str = "runs/demo"
    model: dict[str, Any] = field(default_factory=_default_model)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        self.model_config()  # validates the model section (unknown keys, preset names)
        if self.text.enabled:
            self._check_text()
        vae = self.latent.vae_config()
        if vae is not None:
            self._check_latent(vae)
        elif self.data.channels != self.model_config().in_channels:
            raise ValueError(
                f"data.channels={self.data.channels} but model in_channels="
                f"{self.model_config().in_channels}; they must match"
            )
        if self.train.eval_every:
            self._check_eval()
        if self.train.encoder_cache is not None and vae is None and not self.text.pretrained:
            raise ValueError(
                "train.encoder_cache caches frozen encoders' outputs, and this run has none: "
                "set latent.vae (an autoencoder) or text.encoder: clip or t5, or drop the cache"
            )

    def _check_latent(self, vae: Any) -> None:
        if self.data.channels != vae.in_channels:
            raise ValueError(
                f"data.channels={self.data.channels} but the autoencoder {self.latent.vae} "
                f"encodes {vae.in_channels}-channel images"
            )
        if self.data.image_size % vae.downsample_factor:
            raise ValueError(
                f"data.image_size={self.data.image_size} is not a multiple of the "
                f"autoencoder's downsampling factor {vae.downsample_factor}"
            )

    def _check_text(self) -> None:
        if self.data.source not in ("digits", "shapes", "captions"):
            raise ValueError(
                f"text.encoder={self.text.encoder!r} trains on captions, but data.source="
                f"{self.data.source!r} has none; use data.source digits, shapes or captions"
            )
        metrics = {m.strip() for m in self.train.eval_metrics.split(",")}
        labelled = self.data.source in ("digits", "shapes")
        if self.train.eval_every and "accuracy" in metrics and not labelled:
            raise ValueError(
                "train.eval_metrics has 'accuracy', which for a text run needs captions with "
                "class labels (data.source: digits or shapes), and data.source="
                f"{self.data.source!r} has captions only; use fid / kid / precision_recall"
            )

    def _check_eval(self) -> None:
        metrics = {m.strip() for m in self.train.eval_metrics.split(",")}
        own_scorer = self.data.source == "shapes"  # scored by the shapes classifier
        if self.train.eval_inception_weights is None and self.data.channels != 1 and not own_scorer:
            raise ValueError(
                "train.eval_every without train.eval_inception_weights scores samples with the "
                f"digits classifier, which needs 1-channel images (data.channels="
                f"{self.data.channels}); set train.eval_inception_weights to a local "
                "pytorch-fid Inception file or train.eval_every=0"
            )
        if own_scorer and self.data.channels != 3 and self.train.eval_inception_weights is None:
            raise ValueError(
                "train.eval_every on data.source=shapes scores samples with the shapes "
                f"classifier, which needs 3-channel images (data.channels={self.data.channels})"
            )
        if (
            "accuracy" in metrics
            and self.model_config().num_classes is None
            and not (self.text.enabled)
        ):
            raise ValueError(
                "train.eval_metrics has 'accuracy', which needs a class-conditional model "
                "(model.num_classes); remove it or set model.num_classes"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainConfig:
        """Build from nested plain dicts; unknown keys raise ValueError with a suggestion."""
        data = dict(data or {})
        top = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in top:
                raise ValueError(unknown_message("config section", key, top))
        kwargs: dict[str, Any] = {}
        if "seed" in data:
            kwargs["seed"] = _coerce("", "seed", int, data["seed"])
        if "run_dir" in data:
            kwargs["run_dir"] = str(data["run_dir"])
        if "model" in data:
            kwargs["model"] = _coerce("", "model", dict, data["model"] or {})
        for name, section_cls in _SECTIONS.items():
            if name in data:
                kwargs[name] = _section_from_dict(section_cls, data[name], name)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts (YAML-able); ``from_dict(to_dict())`` is an equal config."""
        return dataclasses.asdict(self)

    def model_config(self) -> Any:
        """The ``UNetConfig`` (or ``DiTConfig`` for ``model.arch: dit``) this config describes
        (preset expanded).

        The U-Net's ``learn_sigma`` follows ``diffusion.variance`` unless set explicitly,
        in which case the two must agree.
        """
        from ..models import model_config_from_dict

        spec = dict(self.model)
        if self.text.enabled:
            width = self.text.context_dim
            if spec.get("context_dim") is None:
                spec["context_dim"] = width
            if spec["context_dim"] != width:
                raise ValueError(
                    f"model.context_dim={spec['context_dim']} contradicts the text encoder's "
                    f"width {width} (the U-Net attends to its tokens)"
                )
        vae = self.latent.vae_config()
        if vae is not None:  # the U-Net models the autoencoder's latents
            latent = {
                "in_channels": vae.latent_channels,
                "image_size": self.data.image_size // vae.downsample_factor,
            }
            for key, value in latent.items():
                if spec.get(key) not in (None, value):  # null: take it from the latent
                    raise ValueError(
                        f"model.{key}={spec[key]} contradicts the autoencoder's latent "
                        f"({key} {value}); leave it out for latent diffusion (or --set "
                        f"model.{key}=null when the config sets it)"
                    )
                spec[key] = value
        spec.setdefault("image_size", self.data.image_size)
        spec.setdefault("in_channels", self.data.channels)
        learned = self.diffusion.learned_variance
        if spec.setdefault("learn_sigma", learned) != learned:
            raise ValueError(
                f"model.learn_sigma={spec['learn_sigma']} contradicts diffusion.variance="
                f"{self.diffusion.variance!r} (learned variances need learn_sigma: true)"
            )
        try:
            return model_config_from_dict(spec)  # model.arch: unet (default) | dit
        except TypeError as err:  # wrong value types inside the U-Net config
            raise ValueError(f"bad model section: {err}") from err

    def resolve(self) -> TrainConfig:
        """A copy whose ``model`` section is the full ``UNetConfig.to_dict()`` (no preset)
        and whose folders (``latent.vae``, ``text.path``, ``finetune.base_run``) are
        absolute, so the written run loads from any working directory."""
        out = TrainConfig.from_dict(self.to_dict())
        out.model = self.model_config().to_dict()
        for section, key in (("latent", "vae"), ("text", "path"), ("finetune", "base_run")):
            value = getattr(getattr(out, section), key)
            if value is not None:
                setattr(getattr(out, section), key, str(Path(value).resolve()))
        if out.train.encoder_cache not in (None, "memory"):
            out.train.encoder_cache = str(Path(out.train.encoder_cache).resolve())
        return out


# --------------------------------------------------------------------------- files and --set
def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ValueError(f"override {item!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``key.sub=value`` set (value parsed as YAML)."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(dict(data)))  # deep, plain copy
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ValueError(f"override {item!r}: {where!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides.

    >>> load_config(None, ["train.lr=1e-4"]).train.lr
    0.0001
    """
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must hold a mapping, got {type(data)}")
    base = TrainConfig().to_dict()  # defaults under the file, so --set a.b.c=... merges
    base["model"] = data.pop("model", None) or _default_model()  # a model section replaces
    return TrainConfig.from_dict(apply_overrides(_merge(base, data), overrides))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``line N, column M: problem`` of a YAML parse error, on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(problem)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config.to_dict()`` as YAML (atomically: temp file + rename)."""
    from ..runs import atomic_write_bytes

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def changed_keys(path: str | Path, config: TrainConfig) -> list[str]:
    """The dotted keys in which ``config`` differs from the config saved at ``path`` (none
    when there is no file); read through today's config, so keys a newer difflab added, at
    their defaults, are not changes (a run written before ``diffusion.formulation``, say)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        old = _flat(load_config(path).to_dict())
    except (ValueError, TypeError, OSError):  # a config today's code no longer reads
        old = _flat(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    new = _flat(config.to_dict())
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
