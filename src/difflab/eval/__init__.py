"""Evaluation: FID/KID, precision/recall, Inception score, conditional accuracy, CLIP score,
likelihood, and sweeps of a trained run over sampler × steps × guidance.

Owns metrics and the feature extractors they are computed with; knows nothing of how the
images were made. Every number is reported under the id of the extractor that produced it.
"""

from difflab.eval.clip import CLIPScorer, clip_score
from difflab.eval.features import (
    DigitsClassifier,
    FeatureExtractor,
    InceptionV3Features,
    cache_dir,
)
from difflab.eval.likelihood import ODELikelihood, dequantize, ode_likelihood
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
    precision_recall,
    to_uint8,
)
from difflab.eval.ranks import Ranks
from difflab.eval.shapes_classifier import ShapesClassifier
from difflab.eval.sweep import SweepResult, evaluate_pipeline, periodic_eval, run_sweep

__all__ = [
    "KID",
    "CLIPScorer",
    "ODELikelihood",
    "Ranks",
    "clip_score",
    "dequantize",
    "ode_likelihood",
    "DigitsClassifier",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionV3Features",
    "PrecisionRecall",
    "ShapesClassifier",
    "cache_dir",
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
    "precision_recall",
    "to_uint8",
    "SweepResult",
    "evaluate_pipeline",
    "periodic_eval",
    "run_sweep",
]
