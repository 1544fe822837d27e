"""Public alias of `difflab.eval.metrics`, so ``dl.metrics.frechet_distance(...)`` works.

Owns nothing: every name is defined in `difflab.eval.metrics`.
"""

from difflab.eval.metrics import (
    KID,
    FeatureStats,
    PrecisionRecall,
    cached_features,
    cached_stats,
    compute_stats,
    conditional_accuracy,
    evaluate,
    extract_features,
    fid_from_stats,
    frechet_distance,
    inception_score,
    kid,
    polynomial_mmd2,
    precision_recall,
    to_uint8,
)

__all__ = [
    "KID",
    "FeatureStats",
    "PrecisionRecall",
    "cached_features",
    "cached_stats",
    "compute_stats",
    "conditional_accuracy",
    "evaluate",
    "extract_features",
    "fid_from_stats",
    "frechet_distance",
    "inception_score",
    "kid",
    "polynomial_mmd2",
    "precision_recall",
    "to_uint8",
]
