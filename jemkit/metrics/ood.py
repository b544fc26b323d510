"""Out-of-distribution detection metrics: AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR.

Convention (the one of :mod:`jemkit.ood.scores`): a score is **higher for inputs that look in-distribution**
(``log p(x)``, maximum softmax probability, ...) and the in-distribution set is the **positive** class. AUPR-Out
treats the OOD set as positive and negates the scores.

Why not call torchmetrics directly: its binary curve metrics treat any input outside ``[0, 1]`` as a logit and apply
a sigmoid. Energies and ``log p(x)`` are unbounded (often ``|score| > 100``), where the sigmoid saturates to exactly
0 or 1 in floating point and turns distinct scores into ties, silently pulling AUROC towards 0.5. Every metric here
depends only on the *order* of the scores, so we first replace the scores by their normalised ranks in ``[0, 1]``
(equal scores share a rank, so ties stay ties and nothing else becomes one) and hand those to torchmetrics.

torchmetrics has no FPR at a fixed TPR; :func:`fpr_at_tpr` computes it from the sorted scores (see its docstring for
the tie rule). :class:`OODMetrics` is the stateful version: it keeps all scores (``dist_reduce_fx="cat"``), so under
DDP every rank computes the metrics on the union of all ranks' scores.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from torchmetrics.utilities import dim_zero_cat

__all__ = ["OODMetrics", "fpr_at_tpr", "ood_metrics"]


def _check_scores(scores: Tensor, name: str) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"expected {name} to be a Tensor of shape [N], got {type(scores).__name__}")
    if scores.dim() != 1:
        raise ValueError(f"expected {name} of shape [N], got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty: OOD metrics need at least one in- and one out-of-distribution score")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"expected real-valued {name}, got dtype {scores.dtype}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError(f"{name} contains NaN; OOD scores must be ordered (inf is allowed, NaN is not)")


def _check_tpr(tpr: float) -> None:
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")


def _ranks01(scores: Tensor) -> Tensor:
    """Order-preserving map of ``scores [N]`` onto ``[0, 1]``: dense ranks divided by the largest rank.

    Equal scores get equal values and distinct scores distinct ones (exact in float64; in float32, used on MPS which
    has no float64, for up to 2**24 distinct values).
    """
    unique, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    dtype = torch.float32 if scores.device.type == "mps" else torch.float64
    return inverse.to(dtype) / max(unique.numel() - 1, 1)


def fpr_at_tpr(scores_in: Tensor, scores_out: Tensor, tpr: float = 0.95) -> Tensor:
    """False-positive rate on the OOD set at the threshold that keeps a fraction ``tpr`` of the in-distribution set.

    The threshold ``t`` is the largest score such that at least ``ceil(tpr * N_in)`` in-distribution scores are
    ``>= t`` (i.e. the ``ceil(tpr * N_in)``-th largest in-distribution score); an input is declared in-distribution
    when its score is ``>= t``. The result is the fraction of OOD scores ``>= t``. Ties at the threshold therefore
    count *against* the detector (an OOD score equal to ``t`` is a false positive), which is conservative and is
    what ``1 - torchmetrics.functional.classification.binary_specificity_at_sensitivity(..., min_sensitivity=tpr)``
    gives on the same scores. With ``tpr=0.95`` this is the usual FPR95 (FPR@95%TPR; lower is better).

    Args:
        scores_in: scores of in-distribution inputs ``[N_in]``, higher = more in-distribution.
        scores_out: scores of OOD inputs ``[N_out]``.
        tpr: true-positive rate (recall of the in-distribution set) to hold, in ``(0, 1]``.

    Returns:
        A 0-dim float tensor in ``[0, 1]``.

    Raises:
        ValueError: if a set is empty, not 1-D, or contains NaN, or if ``tpr`` is not in ``(0, 1]``.

    Example::

        >>> fpr_at_tpr(torch.arange(1.0, 21.0), torch.tensor([0.5, 1.5, 2.0, 30.0]))
        tensor(0.5000)
    """
    _check_scores(scores_in, "scores_in")
    _check_scores(scores_out, "scores_out")
    _check_tpr(tpr)
    n_in = scores_in.numel()
    # The smallest k with k / n_in >= tpr; the epsilon absorbs float error in tpr * n_in (0.95 * 20 must be 19).
    k = min(max(math.ceil(tpr * n_in - 1e-9), 1), n_in)
    threshold = torch.topk(scores_in, k, largest=True, sorted=True).values[-1]
    fpr = (scores_out >= threshold).sum() / scores_out.numel()
    return fpr.to(torch.get_default_dtype())


def ood_metrics(scores_in: Tensor, scores_out: Tensor) -> dict[str, Tensor]:
    """AUROC, AUPR-In, AUPR-Out and FPR95 of separating ``scores_in`` (positive) from ``scores_out``.

    Args:
        scores_in: scores of in-distribution inputs ``[N_in]``, higher = more in-distribution. Any real values
            (energies, log-densities, probabilities): only their order matters.
        scores_out: scores of OOD inputs ``[N_out]``.

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95"}`` as 0-dim float tensors. ``auroc`` counts ties as one half;
        ``aupr_*`` are average precisions (step-wise area, as torchmetrics and scikit-learn); ``aupr_out`` uses the
        OOD set as positive and negated scores; ``fpr95`` is :func:`fpr_at_tpr` at ``tpr=0.95``.

    Raises:
        ValueError: if a set is empty, not 1-D, or contains NaN.

    Example::

        >>> m = ood_metrics(torch.tensor([3.0, 4.0, 5.0]), torch.tensor([-1e4, 0.0]))
        >>> float(m["auroc"]), float(m["fpr95"])
        (1.0, 0.0)
    """
    _check_scores(scores_in, "scores_in")
    _check_scores(scores_out, "scores_out")
    scores_out = scores_out.to(scores_in.device)
    ranks = _ranks01(torch.cat([scores_in, scores_out]))
    is_in = torch.cat(
        [
            torch.ones(scores_in.numel(), dtype=torch.long, device=ranks.device),
            torch.zeros(scores_out.numel(), dtype=torch.long, device=ranks.device),
        ]
    )
    dtype = torch.get_default_dtype()
    return {
        "auroc": binary_auroc(ranks, is_in).to(dtype),
        "aupr_in": binary_average_precision(ranks, is_in).to(dtype),
        "aupr_out": binary_average_precision(1.0 - ranks, 1 - is_in).to(dtype),
        "fpr95": fpr_at_tpr(scores_in, scores_out, tpr=0.95).to(dtype),
    }


class OODMetrics(Metric):
    """Stateful AUROC / AUPR-In / AUPR-Out / FPR95 over batches of scores from in- and out-of-distribution inputs.

    Scores and their labels are kept in list states reduced with ``"cat"``, so in DDP each rank's :meth:`compute`
    sees every rank's scores (the metrics are not averages over batches and cannot be). Memory grows with the number
    of scores: two floats per input, stored in the metric's dtype (float32 by default;
    ``set_dtype(torch.float64)`` keeps float64 scores exact). A rank that sees no data contributes nothing.

    :meth:`compute` returns a dict of 0-dim tensors (see :func:`ood_metrics`), ready for ``LightningModule.log_dict``.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``, ``dist_sync_fn``).

    Raises:
        ValueError: from :meth:`update` on empty, non-1-D or NaN scores or labels not in ``{0, 1}``; from
            :meth:`compute` when either class has no scores.

    Example::

        >>> metric = OODMetrics()
        >>> metric.update(torch.tensor([5.0, 6.0, 7.0]), is_in=True)
        >>> metric.update(torch.tensor([-2.0, 6.5]), is_in=torch.tensor([0, 0]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items()}
        {'auroc': 0.667, 'aupr_in': 0.806, 'aupr_out': 0.75, 'fpr95': 0.5}
    """

    is_differentiable = False
    higher_is_better = None  # AUROC/AUPR: higher; FPR95: lower
    full_state_update = False

    scores: list[Tensor]
    is_in: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_in", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_in: Tensor | bool) -> None:
        """Add a batch of ``scores [B]`` with labels ``is_in [B]`` (1/True = in-distribution) or one bool for all."""
        _check_scores(scores, "scores")
        if isinstance(is_in, bool):
            labels = torch.full_like(scores, is_in, dtype=torch.bool)
        else:
            if not isinstance(is_in, Tensor) or is_in.shape != scores.shape:
                shape = tuple(is_in.shape) if isinstance(is_in, Tensor) else type(is_in).__name__
                raise ValueError(f"expected is_in to be a bool or a tensor of shape {tuple(scores.shape)}, got {shape}")
            if is_in.dtype != torch.bool and bool(((is_in != 0) & (is_in != 1)).any()):
                raise ValueError("expected is_in to hold only 0/1 (or False/True)")
            labels = is_in.to(device=scores.device, dtype=torch.bool)
        # Both states in the metric's float dtype: under DDP a rank that saw no data contributes an empty tensor of
        # that dtype, and all_gather needs one dtype on every rank.
        self.scores.append(scores.detach().to(self.dtype))
        self.is_in.append(labels.to(self.dtype))

    def compute(self) -> dict[str, Tensor]:
        """``{"auroc", "aupr_in", "aupr_out", "fpr95"}`` over every score seen since the last reset."""
        if isinstance(self.scores, list) and not self.scores:
            raise ValueError("OODMetrics.compute() called before any update(): no scores")
        scores = dim_zero_cat(self.scores)
        is_in = dim_zero_cat(self.is_in) > 0.5
        n_in = int(is_in.sum())
        if n_in == 0 or n_in == is_in.numel():
            which = "out-of-distribution" if n_in else "in-distribution"
            raise ValueError(f"OODMetrics needs scores of both classes; no {which} scores were given")
        return ood_metrics(scores[is_in], scores[~is_in])
