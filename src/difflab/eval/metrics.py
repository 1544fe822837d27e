"""Sample-quality metrics on extractor features: FID, KID, precision/recall, IS, accuracy.

Owns: uint8 quantisation (`to_uint8`, applied once before any features), Fréchet distance
(Heusel et al. 2017, pytorch-fid formula), KID (Bińkowski et al. 2018), improved
precision/recall (Kynkäänniemi et al. 2019), Inception score (Salimans et al. 2016),
conditional accuracy, `FeatureStats` (``.npz``) with cached reference statistics, and
`evaluate`, which returns every number keyed by its extractor id with its settings.

Knows nothing of models or samplers: it takes images (float in [-1, 1] or uint8) and a
`FeatureExtractor`. Metric arithmetic is numpy float64. Randomness only via generators.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch
from scipy.special import xlogy
from torch import Tensor

from difflab._validate import check_choice
from difflab.eval.features import FeatureExtractor

PAPER_SAMPLE_COUNT = 10_000  # FID/KID below this many samples are not comparable with papers
METRICS: tuple[str, ...] = ("fid", "kid", "precision_recall", "inception_score", "accuracy")


def to_uint8(images: Tensor) -> Tensor:
    """Quantise float images in ``[-1, 1]`` to ``uint8`` ``[0, 255]`` (round, then clamp).

    The one quantisation step before any feature extractor, so that metrics see what a saved
    PNG would hold. ``uint8`` input is returned unchanged.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"to_uint8 takes float images in [-1, 1] or uint8, got {images.dtype}")
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _warn_few_samples(metric: str, n: int) -> None:
    if n < PAPER_SAMPLE_COUNT:
        warnings.warn(
            f"{metric} computed from {n} samples (< {PAPER_SAMPLE_COUNT:,}): the value is "
            "biased by the sample count and not comparable with numbers in papers",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Fréchet distance and feature statistics
# --------------------------------------------------------------------------------------------


def frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Fréchet distance between Gaussians N(mu1, cov1), N(mu2, cov2) (Heusel et al. 2017).

    ``d² = ||mu1 - mu2||² + Tr(cov1 + cov2 - 2 (cov1 cov2)^½)``, computed as pytorch-fid does:
    float64, ``scipy.linalg.sqrtm``; if the product's root is not finite (singular product),
    ``eps`` is added to both diagonals; an imaginary part larger than 1e-3 on the diagonal is an
    error, a smaller one is numerical noise and dropped. Shapes: ``mu [D]``, ``cov [D, D]``.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    cov1, cov2 = (
        np.atleast_2d(np.asarray(cov1, np.float64)),
        np.atleast_2d(np.asarray(cov2, np.float64)),
    )
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
            f"cov {cov1.shape} vs {cov2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # singular products are handled below
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(mu1.size) * eps
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError(f"sqrt(cov1 @ cov2) has an imaginary component {max_imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of ``count`` features from ``extractor``."""

    mean: np.ndarray
    cov: np.ndarray
    count: int
    extractor: str

    @classmethod
    def from_features(cls, features: np.ndarray | Tensor, extractor: str) -> FeatureStats:
        """Unbiased (ddof=1) statistics of features ``[N, D]``."""
        feats = _as_float64(features)
        if feats.shape[0] < 2:
            raise ValueError(
                f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}"
            )
        return cls(feats.mean(0), np.cov(feats, rowvar=False), feats.shape[0], extractor)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``.npz`` (mu, sigma as pytorch-fid names them; count; extractor id)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=self.mean, sigma=self.cov, count=self.count, extractor=self.extractor)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a file written by `save` (or a pytorch-fid ``.npz`` with mu/sigma only)."""
        with np.load(path, allow_pickle=False) as data:
            count = int(data["count"]) if "count" in data else -1
            extractor = str(data["extractor"]) if "extractor" in data else "unknown"
            return cls(
                data["mu"].astype(np.float64), data["sigma"].astype(np.float64), count, extractor
            )


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two `FeatureStats` from the same extractor."""
    if a.extractor != b.extractor:
        raise ValueError(f"FID between different extractors: {a.extractor!r} vs {b.extractor!r}")
    known = [c for c in (a.count, b.count) if c >= 0]  # -1: count not stored (pytorch-fid file)
    if known:
        _warn_few_samples("FID", min(known))
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def _as_float64(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {x.shape}")
    return x


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    """Yield uint8 batches of at most ``batch_size`` from a tensor or an iterable of batches."""
    chunks = [images] if isinstance(images, Tensor) else images
    for chunk in chunks:
        yield from to_uint8(chunk).split(batch_size)


def extract_features(
    extractor: FeatureExtractor, images: Tensor | Iterable[Tensor], *, batch_size: int = 100
) -> np.ndarray:
    """Features ``[N, D]`` (float64) of images (float in [-1, 1] or uint8), in batches."""
    feats = [extractor(batch).double().numpy() for batch in _batches(images, batch_size)]
    if not feats:
        raise ValueError("no images given")
    return np.concatenate(feats, axis=0)


def compute_stats(
    extractor: FeatureExtractor, images: Tensor | Iterable[Tensor], batch_size: int = 100
) -> FeatureStats:
    """`FeatureStats` of images, streamed in batches (memory independent of N).

    Sums are taken around the first batch's mean (shifted data) for float64 accuracy.
    """
    shift: np.ndarray | None = None
    s1 = s2 = np.zeros(0)  # the first batch sets these and shift
    n = 0
    for batch in _batches(images, batch_size):
        f = extractor(batch).double().numpy()  # (B, D)
        if shift is None:
            shift = f.mean(0)
            s1, s2 = np.zeros_like(shift), np.zeros((f.shape[1], f.shape[1]))
        f = f - shift
        s1 += f.sum(0)
        s2 += f.T @ f
        n += f.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {n}")
    assert shift is not None  # n > 0: a batch was seen
    mean_c = s1 / n
    cov = (s2 - n * np.outer(mean_c, mean_c)) / (n - 1)
    return FeatureStats(mean_c + shift, cov, n, extractor.id)


def cached_stats(
    path: str | os.PathLike,
    extractor: FeatureExtractor,
    images: Tensor | Iterable[Tensor],
    batch_size: int = 100,
) -> FeatureStats:
    """Reference statistics from ``path`` if it holds this extractor's; else compute and save."""
    path = Path(path)
    if path.is_file():
        stats = FeatureStats.load(path)
        if stats.extractor == extractor.id:
            return stats
        warnings.warn(
            f"{path} holds statistics of {stats.extractor!r}, not {extractor.id!r}; recomputing",
            stacklevel=2,
        )
    stats = compute_stats(extractor, images, batch_size)
    stats.save(path)
    return stats


def cached_features(
    path: str | os.PathLike,
    extractor: FeatureExtractor,
    images: Tensor | Iterable[Tensor],
    batch_size: int = 100,
) -> np.ndarray:
    """Reference features ``[N, D]`` from ``path`` (``.npz``) if made by this extractor; else
    computed and saved (KID and precision/recall need features, not just statistics)."""
    path = Path(path)
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if str(data["extractor"]) == extractor.id:
                return data["features"].astype(np.float64)
    feats = extract_features(extractor, images, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, features=feats.astype(np.float32), extractor=extractor.id)
    os.replace(tmp, path)
    return feats.astype(np.float32).astype(np.float64)  # same values as a later cache hit


# --------------------------------------------------------------------------------------------
# KID, precision/recall, Inception score, accuracy
# --------------------------------------------------------------------------------------------


class KID(NamedTuple):
    """Kernel Inception Distance estimate: mean and std over subsets."""

    mean: float
    std: float


def _rng(generator: np.random.Generator | int | None) -> np.random.Generator:
    # None means a fixed seed: metrics are reproducible without touching global state.
    return (
        generator
        if isinstance(generator, np.random.Generator)
        else np.random.default_rng(generator or 0)
    )


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with kernel ``k(a, b) = (a·b / d + 1)³`` (Bińkowski et al. 2018, eq. 3)."""
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kid(
    feats1: np.ndarray | Tensor,
    feats2: np.ndarray | Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: np.random.Generator | int | None = None,
) -> KID:
    """KID (Bińkowski et al. 2018): unbiased polynomial-kernel MMD² averaged over random subsets.

    Each subset draws ``min(subset_size, N1, N2)`` rows without replacement from each set.
    ``generator``: numpy Generator or seed (None = seed 0). Features ``[N, D]``.
    """
    x, y = _as_float64(feats1), _as_float64(feats2)
    _warn_few_samples("KID", min(len(x), len(y)))
    rng = _rng(generator)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    values = [
        polynomial_mmd2(
            x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
        )
        for _ in range(subsets)
    ]
    return KID(float(np.mean(values)), float(np.std(values)))


class PrecisionRecall(NamedTuple):
    """Improved precision and recall (Kynkäänniemi et al. 2019)."""

    precision: float
    recall: float


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(a), len(b)]`` (clamped at 0)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _knn_radii(feats: np.ndarray, k: int, block: int) -> np.ndarray:
    """Squared distance of each row to its k-th nearest other row."""
    if len(feats) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} samples, got {len(feats)}")
    radii = np.empty(len(feats))
    for s in range(0, len(feats), block):
        d = _sq_dists(feats[s : s + block], feats)  # (b, N); self-distance 0 is column k=0
        radii[s : s + block] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, block: int) -> float:
    """Fraction of ``queries`` inside at least one ball (centre in ``manifold``, radius²)."""
    inside = np.zeros(len(queries), dtype=bool)
    for s in range(0, len(queries), block):
        d = _sq_dists(queries[s : s + block], manifold)  # (b, N)
        inside[s : s + block] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(
    real_feats: np.ndarray | Tensor,
    fake_feats: np.ndarray | Tensor,
    k: int = 3,
    *,
    block: int = 1024,
) -> PrecisionRecall:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN hypersphere manifolds.

    precision = share of fakes inside the real manifold (union of balls around each real
    sample with its k-th-neighbour radius); recall = share of reals inside the fake manifold.
    """
    real, fake = _as_float64(real_feats), _as_float64(fake_feats)
    real_radii, fake_radii = _knn_radii(real, k, block), _knn_radii(fake, k, block)
    return PrecisionRecall(
        precision=_coverage(real, real_radii, fake, block),
        recall=_coverage(fake, fake_radii, real, block),
    )


def inception_score(logits: np.ndarray | Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))``, mean and std
    over ``splits`` consecutive chunks of ``logits [N, K]``."""
    z = _as_float64(logits)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)  # p(y|x), (N, K)
    scores = []
    for part in np.array_split(p, splits):
        p_y = part.mean(0, keepdims=True)  # marginal p(y) of the split
        kl = (xlogy(part, part) - xlogy(part, p_y)).sum(1)  # 0·log 0 = 0
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def conditional_accuracy(
    classifier: FeatureExtractor,
    images: Tensor | Iterable[Tensor],
    labels: Tensor | Sequence[int],
    *,
    batch_size: int = 256,
) -> float:
    """Share of generated images the classifier assigns to their conditioning label."""
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    preds = torch.cat([classifier.logits(b).argmax(1) for b in _batches(images, batch_size)])
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} images but {len(labels)} labels")
    return float((preds == labels).double().mean())


# --------------------------------------------------------------------------------------------
# High-level evaluation
# --------------------------------------------------------------------------------------------


def evaluate(
    images: Tensor | Iterable[Tensor],
    reference: Tensor | Iterable[Tensor] | None = None,
    *,
    extractor: FeatureExtractor,
    metrics: Sequence[str] = ("fid", "kid", "precision_recall"),
    labels: Tensor | Sequence[int] | None = None,
    classifier: FeatureExtractor | None = None,
    reference_cache: str | os.PathLike | None = None,
    batch_size: int = 100,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    is_splits: int = 10,
    generator: np.random.Generator | int | None = None,
) -> dict[str, object]:
    """Evaluate generated ``images`` against ``reference`` images; every number names its source.

    Images are float in [-1, 1] (quantised with `to_uint8`) or uint8. Keys are
    ``"<metric>[<extractor id>]"`` (``fid``, ``kid``, ``kid_std``, ``precision``, ``recall``,
    ``is``, ``is_std``, ``accuracy``) plus ``n``, ``n_ref`` and the extractor's settings
    (``extractor``, ``resize``, ...). ``reference_cache``: ``.npz`` path for reference features.
    """
    for m in metrics:
        check_choice("metric", m, METRICS)
    if not isinstance(images, Tensor):
        images = [to_uint8(b) for b in images]  # iterated more than once below
    fake = extract_features(extractor, images, batch_size=batch_size)
    out: dict[str, object] = {"n": len(fake), **extractor.settings()}
    tag = f"[{extractor.id}]"
    if {"fid", "kid", "precision_recall"} & set(metrics):
        if reference is None and reference_cache is None:
            raise ValueError(
                "fid / kid / precision_recall need reference images or reference_cache"
            )
        if reference_cache is not None:
            if reference is None and not Path(reference_cache).is_file():
                raise FileNotFoundError(f"no reference images and no cache at {reference_cache}")
            real = cached_features(
                reference_cache, extractor, reference if reference is not None else []
            )
        else:
            assert reference is not None  # checked above: reference or reference_cache
            real = extract_features(extractor, reference, batch_size=batch_size)
        out["n_ref"] = len(real)
        if "fid" in metrics:
            a = FeatureStats.from_features(fake, extractor.id)
            b = FeatureStats.from_features(real, extractor.id)
            out["fid" + tag] = fid_from_stats(a, b)
        if "kid" in metrics:
            res = kid(fake, real, kid_subsets, kid_subset_size, generator)
            out["kid" + tag], out["kid_std" + tag] = res.mean, res.std
            out["kid_subsets"], out["kid_subset_size"] = (
                kid_subsets,
                min(kid_subset_size, len(fake), len(real)),
            )
        if "precision_recall" in metrics:
            pr = precision_recall(real, fake, k=pr_k)
            out["precision" + tag], out["recall" + tag], out["pr_k"] = pr.precision, pr.recall, pr_k
    if "inception_score" in metrics:
        logits = torch.cat([extractor.logits(b) for b in _batches(images, batch_size)])
        out["is" + tag], out["is_std" + tag] = inception_score(logits, is_splits)
        out["is_splits"] = is_splits
    if "accuracy" in metrics:
        if classifier is None or labels is None:
            raise ValueError("metric 'accuracy' needs classifier= and labels=")
        out[f"accuracy[{classifier.id}]"] = conditional_accuracy(classifier, images, labels)
    return out
