"""Evaluation of a trained JEM: calibration, OOD detection, robustness, samples and FID/IS, as a report with figures.

Importing this package loads matplotlib's object API only (never ``pyplot``), with the Agg canvas: no window opens.
"""

from jemkit.evaluate.generative import (
    ClassifierLogits,
    PenultimateFeatures,
    fid_score,
    format_generative,
    generative_metrics,
    inception_images,
    inception_score,
)
from jemkit.evaluate.plots import reliability_diagram, save_figure, score_histogram
from jemkit.evaluate.report import DEFAULT_ATTACKS, evaluate, format_report
from jemkit.evaluate.robustness import gaussian_noise_corruption, pgd_attack, robust_accuracy

__all__ = [
    "DEFAULT_ATTACKS",
    "ClassifierLogits",
    "PenultimateFeatures",
    "evaluate",
    "fid_score",
    "format_generative",
    "format_report",
    "gaussian_noise_corruption",
    "generative_metrics",
    "inception_images",
    "inception_score",
    "pgd_attack",
    "reliability_diagram",
    "robust_accuracy",
    "save_figure",
    "score_histogram",
]
