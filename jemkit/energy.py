"""Energies read off a classifier's logits: the one place jemkit turns logits into E(x, y), E(x) and log-probabilities.

A classifier ``f`` with logits ``f(x) [B, C]`` defines a Gibbs distribution at temperature ``T`` (inverse temperature
``beta = 1 / T``)::

    E(x, y) = -f(x)[y] / T          p(x, y) ∝ exp(-E(x, y))
    E(x)    = -T * logsumexp(f(x) / T)

With ``T = 1`` (JEM) ``p(y | x)`` is the classifier's usual softmax and ``-E(x)`` is ``log p(x)`` up to the unknown
normaliser. Every other module calls these functions rather than re-deriving them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_labels",
    "check_logits",
    "energy_matrix",
    "joint_energy",
    "log_px",
    "log_py_given_x",
    "marginal_energy",
]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def check_logits(logits: Tensor) -> None:
    """Raise ``ValueError`` unless ``logits`` has the classifier output shape ``[B, C]``."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"expected the classifier to return a Tensor of logits [B, C], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [B, C], got shape {tuple(logits.shape)}")


def check_labels(y: Tensor, batch_size: int, num_classes: int | None = None) -> None:
    """Raise ``ValueError`` unless ``y`` holds ``batch_size`` integer class labels (in ``[0, num_classes)`` if given).

    Shared by the first batch of each stage, the EBM losses, the metrics, temperature scaling, the attacks and the
    class-conditional buffer (labels out of range during training are counted in the step, without a host sync, and
    named by ``DivergenceGuard``). The range check reads the labels' extremes, a host sync: callers on a hot path
    leave ``num_classes`` out.
    """
    if not isinstance(y, Tensor):
        raise ValueError(f"expected class labels as a Tensor [{batch_size}], got {type(y).__name__}")
    if y.shape != (batch_size,):
        raise ValueError(f"expected labels of shape [{batch_size}], got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"expected integer class labels, got dtype {y.dtype}")
    if num_classes is not None and batch_size > 0:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) for a classifier with {num_classes} outputs, "
                f"got labels in [{low}, {high}]"
                + (" (-1 also marks a float label that is not a whole number)" if low == -1 else "")
            )


def energy_matrix(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """All joint energies ``E(x, y) = -f(x)[y] / T`` at once: ``[B, C] -> [B, C]``."""
    _check_temperature(temperature)
    return -logits / temperature


def joint_energy(logits: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """``E(x, y) = -f(x)[y] / T`` for the given labels: logits ``[B, C]``, labels ``[B]`` -> ``[B]``."""
    check_logits(logits)
    check_labels(y, logits.shape[0])
    return energy_matrix(logits, temperature).gather(1, y.long().unsqueeze(1)).squeeze(1)


def marginal_energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``E(x) = -T * logsumexp(f(x) / T)``: logits ``[B, C]`` -> ``[B]``; stable for large logits."""
    check_logits(logits)
    _check_temperature(temperature)
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def log_px(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Unnormalised ``log p(x) = -E(x)``: ``[B, C] -> [B]``. Higher means more in-distribution."""
    return -marginal_energy(logits, temperature)


def log_py_given_x(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log p(y | x) = log_softmax(f(x) / T)`` for every class: ``[B, C] -> [B, C]``. At ``T = 1`` this is
    ``E(x) - E(x, y)``; at other temperatures ``E(x)`` carries a factor ``T`` that ``E(x, y)`` does not, and the
    identity becomes ``E(x) / T - E(x, y)``."""
    check_logits(logits)
    _check_temperature(temperature)
    return torch.log_softmax(logits / temperature, dim=1)
