"""Metrics that torchmetrics lacks or that JEM evaluations want in one place: OOD detection and calibration.

Each comes as a functional core plus a :class:`torchmetrics.Metric` whose states reduce across DDP ranks by
themselves. OOD scores follow the jemkit convention: higher means more in-distribution.
"""

from jemkit.metrics.calibration import (
    CalibrationMetrics,
    ReliabilityDiagram,
    brier_score,
    expected_calibration_error,
    max_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from jemkit.metrics.ood import OODMetrics, fpr_at_tpr, ood_metrics
from jemkit.metrics.temperature import fit_temperature

__all__ = [
    "CalibrationMetrics",
    "OODMetrics",
    "ReliabilityDiagram",
    "brier_score",
    "expected_calibration_error",
    "fit_temperature",
    "fpr_at_tpr",
    "max_calibration_error",
    "negative_log_likelihood",
    "ood_metrics",
    "reliability_bins",
]
