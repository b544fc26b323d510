"""Attack configs of a robustness evaluation: their kinds, defaults and budgets, and the box attacks stay in.

An attack config is a dict with a ``"kind"`` (see :func:`jemkit.evaluate.robustness.robust_accuracy`). Budgets are
given either in data units (``eps``, ``std``) or as a fraction of the box's width (``eps_01``, ``std_01``: the
budget on inputs rescaled to ``[0, 1]``, the field's convention: L-inf 8/255 on CIFAR). Every result row reports
both.

The box is the :class:`~jemkit.InputDomain` of the model when there is one: attacks then run in its unit
coordinates, where every channel's (images, signals) or feature's (tabular rows) box is ``[-1, 1]``, so a fractional
budget means the same share of each feature's range, whatever its units. A plain ``(low, high)`` clip is a box in
data units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jemkit.checks import check_choice, check_integer, check_nonnegative
from jemkit.evaluate.robustness.attacks import AUTOATTACK_VERSIONS, check_clip, check_lp_norm

__all__ = [
    "ATTACK_KINDS",
    "DEFAULT_ATTACKS",
    "STANDARD_BUDGETS",
    "AttackBox",
    "attack_list",
    "attack_row",
    "parse_attack",
]

ATTACK_KINDS: tuple[str, ...] = ("clean", "noise", "pgd", "autoattack")
"""Values of the ``"kind"`` key of an attack config."""

DEFAULT_ATTACKS: tuple[dict[str, Any], ...] = (
    {"kind": "clean"},
    {"kind": "pgd", "norm": "linf", "eps_01": 0.015, "steps": 10, "restarts": 1},
    {"kind": "pgd", "norm": "linf", "eps_01": 0.05, "steps": 10, "restarts": 1},
    {"kind": "pgd", "norm": "l2", "eps_01": 0.25, "steps": 10, "restarts": 1},
    {"kind": "noise", "std_01": 0.05},
    {"kind": "noise", "std_01": 0.15},
)
"""jemkit's default attacks, as fractions of the box's width (on images in ``[-1, 1]``: eps 0.03, 0.1, L2 0.5, noise
0.1 and 0.3 in data units)."""

STANDARD_BUDGETS: dict[str, tuple[dict[str, Any], ...]] = {
    "cifar": (
        {"kind": "clean"},
        {"kind": "pgd", "norm": "linf", "eps_01": 8 / 255, "steps": 10, "restarts": 1},
        {"kind": "pgd", "norm": "l2", "eps_01": 0.5, "steps": 10, "restarts": 1},
    ),
}
"""Attack lists with the field's standard budgets, given on ``[0, 1]`` inputs (L-inf 8/255, L2 0.5 for CIFAR)."""

_REQUIRED = object()
_BUDGET_KEYS = ("eps", "std")  # given in data units, or with the suffix "_01" as a fraction of the box's width

_ATTACK_KEYS: dict[str, dict[str, Any]] = {
    # the keys each kind accepts besides "kind", with their defaults
    "clean": {},
    "noise": {"std": _REQUIRED},
    "pgd": {"eps": _REQUIRED, "norm": "linf", "steps": 10, "step_size": None, "restarts": 1, "random_start": True},
    "autoattack": {"eps": _REQUIRED, "norm": "linf", "version": None, "steps": 100, "queries": 5000},
}


@dataclass(frozen=True)
class AttackBox:
    """Where attacks run: the clamp ``clip`` in attack coordinates, and how budgets convert.

    Attributes:
        clip: ``(low, high)`` every attacked input is clamped to, in attack coordinates; ``None``: unbounded.
        data_scale: data units per attack unit (1 for a plain clip; a domain's half range when every channel or
            feature has the same range), ``None`` when the box's ranges differ (only fractional budgets apply).
        domain: the input domain whose unit coordinates attacks run in, or ``None`` (attacks in data units).
    """

    clip: tuple[float, float] | None
    data_scale: float | None = 1.0
    domain: Any = None

    @classmethod
    def of(cls, clip: Any) -> AttackBox:
        """The box of a ``(low, high)`` clip, an :class:`~jemkit.InputDomain`, or ``None``."""
        if clip is None or isinstance(clip, (tuple, list)):
            return cls(check_clip(clip))
        if not (hasattr(clip, "to_unit") and hasattr(clip, "from_unit")):
            raise TypeError(f"clip must be (low, high), an InputDomain or None, got {type(clip).__name__}")
        _, half = clip.center_and_scale(torch.empty(0))
        uniform = bool(torch.allclose(half, half.flatten()[0], rtol=1e-5, atol=0))
        return cls((-1.0, 1.0), float(half.flatten()[0]) if uniform else None, clip)

    @property
    def width(self) -> float | None:
        return None if self.clip is None else self.clip[1] - self.clip[0]

    @property
    def data_range(self) -> list[float] | None:
        """The box in data units, for reports (the overall bounds of a per-channel box)."""
        if self.domain is not None:
            return list(self.domain.bounds())
        return None if self.clip is None else list(self.clip)

    @property
    def description(self) -> str:
        if self.domain is not None:
            kind = "one range" if self.data_scale is not None else "a range per channel or feature"
            return f"the model's input domain ({kind}); attacks run in its unit coordinates"
        return "unbounded (no clamp)" if self.clip is None else f"the clip {list(self.clip)} in data units"

    def to_attack(self, x: Tensor) -> Tensor:
        return self.domain.to_unit(x) if self.domain is not None else x

    def from_attack(self, u: Tensor) -> Tensor:
        return self.domain.from_unit(u) if self.domain is not None else u

    def budget(self, parsed: dict[str, Any], key: str) -> None:
        """Fill ``parsed[key]`` (attack units) from data units or from ``parsed[key + "_01"]``."""
        fraction_key = f"{key}_01"
        if parsed.get(fraction_key) is not None:
            if parsed[key] is not _REQUIRED:
                raise ValueError(
                    f"give {key} (data units) or {fraction_key} (a fraction of the box's width), not both: {parsed}"
                )
            if self.width is None:
                raise ValueError(f"{fraction_key} needs the data range: pass clip=(low, high), got clip=None")
            parsed[key] = check_nonnegative(fraction_key, parsed[fraction_key]) * self.width
        elif parsed[key] is not _REQUIRED:
            value = check_nonnegative(key, parsed[key])
            if self.data_scale is None:
                raise ValueError(
                    f"{key}={value} is in data units, but the input domain's channels or features have different "
                    f"ranges: give {fraction_key} (a fraction of each one's range) instead"
                )
            parsed[key] = value / self.data_scale

    def in_data_units(self, value: float | None) -> float | None:
        return None if value is None or self.data_scale is None else value * self.data_scale

    def as_fraction(self, value: float | None) -> float | None:
        return None if value is None or self.width is None else value / self.width


def parse_attack(config: dict[str, Any], box: AttackBox) -> dict[str, Any]:
    """Validate one attack config and fill in its defaults, budgets in attack units."""
    if not isinstance(config, dict):
        raise TypeError(f"each attack must be a dict such as {{'kind': 'pgd', 'eps': 0.03}}, got {config!r}")
    kind = config.get("kind")
    try:
        check_choice("attack kind", kind, ATTACK_KINDS)
    except ValueError as err:
        raise ValueError(f"{err} (in the attack {config!r})") from None
    allowed = _ATTACK_KEYS[kind]
    accepted = set(allowed) | {f"{k}_01" for k in _BUDGET_KEYS if k in allowed}
    unknown = sorted(set(config) - accepted - {"kind"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for a {kind!r} attack; allowed: {sorted(accepted)}")
    parsed = {"kind": kind, **allowed, **config}
    for key in _BUDGET_KEYS:
        if key in allowed:
            box.budget(parsed, key)
    missing = [key for key, value in parsed.items() if value is _REQUIRED]
    if missing:
        raise ValueError(f"a {kind!r} attack needs {missing} (or {missing[0]}_01 on [0, 1] inputs), got {config!r}")
    _check_values(parsed)
    return parsed


def _check_values(parsed: dict[str, Any]) -> None:
    if parsed["kind"] in ("pgd", "autoattack"):
        check_lp_norm(parsed["norm"])
        check_integer("steps", parsed["steps"])
    if parsed["kind"] == "pgd":
        check_integer("restarts", parsed["restarts"])
    if parsed["kind"] == "autoattack":
        check_integer("queries", parsed["queries"])
        if parsed["version"] not in (None, *AUTOATTACK_VERSIONS):
            raise ValueError(
                f"unknown AutoAttack version {parsed['version']!r}; expected None (automatic) or one of "
                f"{', '.join(AUTOATTACK_VERSIONS)}"
            )


def attack_row(attack: dict[str, Any], box: AttackBox) -> dict[str, Any]:
    """The settings of a parsed attack as a report row, budgets in data units and as fractions of the box."""
    kind = attack["kind"]
    return {
        "attack": f"{kind}-{attack['norm']}" if kind in ("pgd", "autoattack") else kind,
        "eps": box.in_data_units(attack.get("eps")),
        "eps_01": box.as_fraction(attack.get("eps")),
        "steps": attack.get("steps"),
        "restarts": attack.get("restarts"),
        "std": box.in_data_units(attack.get("std")),
        "std_01": box.as_fraction(attack.get("std")),
    }


def attack_list(
    attacks: Sequence[dict[str, Any]], budgets: str | None = None, autoattack: bool = False, autoattack_steps: int = 100
) -> list[dict[str, Any]]:
    """The attack configs to run: ``attacks``, or a standard list (``budgets``), with AutoAttack after each PGD
    budget when ``autoattack``."""
    if budgets is not None:
        check_choice("budgets", budgets, tuple(STANDARD_BUDGETS))
        attacks = STANDARD_BUDGETS[budgets]
    result = []
    for attack in attacks:
        result.append(dict(attack))
        if autoattack and attack.get("kind") == "pgd":
            budget = {k: attack[k] for k in ("norm", "eps", "eps_01") if k in attack}
            result.append({"kind": "autoattack", **budget, "steps": autoattack_steps})
    return result
