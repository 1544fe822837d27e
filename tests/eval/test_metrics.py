"""Known answers for difflab.eval.metrics: FID formula, KID, precision/recall, IS, stats."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from difflab.eval.features import FeatureExtractor
from difflab.eval.metrics import (
    FeatureStats,
    cached_stats,
    compute_stats,
    conditional_accuracy,
    evaluate,
    fid_from_stats,
    frechet_distance,
    inception_score,
    kid,
    polynomial_mmd2,
    precision_recall,
    to_uint8,
)


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def reference_fid_eig(mu1, cov1, mu2, cov2) -> float:
    """Independent formula: Tr((S1 S2)^½) = Σ sqrt(eig(S1^½ S2 S1^½)), via symmetric eigh."""
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)


# ------------------------------------------------------------------------------- Fréchet


def test_frechet_matches_independent_formula_and_is_symmetric():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        cov1, cov2 = random_spd(rng, d), random_spd(rng, d)
        ours = frechet_distance(mu1, cov1, mu2, cov2)
        assert ours == pytest.approx(reference_fid_eig(mu1, cov1, mu2, cov2), abs=1e-6, rel=1e-9)
        assert ours == pytest.approx(frechet_distance(mu2, cov2, mu1, cov1), abs=1e-6)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    s1, s2 = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, abs=1e-6)


def test_frechet_zero_for_identical_stats():
    rng = np.random.default_rng(2)
    mu, cov = rng.standard_normal(16), random_spd(rng, 16)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-6


def test_frechet_singular_covariances_use_eps_offset():
    # rank-1 covariances: the product's root is ill-conditioned; result must stay finite and
    # match the closed form of two degenerate Gaussians along the same axis.
    d = 8
    u = np.zeros(d)
    u[0] = 1.0
    cov1, cov2 = 4.0 * np.outer(u, u), 1.0 * np.outer(u, u)
    got = frechet_distance(np.zeros(d), cov1, np.zeros(d), cov2)
    assert np.isfinite(got)
    assert got == pytest.approx((2.0 - 1.0) ** 2, abs=1e-3)


# ------------------------------------------------------------------------------- stats


class LinearExtractor(FeatureExtractor):
    """Deterministic toy extractor: flattened pixels in [0, 1] -> fixed linear map."""

    id = "toy-linear"

    def __init__(self, in_dim: int, feature_dim: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(in_dim, feature_dim, generator=g)
        self.feature_dim = feature_dim
        self.num_classes = feature_dim

    def __call__(self, images):
        assert images.dtype == torch.uint8
        return images.flatten(1).float() / 255.0 @ self.weight

    def logits(self, images):
        return self(images)


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 191, 255, 255]  # 127.5 rounds to even: 128
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(u), u)
    assert torch.equal(to_uint8(u.float() / 127.5 - 1.0), u)  # exact round trip of all levels


def test_compute_stats_streaming_equals_numpy_and_roundtrips(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 1, 3, 3), dtype=torch.uint8, generator=g)
    ex = LinearExtractor(9)
    stats = compute_stats(ex, images, batch_size=5)
    feats = ex(images).double().numpy()
    assert stats.count == 37 and stats.extractor == "toy-linear"
    np.testing.assert_allclose(stats.mean, feats.mean(0), atol=1e-10)
    np.testing.assert_allclose(stats.cov, np.cov(feats, rowvar=False), atol=1e-10)
    # iterable of batches == one tensor
    stats_it = compute_stats(ex, iter(images.split(10)), batch_size=4)
    np.testing.assert_allclose(stats_it.cov, stats.cov, atol=1e-10)
    stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.count == 37 and back.extractor == "toy-linear"
    np.testing.assert_array_equal(back.cov, stats.cov)


def test_cached_stats_reuses_file_for_same_extractor(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (20, 1, 2, 2), dtype=torch.uint8, generator=g)
    ex = LinearExtractor(4)
    first = cached_stats(tmp_path / "ref.npz", ex, images)
    # a cache hit must not touch the images: pass garbage that would fail if used
    again = cached_stats(tmp_path / "ref.npz", ex, images=None)
    np.testing.assert_array_equal(first.mean, again.mean)


def test_fid_warns_below_10k_samples_and_rejects_mixed_extractors():
    rng = np.random.default_rng(0)
    a = FeatureStats.from_features(rng.standard_normal((50, 3)), "x")
    with pytest.warns(UserWarning, match="50 samples.*not comparable"):
        fid_from_stats(a, a)
    b = FeatureStats(a.mean, a.cov, 20_000, "y")
    with pytest.raises(ValueError, match="different extractors"):
        fid_from_stats(a, b)
    big = FeatureStats(a.mean, a.cov, 20_000, "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert abs(fid_from_stats(big, big)) < 1e-6


# ------------------------------------------------------------------------------- KID


def brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_whole_set_subset_equals_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((15, 4)), rng.standard_normal((15, 4)) + 0.5
    expected = brute_force_mmd2(x, y)
    assert polynomial_mmd2(x, y) == pytest.approx(expected, rel=1e-10)
    with pytest.warns(UserWarning, match="15 samples"):
        res = kid(x, y, subsets=5, subset_size=100, generator=np.random.default_rng(1))
    assert res.mean == pytest.approx(expected, rel=1e-10)
    assert res.std == pytest.approx(0.0, abs=1e-12)  # every subset is a permutation of the set


@pytest.mark.filterwarnings("ignore:KID computed")
def test_kid_near_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1000, 8)), rng.standard_normal((1000, 8))
    same = kid(x, y, subsets=20, subset_size=300, generator=1)
    assert abs(same.mean) < 2 * same.std
    shifted = kid(x, y + 1.0, subsets=20, subset_size=300, generator=1)
    assert shifted.mean > 10 * shifted.std > 0
    assert kid(x, y, subsets=5, subset_size=100, generator=3) == kid(
        x, y, subsets=5, subset_size=100, generator=3
    )


# ------------------------------------------------------------------------------- P/R


def clusters(rng, centres, n_per, scale=0.1):
    return np.concatenate([c + scale * rng.standard_normal((n_per, len(c))) for c in centres])


def test_precision_recall_identical_sets_give_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_give_zero():
    rng = np.random.default_rng(0)
    real = clusters(rng, [np.zeros(4)], 100)
    fake = clusters(rng, [np.full(4, 100.0)], 100)
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    rng = np.random.default_rng(0)
    centres = [np.eye(6)[i] * 50 for i in range(4)]
    real = clusters(rng, centres, 100)  # 4 modes
    # exact: fakes are the real samples of modes 0 and 1
    pr = precision_recall(real, real[:200], k=3)
    assert pr.precision == 1.0 and pr.recall == 0.5
    # sampled: fresh draws from 2 of 4 well-separated 2-D modes
    centres_2d = [50 * np.array(c, dtype=float) for c in ((1, 0), (0, 1), (-1, 0), (0, -1))]
    real = clusters(rng, centres_2d, 250)
    fake = clusters(rng, centres_2d[:2], 250)
    pr = precision_recall(real, fake, k=5, block=64)
    assert pr.precision > 0.97
    assert pr.recall == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------------------- IS, acc


def test_inception_score_known_values():
    k, splits = 7, 5
    labels = np.tile(np.arange(k), 4 * splits)  # every split uniform over classes
    confident = 1e3 * np.eye(k)[labels]
    mean, std = inception_score(confident, splits=splits)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    same = np.tile(np.random.default_rng(0).standard_normal(k), (40, 1))
    assert inception_score(same, splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    uniform = np.zeros((40, k))  # uncertain predictions
    assert inception_score(uniform, splits=4)[0] == pytest.approx(1.0, abs=1e-12)


def test_conditional_accuracy_counts_matches():
    ex = LinearExtractor(4, feature_dim=3)
    images = torch.randint(0, 256, (30, 1, 2, 2), dtype=torch.uint8)
    preds = ex.logits(images).argmax(1)
    labels = preds.clone()
    labels[:6] = (labels[:6] + 1) % 3  # 6 of 30 wrong
    assert conditional_accuracy(ex, images, labels, batch_size=7) == pytest.approx(24 / 30)


# ------------------------------------------------------------------------------- evaluate


def test_evaluate_keys_carry_extractor_and_settings(tmp_path):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(60, 1, 2, 2, generator=g) * 2 - 1
    fake = torch.rand(40, 1, 2, 2, generator=g) * 2 - 1
    ex = LinearExtractor(4)
    with pytest.warns(UserWarning, match="not comparable"):
        res = evaluate(
            fake,
            real,
            extractor=ex,
            metrics=("fid", "kid", "precision_recall", "inception_score"),
            reference_cache=tmp_path / "ref.npz",
            kid_subsets=4,
            is_splits=2,
        )
    assert res["n"] == 40 and res["n_ref"] == 60 and res["extractor"] == "toy-linear"
    for key in ("fid", "kid", "kid_std", "precision", "recall", "is", "is_std"):
        assert f"{key}[toy-linear]" in res
    real_f = ex(to_uint8(real)).double().numpy()
    fake_f = ex(to_uint8(fake)).double().numpy()
    expected = frechet_distance(
        fake_f.mean(0), np.cov(fake_f, rowvar=False), real_f.mean(0), np.cov(real_f, rowvar=False)
    )
    assert res["fid[toy-linear]"] == pytest.approx(expected, rel=1e-5)  # cache stores float32
    # second call: reference from the cache alone
    with pytest.warns(UserWarning):
        again = evaluate(
            fake, None, extractor=ex, metrics=("fid",), reference_cache=tmp_path / "ref.npz"
        )
    assert again["fid[toy-linear]"] == res["fid[toy-linear]"]
    with pytest.raises(ValueError, match="unknown metric 'fdi'; did you mean 'fid'"):
        evaluate(fake, real, extractor=ex, metrics=("fdi",))
