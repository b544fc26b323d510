"""Out-of-distribution detection, one pipeline for the report and the callbacks.

- :mod:`jemkit.ood.scores`: the JEM's own scores (``logpx``, ``msp``, ``max_logit``, ``grad_norm``), the fused score,
  the one scoring loop and the comparison;
- :mod:`jemkit.ood.features`: a classifier's features, captured by a hook during an ordinary forward;
- :mod:`jemkit.ood.detectors`: the post-hoc detectors a user gets without training (pytorch-ood's Mahalanobis,
  relative Mahalanobis, KNN, ViM), one file each, registered by name;
- :mod:`jemkit.ood.pipeline`: :class:`OODOptions` and :class:`OODPipeline` (fit -> score -> compare).
"""

from jemkit.ood.detectors import DETECTORS, POSTHOC_DETECTORS, Detector, PostHocDetectors
from jemkit.ood.features import FeatureHook, extract_features, last_linear
from jemkit.ood.pipeline import OODOptions, OODPipeline, OODResult, build_ood_sets
from jemkit.ood.scores import (
    FUSED_PARTS,
    RECOMMENDED_SCORE,
    SCORES,
    FusedReference,
    FusedScore,
    PostHocScores,
    compare_scores,
    ood_scores,
    reversed_scores,
    score_batches,
)

__all__ = [
    "DETECTORS",
    "FUSED_PARTS",
    "POSTHOC_DETECTORS",
    "RECOMMENDED_SCORE",
    "SCORES",
    "Detector",
    "FeatureHook",
    "FusedReference",
    "FusedScore",
    "OODOptions",
    "OODPipeline",
    "OODResult",
    "PostHocDetectors",
    "PostHocScores",
    "build_ood_sets",
    "compare_scores",
    "extract_features",
    "last_linear",
    "ood_scores",
    "reversed_scores",
    "score_batches",
]
