"""Evaluation of a trained JEM: calibration, OOD detection, robustness, shift, samples and FID/IS, as a report.

One job a module: ``report`` (:func:`evaluate`, the orchestration), ``calibration``, ``ood`` (the OOD section's
figures and table over :mod:`jemkit.ood`), ``baseline`` (the plain classifier beside the JEM), ``robustness`` (a
package: attacks, their configs, the defence, the threat model, the loop), ``shift`` (the protocol over
:mod:`jemkit.data.corruptions`), ``samples`` and ``generative`` (the sections over :mod:`jemkit.pictures` and
:mod:`jemkit.metrics.generative`), ``loading`` (checkpoints, datamodules, the baseline), ``command`` (``jemkit
evaluate``). Callbacks never import this package: what both need lives below it.
"""

from jemkit.data.corruptions import corrupt
from jemkit.evaluate.calibration import CalibrationOptions, calibration_report
from jemkit.evaluate.report import evaluate, format_report
from jemkit.evaluate.robustness import (
    DEFAULT_ATTACKS,
    STANDARD_BUDGETS,
    Defense,
    RobustnessOptions,
    autoattack,
    gaussian_noise_corruption,
    jem_defense,
    pgd_attack,
    robust_accuracy,
    threat_model,
)
from jemkit.evaluate.samples import SampleOptions
from jemkit.evaluate.shift import ShiftOptions, format_shift, shift_report
from jemkit.loading import load_classifier, load_datamodule, load_jem
from jemkit.metrics.generative import GenerativeOptions, fid_score, generative_metrics, inception_score
from jemkit.ood.pipeline import OODOptions

__all__ = [
    "DEFAULT_ATTACKS",
    "STANDARD_BUDGETS",
    "CalibrationOptions",
    "Defense",
    "GenerativeOptions",
    "OODOptions",
    "RobustnessOptions",
    "SampleOptions",
    "ShiftOptions",
    "autoattack",
    "calibration_report",
    "corrupt",
    "evaluate",
    "fid_score",
    "format_report",
    "format_shift",
    "gaussian_noise_corruption",
    "generative_metrics",
    "inception_score",
    "jem_defense",
    "load_classifier",
    "load_datamodule",
    "load_jem",
    "pgd_attack",
    "robust_accuracy",
    "shift_report",
    "threat_model",
]
