"""Temperature scaling (Guo et al. 2017): the one-parameter post-hoc fix for an over- or under-confident classifier.

Dividing the logits by a scalar ``T`` changes no prediction (accuracy is unchanged) but rescales every confidence;
``T`` is fitted by minimising the NLL on held-out data. It is the baseline that JEM's calibration is compared with,
and in jemkit's terms it is the Gibbs temperature of :mod:`jemkit.energy`: ``softmax(logits / T)`` is
``exp(log_py_given_x(logits, temperature=T))``.

We optimise ``log T`` rather than ``T`` so that the temperature stays positive without constraints, with L-BFGS
(the optimiser of the reference implementation). The objective is convex in ``1 / T``, so the minimum is unique.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from jemkit.checks import check_integer
from jemkit.energy import check_labels

__all__ = ["fit_temperature"]


def fit_temperature(logits: Tensor, y: Tensor, max_iter: int = 50, lr: float = 0.1) -> float:
    """The temperature ``T > 0`` that minimises ``NLL(softmax(logits / T), y)`` on held-out logits and labels.

    Fit on a validation split, never on the test set. ``T > 1`` means the model was over-confident. If every
    held-out prediction is correct the NLL keeps falling as ``T -> 0`` and the result is only as small as the
    iteration budget lets it get: fit on data where the model makes mistakes.

    Args:
        logits: classifier outputs ``[N, C]`` (detached internally; any device).
        y: integer labels ``[N]``.
        max_iter: L-BFGS iterations (one ``step`` call; 50 as in Guo et al.'s reference code).
        lr: L-BFGS step size on ``log T`` (with strong-Wolfe line search, so the value is not critical).

    Returns:
        The fitted temperature as a Python float; apply it as ``logits / T``.

    Raises:
        ValueError: on shapes other than ``[N, C]`` / ``[N]``, empty input, NaN logits, labels out of range, or a
            non-finite result.

    Example::

        >>> logits = torch.randn(500, 10)
        >>> y = torch.distributions.Categorical(logits=logits).sample()
        >>> t = fit_temperature(3.0 * logits, y)  # 3x over-confident: t is close to 3
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"expected non-empty logits of shape [N, C], got {shape}")
    check_labels(y, logits.shape[0], logits.shape[1])
    check_integer("max_iter", max_iter)
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits contain NaN")

    # Works inside Lightning's validation/test loops too: leave inference mode and clone the (inference) tensors.
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().float().clone()
        target = y.detach().to(z.device).long().clone()
        log_t = torch.zeros((), device=z.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=lr, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z * torch.exp(-log_t), target)
            loss.backward()
            return loss

        optimizer.step(closure)
    temperature = math.exp(float(log_t.detach()))
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature fit diverged (T = {temperature!r}); check the logits and labels")
    return temperature
