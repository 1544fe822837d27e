"""Evaluating a trained run: one setting (`evaluate_pipeline`, `periodic_eval`) or a grid of
them (`run_sweep`: sampler × steps × guidance scale), with tables and plots.

Owns: loading what is evaluated (a difflab run, or a Stable Diffusion folder / single file
through ``Pipeline.from_pretrained``; a text model is drawn from prompts: a text run's captions,
or a prompt list, which an SD model needs), drawing class-conditional samples from a `Pipeline`
in batches (labels cycle over the classes or prompts, image *i* uses seed ``seed + i``),
counting network evaluations (NFE), the real-data reference (a run's ``data:`` section or a
folder of images, `difflab.eval.sources`; features cached as ``.npz`` keyed by extractor and
image content), the resumable sweep log ``sweep.jsonl`` and its CSV / markdown / PNG views.

Knows nothing of metric maths (`difflab.eval.metrics.evaluate` computes every number) or of
sampler maths (`Pipeline.__call__` draws the images).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from difflab._validate import check_choice
from difflab.eval.features import DigitsClassifier, FeatureExtractor, cache_dir
from difflab.eval.metrics import METRICS, evaluate, to_uint8
from difflab.eval.ranks import Ranks
from difflab.eval.sources import prompts_identity, reference_folder_config
from difflab.images import new_figure, save_figure
from difflab.parametrization import DenoiserNet
from difflab.schedules import NoiseSchedule

__all__ = [
    "LIKELIHOOD_METHODS",
    "PromptedPipeline",
    "SweepResult",
    "evaluate_likelihood",
    "class_prompts",
    "data_scorer",
    "evaluate_pipeline",
    "labelled_classes",
    "load_pipeline",
    "metric_columns",
    "periodic_eval",
    "plot_sweep",
    "reference_images",
    "run_sweep",
    "sample_images",
    "text_run_prompts",
    "write_tables",
]

# Metrics of a run's samples: those of `evaluate` plus the CLIP score of each sample against
# its class prompt (`class_prompts`).
RUN_METRICS: tuple[str, ...] = (*METRICS, "clip_score")
LIKELIHOOD_METHODS = ("vlb", "ode")  # difflab.diffusion.bits_per_dim / eval.ode_likelihood
REFERENCE_METRICS = frozenset({"fid", "kid", "precision_recall"})  # need real-data features
SWEEP_FILES = {
    "jsonl": "sweep.jsonl",
    "csv": "sweep.csv",
    "markdown": "sweep.md",
    "nfe_plot": "sweep_nfe.png",
    "guidance_plot": "sweep_guidance.png",
    "tradeoff_plot": "sweep_tradeoff.png",
}
_FEW_SAMPLES_WARNING = r".*not comparable with numbers in papers"  # eval.metrics, n < 10k
_METRIC_KEY = re.compile(r"^(?P<name>[a-z_]+)\[(?P<extractor>[^\]]+)\]$")


class PipeLike(Protocol):
    """What the evaluations sample from: a :class:`difflab.Pipeline`, a
    :class:`PromptedPipeline`, or anything with that call signature and these attributes
    (``run_dir``, ``labelled``, ``pixel_shape`` are read when present)."""

    @property
    def num_classes(self) -> int | None: ...

    @property
    def context_dim(self) -> int | None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def model(self) -> DenoiserNet: ...

    @property
    def schedule(self) -> NoiseSchedule: ...

    @property
    def prediction(self) -> str: ...

    @property
    def variance(self) -> str: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...  # Pipeline.__call__'s arguments

    def resolve_params(self, *args: Any, **kwargs: Any) -> Any: ...


# --------------------------------------------------------------------------------------------
# Samples, NFE and the reference data
# --------------------------------------------------------------------------------------------


class PromptedPipeline:
    """A text-conditional pipeline seen as a K-class one: class ``k`` is drawn from the prompt
    ``prompts[k]`` (the class's caption, `class_prompts`; or the ``k``-th given prompt, e.g. of
    an SD model), so accuracy, FID/KID and the CLIP score evaluate a text model exactly as
    they do a class-conditional run. Everything else
    (``model``, ``schedule``, ``device``, ...) is the wrapped pipeline's.
    """

    def __init__(self, pipe: PipeLike, prompts: Sequence[str], *, labelled: bool = True) -> None:
        if not prompts:
            raise ValueError("PromptedPipeline needs one prompt per class")
        self.pipe = pipe
        self.prompts = list(prompts)
        self.num_classes = len(self.prompts)
        # False: the "classes" are the data's distinct captions, not classes a classifier
        # knows, so FID/KID/CLIP score apply and accuracy does not.
        self.labelled = labelled

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def _prompts(self, n: int, class_labels: Any) -> list[str]:
        if class_labels is None:
            raise ValueError("a PromptedPipeline samples classes: pass class_labels")
        labels = torch.as_tensor(class_labels).flatten()
        labels = labels.expand(n) if labels.numel() == 1 else labels
        return [self.prompts[int(k)] for k in labels]

    def __call__(self, n: int = 16, class_labels: Any = None, prompt: Any = None,
                 *args: Any, **kwargs: Any) -> Tensor:  # fmt: skip
        return self.pipe(n, None, self._prompts(n, class_labels), *args, **kwargs)

    def resolve_params(self, n: int, class_labels: Any = None, prompt: Any = None,
                       *args: Any, **kwargs: Any) -> dict[str, Any]:  # fmt: skip
        return self.pipe.resolve_params(n, None, self._prompts(n, class_labels), *args, **kwargs)


def load_pipeline(
    pipe_or_run_dir: PipeLike | str | os.PathLike,
    *,
    weights: str = "ema",
    device: torch.device | str | None = None,
    prompts: Sequence[str] | None = None,
    tokenizer: str | os.PathLike | None = None,
    prediction: str | None = None,
) -> PipeLike:
    """A `Pipeline` from a path (`Pipeline.from_pretrained`: a difflab run, a diffusers Stable
    Diffusion folder or an SD single file); a pipeline object is returned as is unless
    ``prompts`` are given.

    A text model comes as a `PromptedPipeline` whose samples cycle over ``prompts`` (sample
    ``i`` is drawn from ``prompts[i % N]``; `difflab.eval.sources.read_prompts` reads a file).
    Without ``prompts`` a text run takes them from its data (`text_run_prompts`): with class
    labels (the digits) each class is drawn from its caption and scored like a
    class-conditional run; with captions only, the samples cycle over the distinct captions.
    An SD model has no data, so it needs ``prompts``.

    :param tokenizer: SD single files: a local folder with the tokenizer(s).
    :param prediction: override the model's prediction type (SD 2.x single files need it).
    """
    loaded = isinstance(pipe_or_run_dir, str | os.PathLike)
    pipe: PipeLike
    if not isinstance(pipe_or_run_dir, str | os.PathLike):
        pipe = pipe_or_run_dir
    else:
        from difflab.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(
            os.fspath(pipe_or_run_dir), weights=weights, device=device,
            tokenizer=None if tokenizer is None else os.fspath(tokenizer), prediction=prediction,
        )  # fmt: skip
    if prompts is not None:
        if isinstance(prompts, str) or not all(isinstance(t, str) for t in prompts):
            raise ValueError(
                "prompts must be a list of strings; read a prompts file with "
                "difflab.eval.sources.read_prompts(path)"
            )
        if isinstance(pipe, PromptedPipeline):
            pipe = pipe.pipe  # the given prompts replace the data's
        if getattr(pipe, "num_classes", None) is not None:
            raise ValueError("prompts (--prompts) given, but this model is class-conditional")
        if getattr(pipe, "context_dim", None) is None:
            raise ValueError("prompts (--prompts) given, but this model is unconditional")
        return PromptedPipeline(pipe, list(prompts), labelled=False)
    if loaded and pipe.context_dim is not None and pipe.num_classes is None:
        if not _is_run(pipe):
            raise ValueError(
                f"{pipe_or_run_dir} is a Stable Diffusion model, which has no training data "
                "to take prompts from: pass --prompts FILE (one prompt per line, or a "
                "captioned image folder; prompts= in Python)"
            )
        prompts, labelled = text_run_prompts(_data_section(pipe))
        pipe = PromptedPipeline(pipe, prompts, labelled=labelled)
    return pipe


def labelled_classes(pipe: PipeLike) -> bool:
    """Whether the pipeline's samples have class labels a classifier can check (a class run,
    or a text run over its data's classes): the default metrics then include accuracy."""
    return getattr(pipe, "num_classes", None) is not None and getattr(pipe, "labelled", True)


def _is_run(pipe: PipeLike) -> bool:
    """Whether the pipeline was loaded from a difflab run directory (it has a config.yaml)."""
    run_dir = getattr(pipe, "run_dir", None)
    return run_dir is not None and (Path(run_dir) / "config.yaml").is_file()


def text_run_prompts(data: Mapping[str, Any] | Any) -> tuple[list[str], bool]:
    """The prompts a text run is evaluated with and whether they are classes: the class
    prompts (`class_prompts`) when the data has class labels, else its distinct captions in
    data order."""
    _, dataset = _unflipped_dataset(data)
    labels = getattr(dataset, "labels", None)
    names = list(getattr(dataset, "class_names", []) or [])
    if labels is not None and names:
        return _class_prompts(dataset, labels, names), True
    texts = getattr(dataset, "texts", None)
    if texts is None:
        texts = [dataset[i].get("text") for i in range(len(dataset))]
    prompts = list(dict.fromkeys(t for t in texts if t))
    if not prompts:
        raise ValueError("a text run is evaluated with its data's captions, and this data has none")
    return prompts, False


def _cycle_labels(pipe: PipeLike, n: int) -> Tensor | None:
    """Labels ``0, 1, ..., K-1, 0, 1, ...`` for a K-class model; None when unconditional."""
    num_classes = getattr(pipe, "num_classes", None)
    return None if num_classes is None else torch.arange(n) % int(num_classes)


def sample_images(
    pipe: PipeLike,
    n: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    sampler_options: Mapping[str, Any] | None = None,
    ranks: Ranks | None = None,
) -> tuple[Tensor, Tensor | None, float | None]:
    """Draw ``n`` images as ``uint8 [n, C, H, W]`` in batches; labels cycle over the classes.

    Batch ``[s, e)`` is drawn with seed ``seed + s``, so (per-image generators) the images equal
    one call ``pipe(n, labels, None, sampler, steps, guidance_scale, seed)``.
    ``sampler_options`` go to every call (``guidance_interval``, ``guidance_rescale``, ``eta``,
    a sampler's own options).

    :param ranks: under ``torchrun``, the ranks that share the work (`Ranks.current()`):
        batch *k* is drawn on rank ``k % world_size`` and gathered to rank 0, which returns
        all ``n`` images (the same batches, so the same images, as one process); the other
        ranks return empty ``images`` and ``nfe`` None.
    :return: ``(images, labels or None, nfe)``: ``nfe`` is the mean number of network forward
        calls per batch (a classifier-free-guidance call on a doubled batch counts once, as
        `Denoiser.nfe` does); None when the pipeline exposes no ``model`` module.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    ranks = ranks or Ranks()
    labels = _cycle_labels(pipe, n)
    model = getattr(pipe, "model", None)
    calls = [0]
    handle = None
    if isinstance(model, torch.nn.Module):
        handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    chunks, mine = [], []
    try:
        for span in ranks.batches(n, batch_size):  # one round: a batch per rank
            x = None
            if span is not None:
                s, e = span
                batch_labels = None if labels is None else labels[s:e]
                x = pipe(e - s, batch_labels, None, sampler, steps, guidance_scale, seed + s,
                         False, **(sampler_options or {}))  # fmt: skip
                x = to_uint8(x.cpu())  # (b, C, H, W) uint8: what a PNG would hold
                mine.append(x[:0])
            drawn = ranks.gather(x)  # rank 0: the round's batches in rank order = batch order
            chunks += [c for c in drawn or [] if c is not None]
    finally:
        if handle is not None:
            handle.remove()
    counts = ranks.gather((calls[0], handle is not None))
    if not ranks.is_main or counts is None:
        return torch.cat(mine) if mine else torch.zeros(0, dtype=torch.uint8), labels, None
    n_batches = math.ceil(n / batch_size)
    total = sum(c for c, _ in counts)
    nfe: float | None = None
    if all(hooked for _, hooked in counts):
        nfe = total // n_batches if total % n_batches == 0 else total / n_batches
    return torch.cat(chunks), labels, nfe


def _is_pretrained(pipe: PipeLike) -> bool:
    """Whether the pipeline was loaded from a path that is not a difflab run (an SD model)."""
    return getattr(pipe, "run_dir", None) is not None and not _is_run(pipe)


def _data_section(pipe: PipeLike) -> Mapping[str, Any]:
    run_dir = getattr(pipe, "run_dir", None)
    if _is_pretrained(pipe):
        raise ValueError(
            "fid / kid / precision_recall need real images, and a Stable Diffusion model has "
            "no training data: pass --reference DIR (a folder of real images; reference= in "
            "Python), or choose --metrics clip_score only"
        )
    if run_dir is None:
        raise ValueError(
            "fid / kid / precision_recall need real images: pass reference= (a tensor of "
            "images or a data config) for a pipeline that was not loaded from a run directory"
        )
    from difflab.runs import read_run_config

    data = read_run_config(run_dir).get("data")
    if not isinstance(data, Mapping):
        raise ValueError(f"{run_dir}/config.yaml has no 'data' section to take real images from")
    return data


def reference_images(reference: Tensor | Mapping[str, Any] | Any) -> Tensor:
    """Real images ``[N, C, H, W]`` (float in [-1, 1] or uint8) for FID/KID/precision-recall.

    ``reference``: a tensor (returned as is) or a data config (``DataConfig``, the ``data:``
    section of a run, or its dataclass copy), loaded with ``difflab.data.build_dataset`` with
    random flips off.
    """
    if isinstance(reference, Tensor):
        return reference
    import dataclasses

    from difflab.data import build_dataset

    if dataclasses.is_dataclass(reference) and not isinstance(reference, type):
        reference = dataclasses.asdict(reference)
    if not isinstance(reference, Mapping):
        raise ValueError(
            f"reference must be a tensor of images or a data config, got {type(reference)}"
        )
    dataset, _ = build_dataset({**reference, "random_flip": False})
    # torch's Dataset declares no __len__; every data set difflab builds has one
    n = len(dataset)  # type: ignore[arg-type]
    return torch.stack([dataset[i]["image"] for i in range(n)])  # (N, C, H, W)


def reference_cache_path(extractor: FeatureExtractor, images: Tensor) -> Path:
    """``<cache_dir>/reference/<extractor>-<sha256 of the uint8 images>.npz``."""
    data = to_uint8(images).contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", extractor.id)
    return cache_dir() / "reference" / f"{slug}-{digest.hexdigest()[:16]}.npz"


# --------------------------------------------------------------------------------------------
# One evaluation
# --------------------------------------------------------------------------------------------


def _check_metrics(metrics: Iterable[str] | str) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m.strip()]
    out = [check_choice("metric", m.strip(), RUN_METRICS) for m in metrics]
    if not out:
        raise ValueError(f"no metric given (choices: {', '.join(RUN_METRICS)})")
    return list(dict.fromkeys(out))  # drop repeats, keep order


def class_prompts(data: Mapping[str, Any] | Any) -> list[str]:
    """The prompt of each class of a data config, for the CLIP score of class-conditional runs.

    Class ``k``'s prompt is the caption of its first captioned image (the digits: ``"a
    handwritten digit seven"``), else its class name (an image folder's subfolder name).
    """
    data, dataset = _unflipped_dataset(data)
    labels = getattr(dataset, "labels", None)
    names = list(getattr(dataset, "class_names", []) or [])
    if labels is None or not names:
        raise ValueError(
            f"class prompts (the CLIP score of a class-conditional run, or the prompts a text "
            f"run is evaluated with) need data with class labels; data.source="
            f"{data.get('source')!r} has none"
        )
    return _class_prompts(dataset, labels, names)


def _unflipped_dataset(data: Mapping[str, Any] | Any) -> tuple[Mapping[str, Any], Any]:
    """The data config as a mapping, and its data set with random flips off."""
    import dataclasses

    from difflab.data import build_dataset

    spec: Any = data
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        spec = dataclasses.asdict(spec)
    dataset, _ = build_dataset({**spec, "random_flip": False})
    return spec, dataset


def _class_prompts(dataset: Any, labels: Sequence[int], names: Sequence[str]) -> list[str]:
    texts = getattr(dataset, "texts", None) or [""] * len(labels)
    prompts = list(names)
    found: set[int] = set()
    for label, text in zip(labels, texts):
        if text and label not in found:
            prompts[label] = text
            found.add(label)
    return prompts


def data_scorer(pipe: PipeLike, reference: Any = None) -> FeatureExtractor | None:
    """The classifier that scores a run on its own data when no extractor is given:
    `ShapesClassifier` (``shapes-cnn``) when the data (``reference`` as a data config, else
    the run's ``data:`` section) is ``data.source: shapes``; None for anything else, which
    the digits classifier (``digits-cnn``) scores."""
    import dataclasses

    data = reference
    if data is None and _is_run(pipe):
        data = _data_section(pipe)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if isinstance(data, Mapping) and data.get("source") == "shapes":
        from difflab.eval.shapes_classifier import ShapesClassifier

        return ShapesClassifier()
    return None


def _check_digits_scorer(pipe: PipeLike, what: str, instead: str) -> None:
    """The digits classifier, the default scorer, reads grayscale digits: refuse to score
    other images with it, saying what to pass ``instead``."""
    shape = getattr(pipe, "pixel_shape", None)
    if shape is not None and shape[0] != 1:
        raise ValueError(
            f"{what} the digits classifier by default, which reads 1-channel digits, but this "
            f"run makes {'x'.join(map(str, shape))} images; {instead}"
        )


@dataclass
class _Evaluator:
    """Extractor, classifier and (lazily) the reference features shared by many cells."""

    metrics: list[str]
    extractor: FeatureExtractor | None  # None when only the CLIP score is asked for
    classifier: FeatureExtractor | None
    reference: Tensor | Mapping[str, Any] | Any | None
    reference_cache: str | os.PathLike | None
    batch_size: int
    options: dict[str, Any] = field(default_factory=dict)
    clip: Any = None  # a CLIPScorer when "clip_score" is asked for
    prompts: list[str] | None = None  # class k's prompt, for the CLIP score
    _ref: Tensor | None = None

    @classmethod
    def build(
        cls,
        pipe: PipeLike,
        metrics: Iterable[str] | str,
        *,
        extractor: FeatureExtractor | None,
        classifier: FeatureExtractor | None,
        reference: Tensor | Mapping[str, Any] | Any | None,
        reference_cache: str | os.PathLike | None,
        batch_size: int,
        metric_options: Mapping[str, Any] | None,
        clip_model: Any = None,
    ) -> _Evaluator:
        metrics = _check_metrics(metrics)
        clip, prompts = None, None
        if "clip_score" in metrics:
            clip, prompts = _clip_setup(pipe, clip_model)
        if "accuracy" in metrics:
            num_classes = getattr(pipe, "num_classes", None)
            if num_classes is None:
                raise ValueError("metric 'accuracy' needs a class-conditional model")
            if not getattr(pipe, "labelled", True):
                raise ValueError(
                    "metric 'accuracy' needs classes, and this text model is evaluated on "
                    "prompts without class labels; use fid, kid, precision_recall or clip_score"
                )
            if classifier is None:
                classifier = data_scorer(pipe, reference)
            if classifier is None:
                _check_digits_scorer(
                    pipe, "metric 'accuracy' scores with",
                    "pass classifier= (a FeatureExtractor with class logits for this data) "
                    "or leave accuracy out",
                )  # fmt: skip
                classifier = DigitsClassifier()
            if classifier.num_classes != num_classes:
                raise ValueError(
                    f"metric 'accuracy': the classifier {classifier.id!r} knows "
                    f"{classifier.num_classes} classes but the model has {num_classes}"
                )
        no_reference = reference is None and reference_cache is None
        if REFERENCE_METRICS & set(metrics) and no_reference and _is_pretrained(pipe):
            _data_section(pipe)  # an SD model: say to pass a reference before anything else
        if extractor is None and set(metrics) - {"clip_score"}:  # features are needed
            extractor = classifier if classifier is not None else data_scorer(pipe, reference)
            if extractor is None:
                _check_digits_scorer(
                    pipe, "FID/KID/precision-recall/IS take their features from",
                    "pass --inception-weights PATH (extractor= in Python): a local FID "
                    "Inception-v3 weights file (pytorch-fid's pt_inception-2015-12-05, .pth or "
                    ".safetensors; never downloaded)",
                )  # fmt: skip
                extractor = DigitsClassifier()
        if isinstance(reference, str | os.PathLike):  # a folder of real images
            reference = reference_folder_config(reference, _pixel_shape(pipe))
        if REFERENCE_METRICS & set(metrics) and reference is None:
            # the run's data, unless only a cache file is available (no run directory)
            if reference_cache is None or _is_run(pipe):
                reference = _data_section(pipe)
        return cls(
            metrics,
            extractor,
            classifier,
            reference,
            reference_cache,
            batch_size,
            dict(metric_options or {}),
            clip,
            prompts,
        )

    def reference_args(self) -> tuple[Tensor | None, str | os.PathLike | None]:
        if not REFERENCE_METRICS & set(self.metrics):
            return None, None
        if self.reference is None:  # only a cache file was given
            return None, self.reference_cache
        if self._ref is None:
            self._ref = to_uint8(reference_images(self.reference))
        assert self.extractor is not None  # build() sets it whenever features are needed
        path = self.reference_cache or reference_cache_path(self.extractor, self._ref)
        return self._ref, path

    def __call__(self, images: Tensor, labels: Tensor | None) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(images)}
        if self.extractor is not None:
            reference, cache = self.reference_args()
            out = evaluate(
                images,
                reference,
                extractor=self.extractor,
                metrics=[m for m in self.metrics if m != "clip_score"],
                labels=labels,
                classifier=self.classifier,
                reference_cache=cache,
                batch_size=self.batch_size,
                **self.options,
            )
        if self.clip is not None and self.prompts is not None and labels is not None:
            scores = self.clip(images, [self.prompts[int(k)] for k in labels])
            out.update({k: v for k, v in scores.items() if k.startswith("clip_score")})
            out["clip_model"], out["clip_scale"] = scores["model"], scores["scale"]
        return out


def _pixel_shape(pipe: PipeLike) -> tuple[int, ...]:
    """``(C, H, W)`` of the images a pipeline makes (decoded ones for a latent model)."""
    shape = getattr(pipe, "pixel_shape", None) or getattr(pipe, "image_shape", None)
    if shape is None:
        raise ValueError("a reference folder needs the model's image size: pass reference images")
    return tuple(int(v) for v in shape)


def _clip_setup(pipe: PipeLike, clip_model: Any) -> tuple[Any, list[str]]:
    """The CLIP scorer (a `CLIPScorer` or a local model folder) and the class prompts."""
    if clip_model is None:
        raise ValueError(
            "metric 'clip_score' needs a local CLIP model folder (clip_model= / --clip-model)"
        )
    if getattr(pipe, "num_classes", None) is None:
        raise ValueError(
            "metric 'clip_score' needs prompts: a class-conditional run (each sample is scored "
            "against its class prompt) or a text model (against its own prompt)"
        )
    from difflab.eval.clip import CLIPScorer

    clip = clip_model if isinstance(clip_model, CLIPScorer) else CLIPScorer(clip_model)
    prompts = getattr(pipe, "prompts", None) or class_prompts(_data_section(pipe))
    if len(prompts) != pipe.num_classes:
        raise ValueError(
            f"the run's data has {len(prompts)} classes but the model {pipe.num_classes}"
        )
    return clip, prompts


def evaluate_pipeline(
    pipe_or_run_dir: PipeLike | str | os.PathLike,
    *,
    metrics: Iterable[str] | str = ("fid", "kid", "accuracy"),
    n: int = 2000,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    extractor: FeatureExtractor | None = None,
    classifier: FeatureExtractor | None = None,
    reference: Tensor | Mapping[str, Any] | Any | None = None,
    reference_cache: str | os.PathLike | None = None,
    batch_size: int = 256,
    metric_options: Mapping[str, Any] | None = None,
    weights: str = "ema",
    device: torch.device | str | None = None,
    clip_model: Any = None,
    sampler_options: Mapping[str, Any] | None = None,
    prompts: Sequence[str] | None = None,
    tokenizer: str | os.PathLike | None = None,
    prediction: str | None = None,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Draw ``n`` samples from a run or a Stable Diffusion model and score them with
    `difflab.eval.metrics.evaluate`.

    Samples are class-conditional for a class-conditional model (labels ``i % K``); a text
    model's sample ``i`` is drawn from prompt ``i % N`` (``prompts``, or a text run's data;
    an SD model needs ``prompts``). FID/KID/precision-recall use ``extractor`` (default:
    `data_scorer`: `ShapesClassifier`, id ``shapes-cnn``, for ``data.source: shapes``, else
    `DigitsClassifier`, id ``digits-cnn``) against ``reference`` (images, a data config, or a
    folder of real images resized and centre-cropped to the model's size; default the run's
    ``data:`` section), whose features are cached under ``cache_dir()/reference``; accuracy
    uses ``classifier``. ``tokenizer`` / ``prediction``: see `load_pipeline`.

    :param metric_options: extra keyword arguments of ``evaluate`` (``kid_subsets``,
        ``kid_subset_size``, ``pr_k``, ``is_splits``).
    :param clip_model: for ``"clip_score"``: a `CLIPScorer` or a local CLIP model folder; each
        sample is scored against its own prompt (its class's, `class_prompts`, for a class
        model).
    :param sampler_options: further sampling arguments of the pipeline call, e.g.
        ``{"guidance_interval": (0.3, 5.0), "guidance_rescale": 0.7, "eta": 1.0}``.
    :return: the resolved sampling settings (``sampler``, ``steps``, ``guidance_scale``,
        ``sampler_options``, ``seed``, ``nfe``, ``sample_seconds``, ``eval_seconds``) and
        everything ``evaluate`` returns (``"fid[digits-cnn]"``, ``n``, ``extractor``, ...).
        JSON-able; with ``prompts`` or a reference folder, also ``prompts`` (their count and
        digest, `prompts_identity`) and ``reference`` (the folder).
    :param ranks: under ``torchrun`` (`Ranks.current()`): the sampling batches are split
        over the ranks and gathered to rank 0, which scores them; every rank returns rank
        0's result (plus ``ranks``: the number of ranks), equal to one process's.
    """
    pipe = load_pipeline(pipe_or_run_dir, weights=weights, device=device, prompts=prompts,
                         tokenizer=tokenizer, prediction=prediction)  # fmt: skip
    ev = _Evaluator.build(
        pipe,
        metrics,
        extractor=extractor,
        classifier=classifier,
        reference=reference,
        reference_cache=reference_cache,
        batch_size=batch_size,
        metric_options=metric_options,
        clip_model=clip_model,
    )
    row = _evaluate_cell(
        pipe, ev, n, sampler, steps, guidance_scale, seed, batch_size, sampler_options, ranks
    )
    return {**row, **_source_settings(prompts, reference)}


def _source_settings(prompts: Sequence[str] | None, reference: Any) -> dict[str, Any]:
    """What a result records of the given prompts and reference folder (nothing for a run's
    own data): part of a sweep cell's key."""
    out: dict[str, Any] = {}
    if prompts is not None:
        out["prompts"] = prompts_identity(prompts)
    if isinstance(reference, str | os.PathLike):
        out["reference"] = str(reference)
    return out


def evaluate_likelihood(
    pipe_or_run_dir: PipeLike | str | os.PathLike,
    methods: Iterable[str] | str = ("vlb",),
    *,
    n: int = 256,
    seed: int = 0,
    reference: Tensor | Mapping[str, Any] | Any | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
    weights: str = "ema",
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Bits/dim of ``n`` real images under a trained run, by the methods named.

    ``"vlb"``: the full variational bound, every one of the T terms plus the prior, with the
    discretised Gaussian decoder for 8-bit data (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021
    §3, `difflab.diffusion.bits_per_dim`). ``"ode"``: the probability-flow ODE likelihood with
    uniform dequantisation and a Rademacher Hutchinson trace estimate (Song et al. 2021
    app. D.2, `difflab.eval.ode_likelihood`; edm and flow runs: their own ODE, "ode" only).
    Both are reported for the same images: a random
    subset (``seed``) of ``reference`` (default: the run's ``data:`` section), quantised to
    8 bits. A class-conditional model is scored unconditionally, through its null label
    (the p(x) it learned by condition dropout).

    :return: ``{"bpd[vlb]", "bpd_std[vlb]", "bpd[ode]", "bpd_std[ode]", "likelihood_ode_nfe",
        "likelihood_n", "likelihood_seed", "likelihood_condition", "likelihood_seconds"}``
        (only the requested methods); ``bpd_std`` is the standard deviation over images.
    """
    from difflab.diffusion import bits_per_dim
    from difflab.eval.likelihood import ode_likelihood

    names = _as_list(methods, str, "likelihood methods")
    for name in names:
        check_choice("likelihood method", name, LIKELIHOOD_METHODS)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    pipe = load_pipeline(pipe_or_run_dir, weights=weights, device=device)
    if getattr(pipe, "context_dim", None) is not None:
        raise ValueError(
            "likelihood of a text-conditional model needs a null text embedding; only "
            "unconditional and class-conditional models are supported"
        )
    if isinstance(reference, str | os.PathLike):  # a folder of real images
        reference = reference_folder_config(reference, _pixel_shape(pipe))
    formulation = getattr(pipe, "formulation", None)
    if formulation is not None and "vlb" in names:  # the discrete VLB is DDPM's T-step chain
        raise ValueError(
            f"likelihood method 'vlb' needs a ddpm run; this run's formulation is "
            f"{formulation.name!r}: use 'ode' (its probability-flow ODE)"
        )
    real = to_uint8(reference_images(_data_section(pipe) if reference is None else reference))
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(real), generator=gen)[: min(n, len(real))]
    images = real[pick].to(pipe.device)
    cond: dict[str, Any] = {}
    condition = "none"
    null_label = getattr(pipe, "num_classes", None)
    if null_label is not None:
        cond = {"class_labels": torch.full((len(images),), int(null_label))}
        condition = "null label (unconditional p(x))"
    out: dict[str, Any] = {
        "likelihood_n": len(images),
        "likelihood_seed": seed,
        "likelihood_condition": condition,
    }
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        if "vlb" in names:
            x0 = images.float() / 127.5 - 1.0  # the 8-bit grid on [-1, 1]
            bpd = bits_per_dim(
                pipe.model, x0, pipe.schedule, prediction=pipe.prediction,
                variance=pipe.variance, cond={k: v.to(pipe.device) for k, v in cond.items()},
                batch_size=batch_size, generator=torch.Generator().manual_seed(seed),
                progress=progress is not False,
            ).total  # fmt: skip
            out["bpd[vlb]"], out["bpd_std[vlb]"] = float(bpd.mean()), float(bpd.std())
        if "ode" in names:
            results, nfe = [], []
            ode_gen = torch.Generator().manual_seed(seed)
            for s in range(0, len(images), batch_size):
                e = min(s + batch_size, len(images))
                part = {k: v[s:e].to(pipe.device) for k, v in cond.items()}
                res = ode_likelihood(
                    pipe.model, images[s:e], pipe.schedule, prediction=pipe.prediction,
                    cond=part, generator=ode_gen, formulation=formulation,
                )  # fmt: skip
                results.append(res.bpd)
                nfe.append(res.nfe)
            bpd = torch.cat(results)
            out["bpd[ode]"], out["bpd_std[ode]"] = float(bpd.mean()), float(bpd.std())
            out["likelihood_ode_nfe"] = sum(nfe) / len(nfe)
    out["likelihood_seconds"] = round(time.perf_counter() - start, 3)
    return out


def _resolved(pipe: PipeLike, n: int, labels: Tensor | None, sampler, steps, scale, seed, options):
    """Sampler, steps and guidance a call will use (the run's defaults filled in; the options
    checked)."""
    if hasattr(pipe, "resolve_params"):
        p = pipe.resolve_params(n, labels, None, sampler, steps, scale, seed, **options)
        return p["sampler"], p["steps"], p["guidance_scale"]
    return sampler, steps, scale


def _json_options(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Sampler options as JSON values (tuples as lists), sorted; None when there are none."""
    if not options:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(options.items())}


def _evaluate_cell(
    pipe: PipeLike,
    ev: _Evaluator,
    n: int,
    sampler: str | None,
    steps: int | None,
    guidance_scale: float | None,
    seed: int,
    batch_size: int,
    sampler_options: Mapping[str, Any] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """One setting's row; with ``ranks``, sampled on every rank, scored on rank 0, and rank
    0's row returned on every rank."""
    ranks = ranks or Ranks()
    labels = _cycle_labels(pipe, n)
    options = _json_options(sampler_options)
    sampler, steps, guidance_scale = _resolved(
        pipe, n, labels, sampler, steps, guidance_scale, seed, options or {}
    )
    tick = time.perf_counter()
    images, labels, nfe = sample_images(
        pipe,
        n,
        sampler=sampler,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
        sampler_options=options,
        ranks=ranks,
    )
    sampled = time.perf_counter()
    if not ranks.is_main:  # rank 0 scores the gathered images and sends its row
        return ranks.from_main({})
    scores = ev(images, labels)
    row = {
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "sampler_options": options,
        "seed": seed,
        "nfe": nfe,
        "sample_seconds": round(sampled - tick, 3),
        "eval_seconds": round(time.perf_counter() - sampled, 3),
    }
    row.update(scores)
    if ranks.distributed:
        row["ranks"] = ranks.world_size
    return ranks.from_main(row)


def periodic_eval(
    pipe_like: PipeLike,
    metrics: Iterable[str] | str,
    n: int,
    seed: int,
    **kwargs: Any,
) -> dict[str, Any]:
    """Metrics of ``n`` fresh samples at the pipeline's default sampler/steps/guidance.

    A pure function for a training loop (no state, global RNG untouched): e.g. every
    ``eval_every`` steps, ``periodic_eval(Pipeline(ema_model, schedule, ...), ["fid",
    "accuracy"], 500, seed, reference=cfg.data)`` and log the returned dict with the step.
    ``kwargs`` are those of `evaluate_pipeline` (``reference``, ``extractor``, ``sampler``...).
    """
    return evaluate_pipeline(pipe_like, metrics=metrics, n=n, seed=seed, **kwargs)


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------

_KEY_FIELDS = ("sampler", "steps", "guidance_scale", "n", "seed", "metrics", "scorers", "options",
               "sampler_options", "prompts", "reference")  # fmt: skip


def _cell_key(row: Mapping[str, Any]) -> str:
    """Identity of a cell: sampler, steps, guidance, n, seed, metric set, extractors, options,
    given prompts and reference folder (absent from a run's own rows: ``None``)."""
    return json.dumps({k: row.get(k) for k in _KEY_FIELDS}, sort_keys=True)


@dataclass
class SweepResult:
    """The rows of one sweep (one per sampler × steps × guidance cell, in grid order).

    ``computed``: keys of the cells computed by this call (the others came from
    ``sweep.jsonl``); ``files``: every file written, by kind (see ``SWEEP_FILES``).
    """

    rows: list[dict[str, Any]]
    computed: list[str]
    out_dir: Path
    files: dict[str, Path]

    @property
    def metric_columns(self) -> list[str]:
        """Metric keys present in the rows (``"fid[digits-cnn]"``, ...), ``_std`` excluded."""
        return metric_columns(self.rows)

    def to_markdown(self) -> str:
        """The markdown table written to ``sweep.md``."""
        return _markdown(self.rows)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of ``sweep.jsonl``; a torn last line (crash mid-write) is dropped from the file."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    rows, good = [], []
    for line in text.splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and isinstance(row, dict):
            rows.append(row)
            good.append(line)
    if "".join(good) != text:  # rewrite without the broken line, atomically
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(good), encoding="utf-8")
        os.replace(tmp, path)
    return rows


def _append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one line and flush it to disk before the next cell starts."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _as_list(values: Iterable[Any] | str | int | float, cast: Callable[[Any], Any], what: str):
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    elif not isinstance(values, Iterable):
        values = [values]
    try:
        out = [cast(v.strip() if isinstance(v, str) else v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad {what} list {values!r}: {err}") from None
    if not out:
        raise ValueError(f"no {what} given")
    return list(dict.fromkeys(out))


def _positive_int(v: Any) -> int:
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"{v} is not an integer")
    i = int(v)
    if i < 1:
        raise ValueError(f"{i} is not positive")
    return i


def run_sweep(
    pipe_or_run_dir: PipeLike | str | os.PathLike,
    *,
    samplers: Iterable[str] | str,
    steps: Iterable[int] | str,
    cfg_scales: Iterable[float] | str,
    metrics: Iterable[str] | str,
    n: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool | None = None,
    extractor: FeatureExtractor | None = None,
    classifier: FeatureExtractor | None = None,
    reference: Tensor | Mapping[str, Any] | Any | None = None,
    reference_cache: str | os.PathLike | None = None,
    metric_options: Mapping[str, Any] | None = None,
    plots: bool = True,
    weights: str = "ema",
    device: torch.device | str | None = None,
    clip_model: Any = None,
    sampler_options: Mapping[str, Any] | None = None,
    prompts: Sequence[str] | None = None,
    tokenizer: str | os.PathLike | None = None,
    prediction: str | None = None,
    ranks: Ranks | None = None,
) -> SweepResult:
    """Evaluate every sampler × steps × guidance-scale cell and tabulate and plot the results.

    Resumable: each finished cell is appended (flushed, fsynced) to ``out_dir/sweep.jsonl``; a
    cell whose key (sampler, steps, guidance, n, seed, metric set, extractor ids, metric options)
    is already there is not recomputed. Writes ``sweep.csv``, ``sweep.md`` and, with
    ``plots``, ``sweep_nfe.png`` (metric vs NFE, a line per sampler, a panel per metric and
    guidance), ``sweep_guidance.png`` (metric vs guidance, a panel per metric and steps) and,
    when both FID and accuracy are measured, ``sweep_tradeoff.png`` (FID against accuracy
    across guidance scales, a line per sampler, a panel per steps).

    Every cell uses the same ``n`` samples' seeds and labels or prompts (see `sample_images`)
    and the same ``sampler_options`` (part of each cell's key, as are the ``prompts`` and a
    reference folder); metrics, ``reference``, ``prompts``, ``tokenizer`` and ``prediction``
    are those of `evaluate_pipeline` (an SD model is swept as a run is).
    ``progress``: a bar over cells (None: on when stderr is a terminal).
    ``ranks``: under ``torchrun``, each cell's samples are split over the ranks (see
    `evaluate_pipeline`); rank 0 alone reads and writes the files, and every rank returns
    the same result.
    """
    from difflab.samplers import SAMPLERS

    sampler_list = _as_list(samplers, str, "sampler")
    for name in sampler_list:
        SAMPLERS.resolve(name)  # unknown names raise with a did-you-mean
    step_list = _as_list(steps, _positive_int, "steps")
    scale_list = _as_list(cfg_scales, float, "guidance scale")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    pipe = load_pipeline(pipe_or_run_dir, weights=weights, device=device, prompts=prompts,
                         tokenizer=tokenizer, prediction=prediction)  # fmt: skip
    if getattr(pipe, "num_classes", None) is None and any(s != 1.0 for s in scale_list):
        raise ValueError(
            f"guidance scales {scale_list} need a class-conditional model; this model is "
            "unconditional, use --cfg 1"
        )
    ev = _Evaluator.build(
        pipe,
        metrics,
        extractor=extractor,
        classifier=classifier,
        reference=reference,
        reference_cache=reference_cache,
        batch_size=batch_size,
        metric_options=metric_options,
        clip_model=clip_model,
    )
    ranks = ranks or Ranks()
    out = Path(out_dir)
    log_path = out / SWEEP_FILES["jsonl"]
    done: dict[str, dict[str, Any]] = {}
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        done = {_cell_key(r): r for r in _read_jsonl(log_path)}
    done = ranks.from_main(done)  # every rank skips the same cells
    shared = {
        "n": n,
        "seed": seed,
        "metrics": sorted(ev.metrics),
        "scorers": sorted(
            ({ev.extractor.id} if ev.extractor else set())
            | ({ev.classifier.id} if ev.classifier else set())
            | ({ev.clip.id} if ev.clip is not None else set())
        ),
        "options": dict(sorted(ev.options.items())),
        "sampler_options": _json_options(sampler_options),
        **_source_settings(prompts, reference),
    }
    cells = list(itertools.product(sampler_list, step_list, scale_list))
    rows: list[dict[str, Any]] = []
    computed: list[str] = []
    bar = _cell_bar(len(cells), progress if ranks.is_main else False)
    try:
        for sampler, n_steps, scale in cells:
            key = _cell_key(
                {"sampler": sampler, "steps": n_steps, "guidance_scale": scale, **shared}
            )
            bar.set_postfix_str(f"{sampler} steps={n_steps} cfg={scale:g}")
            if key not in done:
                with warnings.catch_warnings():
                    if computed:  # the sample-count warning was given for the first cell
                        warnings.filterwarnings("ignore", message=_FEW_SAMPLES_WARNING)
                    row = _evaluate_cell(pipe, ev, n, sampler, n_steps, scale, seed,
                                         batch_size, sampler_options, ranks)  # fmt: skip
                row.update(shared, sampler=sampler, steps=n_steps, guidance_scale=scale)
                if ranks.is_main:
                    _append_jsonl(log_path, row)
                done[key] = row
                computed.append(key)
            rows.append(done[key])
            bar.update(1)
    finally:
        bar.close()
    files: dict[str, Path] = {}
    if ranks.is_main:
        files = {"jsonl": log_path, **write_tables(rows, out)}
        if plots:
            files.update(plot_sweep(rows, out))
    return SweepResult(rows, computed, out, ranks.from_main(files))


def _cell_bar(total: int, progress: bool | None):
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(total=total, desc="sweep", unit="cell", disable=disable)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

_FIRST_COLUMNS = ("sampler", "steps", "guidance_scale", "nfe", "n", "seed")


def metric_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Metric keys (``"name[extractor]"``) in first-seen order, ``*_std`` keys excluded."""
    cols: dict[str, None] = {}
    for row in rows:
        for k in row:
            m = _METRIC_KEY.match(k)
            if m and not m["name"].endswith("_std"):
                cols[k] = None
    return list(cols)


def _csv_value(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return ";".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else v


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    metrics = metric_columns(rows)
    head = ["sampler", "steps", "CFG", "NFE", *metrics, "sample s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r["sampler"], r["steps"], _fmt(r["guidance_scale"]), _fmt(r.get("nfe"))]
        for m in metrics:
            std = r.get(m.replace("[", "_std[", 1))
            cell = _fmt(r.get(m))
            vals.append(f"{cell} ± {_fmt(std)}" if std is not None else cell)
        vals.append(_fmt(r.get("sample_seconds")))
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    if rows:
        r0 = rows[0]
        settings = {k: r0[k] for k in r0 if k not in set(_FIRST_COLUMNS) | set(_KEY_FIELDS)}
        settings = {k: v for k, v in settings.items() if not _METRIC_KEY.match(k)}
        settings.pop("sample_seconds", None)
        settings.pop("eval_seconds", None)
        note = ", ".join(f"{k}={v}" for k, v in settings.items())
        if r0.get("sampler_options"):  # the same for every cell of one sweep
            note = f"sampling options {json.dumps(r0['sampler_options'])}, {note}"
        cycling = "labels cycling over the classes"
        if r0.get("prompts"):
            cycling = f"prompts cycling over {r0['prompts']['count']} given prompts"
        if r0.get("reference"):
            note = f"reference images from {r0['reference']}, {note}"
        lines += [
            "",
            f"n={r0.get('n')} samples per cell, seed {r0.get('seed')} (image i: seed+i), "
            f"{cycling}; {note}.",
        ]
        if isinstance(r0.get("n"), int) and r0["n"] < 10_000:
            lines.append(
                "FID/KID from fewer than 10,000 samples are biased by the sample count: compare "
                "them with each other, not with numbers in papers."
            )
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``sweep.csv`` (every field) and ``sweep.md`` (the summary table) atomically."""
    out = Path(out_dir)
    columns: dict[str, None] = dict.fromkeys(_FIRST_COLUMNS)
    for c in metric_columns(rows):
        columns[c] = None
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return {
        "csv": _write_atomic(out / SWEEP_FILES["csv"], buf.getvalue()),
        "markdown": _write_atomic(out / SWEEP_FILES["markdown"], _markdown(rows)),
    }


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on an Agg canvas: no pyplot, no global backend change)
# --------------------------------------------------------------------------------------------


def _series(rows, x: str, y: str, **fixed: Any) -> tuple[list[float], list[float]]:
    pts = sorted(
        (r[x], r[y])
        for r in rows
        if all(r.get(k) == v for k, v in fixed.items())
        and r.get(x) is not None
        and r.get(y) is not None
    )
    return [p[0] for p in pts], [p[1] for p in pts]


def _find(metrics: list[str], name: str) -> str | None:
    return next((m for m in metrics if (k := _METRIC_KEY.match(m)) and k["name"] == name), None)


def _log_ticks(ax: Any, values: list[float]) -> None:
    """Log x axis with plain-number ticks at 1, 2, 5, 10, 20, 50, ... (no 2×10¹ clutter)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    if not values:
        return
    lo, hi = min(values), max(values)
    nice = [m * 10**e for e in range(6) for m in (1, 2, 5)]
    ticks = [t for t in nice if lo / 1.5 <= t <= hi * 1.5] or [lo, hi]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def plot_sweep(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the sweep's PNG plots (see `run_sweep`); returns them by kind."""
    out = Path(out_dir)
    metrics = metric_columns(rows)
    if not rows or not metrics:
        return {}
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    scales = sorted({r["guidance_scale"] for r in rows})
    step_list = sorted({r["steps"] for r in rows})
    files = {}

    fig, axes = new_figure(len(metrics), len(scales))  # metric vs NFE
    for i, m in enumerate(metrics):
        for j, w in enumerate(scales):
            ax = axes[i][j]
            for s in samplers:
                xs, ys = _series(rows, "nfe", m, sampler=s, guidance_scale=w)
                ax.plot(xs, ys, marker="o", label=s)
            ax.set(xlabel="NFE", ylabel=m, title=f"CFG {w:g}")
            _log_ticks(ax, [r["nfe"] for r in rows if r.get("nfe")])
    axes[0][0].legend(fontsize="small")
    files["nfe_plot"] = save_figure(fig, out / SWEEP_FILES["nfe_plot"])

    fig, axes = new_figure(len(metrics), len(step_list))  # metric vs guidance
    for i, m in enumerate(metrics):
        for j, k in enumerate(step_list):
            ax = axes[i][j]
            for s in samplers:
                xs, ys = _series(rows, "guidance_scale", m, sampler=s, steps=k)
                ax.plot(xs, ys, marker="o", label=s)
            ax.set(xlabel="guidance scale", ylabel=m, title=f"{k} steps")
    axes[0][0].legend(fontsize="small")
    files["guidance_plot"] = save_figure(fig, out / SWEEP_FILES["guidance_plot"])

    fid, acc = _find(metrics, "fid"), _find(metrics, "accuracy")
    if fid and acc:  # the guidance trade-off: quality of the distribution vs class fidelity
        fig, axes = new_figure(1, len(step_list))
        for j, k in enumerate(step_list):
            ax = axes[0][j]
            for s in samplers:
                pts = [r for r in rows if r["sampler"] == s and r["steps"] == k]
                pts.sort(key=lambda r: r["guidance_scale"])
                ax.plot([r[fid] for r in pts], [r[acc] for r in pts], marker="o", label=s)
                for r in pts:
                    ax.annotate(f"{r['guidance_scale']:g}", (r[fid], r[acc]), fontsize="x-small")
            ax.set(xlabel=fid, ylabel=acc, title=f"{k} steps (labels: CFG scale)")
        axes[0][0].legend(fontsize="small")
        files["tradeoff_plot"] = save_figure(fig, out / SWEEP_FILES["tradeoff_plot"])
    return files
