"""Relative Mahalanobis distance (RMD, Ren et al. 2021): Mahalanobis to the nearest class minus the distance to one
Gaussian of all the training features, pytorch-ood's.

The background Gaussian is where pytorch-ood's fit is heaviest: it materialises ``z - mean`` twice on the device
(pytorch-ood issues #9 and #93). jemkit takes its mean and scatter from the same float64 chunked pass as the class
statistics (:mod:`jemkit.ood.detectors._gaussian`) and hands both to ``pytorch_ood.detector.RMD``, whose
``predict_features`` scores (negated: higher = in-distribution).
"""

from __future__ import annotations

from typing import ClassVar

from pytorch_ood.detector import RMD

from jemkit.ood.detectors._gaussian import GaussianStatistics, precision, ridged
from jemkit.ood.detectors.base import register
from jemkit.ood.detectors.mahalanobis import MahalanobisDetector

__all__ = ["RMDDetector"]


@register("rmd")
class RMDDetector(MahalanobisDetector):
    """pytorch-ood's RMD fitted in chunks: Mahalanobis's state plus ``background_mu [D]``, ``background_cov [D, D]``
    and ``background_precision [D, D]`` (float32).

    Args: those of :class:`~jemkit.ood.detectors.base.Detector`.
    """

    title = "RMD"
    state_keys: ClassVar[tuple[str, ...]] = (
        *MahalanobisDetector.state_keys,
        "background_mu",
        "background_cov",
        "background_precision",
    )

    def _build(self, stats: GaussianStatistics) -> RMD:
        model = super()._build(stats)
        model.background_mu = stats.mean.float()
        model.background_cov = ridged(stats.total).float()
        model.background_precision = precision(stats.total)
        return model

    def _new_model(self) -> RMD:
        return RMD(None)
