"""Robustness of a classifier, optionally behind a defence attacked through it: one job a module.

``attacks`` (PGD with EOT, AutoAttack, Gaussian noise), ``config`` (attack configs, budgets and the box they stay
in), ``defense`` (JEM's purification as a :class:`Defense`, and how attacks see through it), ``threat`` (the attack
protocol and the threat model a report records) and ``accuracy`` (:func:`robust_accuracy`, the one loop, and the
report's section).
"""

from jemkit.evaluate.robustness.accuracy import (
    RobustnessOptions,
    attack_clip,
    format_robustness,
    robust_accuracy,
    robustness_section,
)
from jemkit.evaluate.robustness.attacks import autoattack, gaussian_noise_corruption, pgd_attack
from jemkit.evaluate.robustness.config import DEFAULT_ATTACKS, STANDARD_BUDGETS, attack_list
from jemkit.evaluate.robustness.defense import Defense, jem_defense
from jemkit.evaluate.robustness.threat import threat_model

__all__ = [
    "DEFAULT_ATTACKS",
    "STANDARD_BUDGETS",
    "Defense",
    "RobustnessOptions",
    "attack_clip",
    "attack_list",
    "autoattack",
    "format_robustness",
    "gaussian_noise_corruption",
    "jem_defense",
    "pgd_attack",
    "robust_accuracy",
    "robustness_section",
    "threat_model",
]
