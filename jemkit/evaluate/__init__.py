"""Evaluation of a trained JEM: calibration, OOD detection, robustness, samples and FID/IS, as a report with figures.

One job a module: ``report`` (the orchestration, :func:`evaluate`), ``calibration``, ``ood``, ``robustness`` (the
loop) with ``attacks`` (PGD, AutoAttack, noise), ``attack_config`` (configs, budgets, the box), ``defense`` and
``threat``; ``samples`` (the one way samples are drawn, and pictures), ``generative`` (FID/IS), ``plots``.
Importing this package loads matplotlib's object API only (never ``pyplot``), with the Agg canvas: no window opens.
"""

from jemkit.evaluate.attack_config import DEFAULT_ATTACKS, STANDARD_BUDGETS
from jemkit.evaluate.attacks import autoattack, gaussian_noise_corruption, pgd_attack
from jemkit.evaluate.calibration import CalibrationOptions, calibration_report
from jemkit.evaluate.defense import Defense, jem_defense
from jemkit.evaluate.generative import (
    ClassifierLogits,
    GenerativeOptions,
    PenultimateFeatures,
    fid_score,
    format_generative,
    generative_metrics,
    inception_images,
    inception_score,
)
from jemkit.evaluate.ood import OODOptions
from jemkit.evaluate.plots import reliability_diagram, save_figure, score_histogram
from jemkit.evaluate.report import evaluate, format_report
from jemkit.evaluate.robustness import RobustnessOptions, robust_accuracy
from jemkit.evaluate.samples import SampleOptions
from jemkit.evaluate.shift import ShiftOptions, corrupt, format_shift, shift_report
from jemkit.evaluate.threat import threat_model

__all__ = [
    "DEFAULT_ATTACKS",
    "STANDARD_BUDGETS",
    "CalibrationOptions",
    "ClassifierLogits",
    "Defense",
    "GenerativeOptions",
    "OODOptions",
    "PenultimateFeatures",
    "RobustnessOptions",
    "SampleOptions",
    "ShiftOptions",
    "autoattack",
    "calibration_report",
    "corrupt",
    "evaluate",
    "fid_score",
    "format_generative",
    "format_report",
    "format_shift",
    "gaussian_noise_corruption",
    "generative_metrics",
    "inception_images",
    "inception_score",
    "jem_defense",
    "pgd_attack",
    "reliability_diagram",
    "robust_accuracy",
    "save_figure",
    "score_histogram",
    "shift_report",
    "threat_model",
]
