"""Mahalanobis distance to the nearest class mean under a shared covariance (Lee et al. 2018), pytorch-ood's.

jemkit accumulates the class means and the shared within-class scatter in float64 row chunks
(:mod:`jemkit.ood.detectors._gaussian`) instead of pytorch-ood's ``fit_features``, which works on all ``[N, D]``
features at once on the device, and hands them to ``pytorch_ood.detector.Mahalanobis`` as its fitted state. Its
``predict_features`` scores, so the scores are pytorch-ood's (negated: higher = in-distribution).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pytorch_ood.detector import Mahalanobis
from torch import Tensor

from jemkit.ood.detectors._gaussian import GaussianStatistics, gaussian_statistics, ridged
from jemkit.ood.detectors.base import Head, PytorchOODDetector, register

__all__ = ["MahalanobisDetector"]


@register("mahalanobis")
class MahalanobisDetector(PytorchOODDetector):
    """pytorch-ood's Mahalanobis detector fitted in chunks: ``model`` holds ``mu [C, D]``, ``cov [D, D]`` (the
    ridged scatter, unnormalised as pytorch-ood keeps it) and ``precision [D, D]``, all float32.

    Args: those of :class:`~jemkit.ood.detectors.base.Detector`.
    """

    title = "Mahalanobis"
    state_keys: ClassVar[tuple[str, ...]] = ("mu", "cov", "precision")
    """The attributes of the fitted pytorch-ood detector that :meth:`state_dict` stores."""

    @torch.no_grad()
    def fit(self, z: Tensor, y: Tensor, head: Head | None = None) -> MahalanobisDetector:
        """Fit on features ``z [N, D]`` with class labels ``y [N]``; ``head`` is not used."""
        stats = gaussian_statistics(z, y, self.chunk_size, self.device or z.device)
        self.model = self._build(stats)
        return self

    def _build(self, stats: GaussianStatistics) -> Mahalanobis:
        model = self._new_model()
        model.mu, model.cov, model.precision = stats.mu.float(), ridged(stats.scatter).float(), stats.precision
        return model

    def _new_model(self) -> Mahalanobis:
        return Mahalanobis(None)

    def state_dict(self) -> dict[str, Any]:
        if self.model is None:
            raise RuntimeError(f"{self._title()} state_dict called before fit")
        return {key: getattr(self.model, key) for key in self.state_keys}

    def load_state_dict(self, state: dict[str, Any]) -> MahalanobisDetector:
        model = self._new_model()
        for key, value in state.items():
            setattr(model, key, value)
        self.model = self._placed(model)
        return self
