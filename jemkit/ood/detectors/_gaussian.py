"""The class-conditional Gaussian statistics Mahalanobis and RMD are fitted from, accumulated in row chunks.

pytorch-ood's ``fit_features`` works on the whole ``[N, D]`` matrix on the device, and RMD's background covariance
materialises ``z - mean`` twice (pytorch-ood issues #9 and #93): on ImageNet-1k features that alone is tens of GB.
Here the class means and the within-class and overall scatters are summed over chunks in float64 on the chosen
device while ``z`` stays where it is: ``O(chunk_size * D + D^2 + C * D)`` beyond ``z``. Two passes, because the
one-pass ``sum z z^T - N mu mu^T`` loses digits to cancellation.

Mahalanobis and RMD need the same statistics: inside :func:`shared_statistics` (which
:class:`~jemkit.ood.detectors.PostHocDetectors` opens around its fit) they are computed once for both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from jemkit.ood.detectors.base import chunks

__all__ = ["RIDGE", "GaussianStatistics", "gaussian_statistics", "precision", "ridged", "shared_statistics"]

RIDGE = 1e-6
"""pytorch-ood's ridge on the (unnormalised) scatter matrices: kept so that scores equal its own fit's."""

_SHARED: ContextVar[dict[tuple, GaussianStatistics] | None] = ContextVar("jemkit_gaussian_statistics", default=None)


def ridged(scatter: Tensor) -> Tensor:
    """``scatter [D, D]`` plus :data:`RIDGE` on its diagonal, in its own dtype."""
    return scatter + RIDGE * torch.eye(scatter.shape[0], dtype=scatter.dtype, device=scatter.device)


def precision(scatter: Tensor) -> Tensor:
    """The inverse of the ridged ``scatter [D, D]`` as float32, inverted in float64: with ``D`` close to ``N`` the
    scatter is near-singular and a float32 inverse loses the ridge."""
    return torch.linalg.inv(ridged(scatter)).float()


@dataclass
class GaussianStatistics:
    """Float64 statistics of features ``[N, D]`` in ``C`` classes.

    Attributes:
        mu: class means ``[C, D]`` (classes in sorted label order).
        scatter: within-class scatter ``sum_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T`` ``[D, D]`` (what pytorch-ood's
            Mahalanobis sums class by class).
        mean: overall mean ``[D]``.
        total: overall scatter ``sum_i (z_i - mean)(z_i - mean)^T`` ``[D, D]``.
    """

    mu: Tensor
    scatter: Tensor
    mean: Tensor
    total: Tensor
    _precision: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def precision(self) -> Tensor:
        """:func:`precision` of :attr:`scatter` ``[D, D]`` float32, inverted once for every detector sharing it."""
        if self._precision is None:
            self._precision = precision(self.scatter)
        return self._precision


@contextmanager
def shared_statistics() -> Iterator[None]:
    """Within the block, :func:`gaussian_statistics` of the same features and labels is computed only once."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def gaussian_statistics(z: Tensor, y: Tensor, chunk_size: int, device: torch.device) -> GaussianStatistics:
    """:class:`GaussianStatistics` of features ``z [N, D]`` with class labels ``y [N]`` (integers ``>= 0``, not
    necessarily contiguous), ``chunk_size`` rows at a time on ``device``."""
    memo = _SHARED.get()
    # z and y are held by the caller for the whole shared block, so their ids cannot be reused within it
    key = (id(z), id(y), chunk_size, device)
    if memo is not None and key in memo:
        return memo[key]
    stats = _accumulate(z, y, chunk_size, device)
    if memo is not None:
        memo[key] = stats
    return stats


def _accumulate(z: Tensor, y: Tensor, chunk_size: int, device: torch.device) -> GaussianStatistics:
    n, dim = z.shape
    classes, labels = torch.unique(y, return_inverse=True)  # the identity for labels 0..C-1 that all occur
    num_classes = len(classes)
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for start in chunks(n, chunk_size):
        zc = z[start : start + chunk_size].to(device, torch.float64)
        yc = labels[start : start + chunk_size].to(device)
        sums.index_add_(0, yc, zc)
        counts.index_add_(0, yc, torch.ones_like(yc, dtype=torch.float64))
    mu = sums / counts[:, None]
    mean = sums.sum(0) / n
    scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    total = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for start in chunks(n, chunk_size):
        zc = z[start : start + chunk_size].to(device, torch.float64)
        yc = labels[start : start + chunk_size].to(device)
        within = zc - mu[yc]
        scatter.addmm_(within.T, within)
        overall = zc - mean
        total.addmm_(overall.T, overall)
    return GaussianStatistics(mu, scatter, mean, total)
