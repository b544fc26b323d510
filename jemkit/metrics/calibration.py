"""Calibration metrics in one place: NLL, Brier score, reliability bins, ECE and MCE, functional and stateful.

JEM's claim is that energy training makes a classifier better calibrated, so evaluations report these next to
accuracy. torchmetrics has ECE/MCE (``CalibrationError``) but neither the Brier score nor the per-bin statistics a
reliability diagram needs, and its inputs switch silently between probabilities and logits by their range. Here the
functions say which one they take: ``probs`` are probabilities ``[N, C]``, ``logits`` are raw classifier outputs.

Binning: ``n_bins`` equal-width bins on the top-1 confidence ``max_c p_c``, bin ``k`` being
``[k / n_bins, (k + 1) / n_bins)`` and the last one closed at 1. These are torchmetrics' bin edges, so
:func:`expected_calibration_error` and :func:`max_calibration_error` equal
``multiclass_calibration_error(..., norm="l1" | "max")``, with one exception: torchmetrics puts confidences of
exactly 1.0 into an extra (n_bins + 1)-th bin of their own, which we keep in the last bin. ECE can then differ
only when that last bin holds both over- and under-confident groups.

The :class:`ReliabilityDiagram` and :class:`CalibrationMetrics` states are per-bin sums and counts reduced with
``"sum"``, so they are exact under DDP and cost ``O(n_bins)`` memory whatever the dataset size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from jemkit.checks import check_integer
from jemkit.energy import check_labels

__all__ = [
    "CalibrationMetrics",
    "ReliabilityDiagram",
    "brier_score",
    "expected_calibration_error",
    "max_calibration_error",
    "negative_log_likelihood",
    "reliability_bins",
]

_PROB_TOL = 1e-4


def _check_n_bins(n_bins: int) -> None:
    check_integer("n_bins", n_bins)


def _check_inputs(preds: Tensor, y: Tensor, name: str) -> None:
    if not isinstance(preds, Tensor):
        raise TypeError(f"expected a Tensor {name} [N, C], got {type(preds).__name__}")
    if preds.dim() != 2 or preds.shape[0] == 0 or preds.shape[1] == 0:
        raise ValueError(f"expected non-empty {name} of shape [N, C], got shape {tuple(preds.shape)}")
    if not preds.is_floating_point():
        raise TypeError(f"expected floating-point {name}, got dtype {preds.dtype}")
    check_labels(y, preds.shape[0], preds.shape[1])


def _check_probs(probs: Tensor, y: Tensor) -> None:
    _check_inputs(probs, y, "probs")
    if bool(torch.isnan(probs).any()) or bool(((probs < -_PROB_TOL) | (probs > 1 + _PROB_TOL)).any()):
        raise ValueError("expected probabilities in [0, 1]; for logits apply softmax first (or use from_logits=True)")
    row_sums = probs.sum(dim=1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3):
        raise ValueError("expected probability rows [N, C] that sum to 1 (did you pass logits or one class only?)")


def _check_logits(logits: Tensor, y: Tensor) -> None:
    _check_inputs(logits, y, "logits")
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits contain NaN")


def _bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    """Bin of each confidence ``[N] -> [N]`` (long in ``[0, n_bins)``): ``[k/n, (k+1)/n)``, the last bin closed."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    return torch.bucketize(confidence, edges[1:-1], right=True)


def _bin_sums(probs: Tensor, y: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin sums ``(confidence sum, correct count, count)``, each ``[n_bins]``."""
    confidence, prediction = probs.max(dim=1)
    index = _bin_index(confidence, n_bins)
    conf_sum = torch.zeros(n_bins, dtype=confidence.dtype, device=confidence.device).index_add_(0, index, confidence)
    correct = torch.zeros(n_bins, dtype=torch.long, device=confidence.device)
    correct.index_add_(0, index, prediction.eq(y).long())
    count = torch.bincount(index, minlength=n_bins)
    return conf_sum, correct, count


def _bins_from_sums(conf_sum: Tensor, correct: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    denom = count.clamp(min=1).to(conf_sum.dtype)
    return conf_sum / denom, correct.to(conf_sum.dtype) / denom, count


def _ece_mce(bin_confidence: Tensor, bin_accuracy: Tensor, bin_counts: Tensor) -> tuple[Tensor, Tensor]:
    gap = (bin_accuracy - bin_confidence).abs()
    weight = bin_counts.to(gap.dtype) / bin_counts.sum().clamp(min=1)
    return (gap * weight).sum(), torch.where(bin_counts > 0, gap, torch.zeros_like(gap)).max()


def brier_score(probs: Tensor, y: Tensor) -> Tensor:
    """Multiclass Brier score: mean over samples of ``sum_c (p_c - onehot(y)_c)^2``, in ``[0, 2]``; lower is better.

    Args:
        probs: predicted probabilities ``[N, C]`` (rows sum to 1).
        y: integer labels ``[N]``.

    Returns:
        A 0-dim tensor.
    """
    _check_probs(probs, y)
    onehot = F.one_hot(y.long(), probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(dim=1).mean()


def negative_log_likelihood(logits: Tensor, y: Tensor) -> Tensor:
    """Mean ``-log softmax(logits)[y]`` in nats (the cross-entropy): logits ``[N, C]``, labels ``[N]`` -> 0-dim."""
    _check_logits(logits, y)
    return F.cross_entropy(logits, y.long())


def reliability_bins(probs: Tensor, y: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin mean confidence, accuracy and count of the top-1 prediction (equal-width bins, as torchmetrics).

    Args:
        probs: predicted probabilities ``[N, C]``.
        y: integer labels ``[N]``.
        n_bins: number of equal-width bins on ``[0, 1]`` (15 is the torchmetrics and Guo et al. 2017 default).

    Returns:
        ``(bin_confidence, bin_accuracy, bin_counts)``, each ``[n_bins]``; confidence and accuracy are 0 for empty
        bins, counts are long.

    Example::

        >>> conf, acc, count = reliability_bins(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), n_bins=5)
        >>> count.tolist(), acc.tolist()
        ([0, 0, 0, 1, 1], [0.0, 0.0, 0.0, 0.0, 1.0])
    """
    _check_n_bins(n_bins)
    _check_probs(probs, y)
    return _bins_from_sums(*_bin_sums(probs, y, n_bins))


def expected_calibration_error(probs: Tensor, y: Tensor, n_bins: int = 15) -> Tensor:
    """ECE: ``sum_k (n_k / N) |acc_k - conf_k|`` over :func:`reliability_bins`; probs ``[N, C]``, labels ``[N]``."""
    return _ece_mce(*reliability_bins(probs, y, n_bins))[0]


def max_calibration_error(probs: Tensor, y: Tensor, n_bins: int = 15) -> Tensor:
    """MCE: ``max_k |acc_k - conf_k|`` over the non-empty :func:`reliability_bins`; probs ``[N, C]``, labels ``[N]``."""
    return _ece_mce(*reliability_bins(probs, y, n_bins))[1]


class _BinnedCalibration(Metric):
    """Shared per-bin states: confidence sum (float), correct count and count (long), all ``[n_bins]``, summed."""

    is_differentiable = False
    full_state_update = False

    conf_sum: Tensor
    correct: Tensor
    count: Tensor

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_n_bins(n_bins)
        self.n_bins = n_bins
        self.add_state("conf_sum", default=torch.zeros(n_bins), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")

    def _update_bins(self, probs: Tensor, y: Tensor) -> None:
        conf_sum, correct, count = _bin_sums(probs.detach(), y, self.n_bins)
        self.conf_sum += conf_sum.to(self.conf_sum.dtype)
        self.correct += correct
        self.count += count

    def _bins(self) -> tuple[Tensor, Tensor, Tensor]:
        if int(self.count.sum()) == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before any update(): no samples")
        return _bins_from_sums(self.conf_sum, self.correct, self.count)


class ReliabilityDiagram(_BinnedCalibration):
    """Accumulates the per-bin statistics of a reliability diagram, and ECE/MCE from them.

    :meth:`compute` returns ``{"ece", "mce", "bin_confidence", "bin_accuracy", "bin_counts"}``; the last three are
    ``[n_bins]`` tensors for :func:`jemkit.evaluate.plots.reliability_diagram`.

    Args:
        n_bins: number of equal-width confidence bins (default 15, as torchmetrics).
        from_logits: ``update`` receives logits ``[B, C]`` and applies softmax; otherwise probabilities.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: on a bad ``n_bins``, bad inputs to :meth:`update` or :meth:`compute` before any update.

    Example::

        >>> metric = ReliabilityDiagram(n_bins=10, from_logits=True)
        >>> metric.update(torch.randn(32, 3), torch.randint(0, 3, (32,)))
        >>> out = metric.compute()
        >>> out["bin_counts"].shape, int(out["bin_counts"].sum())
        (torch.Size([10]), 32)
    """

    higher_is_better = False

    def __init__(self, n_bins: int = 15, from_logits: bool = False, **kwargs: Any) -> None:
        super().__init__(n_bins=n_bins, **kwargs)
        self.from_logits = from_logits

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add predictions ``[B, C]`` (probabilities, or logits with ``from_logits=True``) and labels ``[B]``."""
        if self.from_logits:
            _check_logits(preds, target)
            preds = preds.softmax(dim=1)
        else:
            _check_probs(preds, target)
        self._update_bins(preds, target)

    def compute(self) -> dict[str, Tensor]:
        """ECE, MCE and the per-bin confidence, accuracy and count over everything seen since the last reset."""
        bin_confidence, bin_accuracy, bin_counts = self._bins()
        ece, mce = _ece_mce(bin_confidence, bin_accuracy, bin_counts)
        return {
            "ece": ece,
            "mce": mce,
            "bin_confidence": bin_confidence,
            "bin_accuracy": bin_accuracy,
            "bin_counts": bin_counts,
        }


class CalibrationMetrics(_BinnedCalibration):
    """Accuracy, NLL, Brier score, ECE and MCE of a classifier from its logits, accumulated over batches.

    Every state is a sum (per-bin sums for ECE/MCE, totals for the others), so DDP reduction is exact and memory is
    ``O(n_bins)``. :meth:`compute` returns scalars only, ready for ``LightningModule.log_dict``.

    Args:
        n_bins: number of equal-width confidence bins for ECE/MCE (default 15, as torchmetrics).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: on a bad ``n_bins``, bad inputs to :meth:`update` or :meth:`compute` before any update.

    Example::

        >>> metric = CalibrationMetrics()
        >>> for _ in range(3):
        ...     metric.update(torch.randn(16, 10), torch.randint(0, 10, (16,)))
        >>> sorted(metric.compute())
        ['acc', 'brier', 'ece', 'mce', 'nll']
    """

    higher_is_better = None  # acc: higher; the others: lower

    nll_sum: Tensor
    brier_sum: Tensor

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(n_bins=n_bins, **kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("brier_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add classifier logits ``[B, C]`` and integer labels ``[B]``."""
        _check_logits(logits, target)
        logits = logits.detach()
        log_probs = logits.log_softmax(dim=1)
        probs = log_probs.exp()
        target_long = target.long()
        self.nll_sum += -log_probs.gather(1, target_long.unsqueeze(1)).sum().to(self.nll_sum.dtype)
        onehot = F.one_hot(target_long, logits.shape[1]).to(probs.dtype)
        self.brier_sum += (probs - onehot).pow(2).sum().to(self.brier_sum.dtype)
        self._update_bins(probs, target)

    def compute(self) -> dict[str, Tensor]:
        """``{"acc", "nll", "brier", "ece", "mce"}`` (0-dim tensors) over everything seen since the last reset."""
        bin_confidence, bin_accuracy, bin_counts = self._bins()
        total = bin_counts.sum().to(self.nll_sum.dtype)
        ece, mce = _ece_mce(bin_confidence, bin_accuracy, bin_counts)
        return {
            "acc": self.correct.sum().to(total.dtype) / total,
            "nll": self.nll_sum / total,
            "brier": self.brier_sum / total,
            "ece": ece,
            "mce": mce,
        }
