"""Judging whether a training step diverged: a pure function of the step's statistics and their limits.

The JEM reports its per-step statistics (``JEM.step_stats``); the :class:`~jemkit.callbacks.DivergenceGuard` callback
owns the policy (raise, skip, roll back) and calls :func:`divergence_reasons` to judge them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["DivergenceError", "Guarded", "divergence_reasons"]


@runtime_checkable
class Guarded(Protocol):
    """What :class:`~jemkit.callbacks.DivergenceGuard` needs of the module it guards (a JEM is one).

    ``step_stats``: the last training step's statistics (detached scalars); ``lr_scale``: a factor the module applies
    to every learning rate; ``chains``: with ``input_shape``, ``reset()`` and ``reinit_nonfinite() -> int``.
    """

    step_stats: dict[str, Tensor]
    lr_scale: float
    chains: Any


class DivergenceError(RuntimeError):
    """Training produced a non-finite (or exploding) loss or energy: the run diverged."""


def divergence_reasons(stats: Mapping[str, Tensor], limits: Mapping[str, float] | None = None) -> list[str]:
    """Why the statistics show a diverged step: one ``"name=value (why)"`` per offending quantity; empty if healthy.

    A quantity offends when it is not finite, or when its magnitude exceeds ``limits[name]`` (quantities without a
    limit are only checked for finiteness). One host sync for all quantities together.

    Example::

        >>> divergence_reasons({"loss": torch.tensor(float("nan")), "energy_gap": torch.tensor(5.0)}, {"energy_gap": 1})
        ['loss=nan (non-finite)', 'energy_gap=5 (limit 1)']
    """
    if not stats:
        return []
    limits = limits or {}
    names = list(stats)
    # One device-to-host copy of every value, judged on the host: no second read, no limits copied to the device.
    values = torch.stack([stats[name].detach().float().reshape(()) for name in names]).tolist()
    reasons = []
    for name, value in zip(names, values, strict=True):
        if not math.isfinite(value):
            reasons.append(f"{name}={value:.4g} (non-finite)")
        elif abs(value) > limits.get(name, math.inf):
            reasons.append(f"{name}={value:.4g} (limit {limits[name]:.4g})")
    return reasons
