"""Deep nearest neighbours (KNN, Sun et al. 2022): the distance of a normalised feature to its k-th nearest
normalised training feature, pytorch-ood's.

pytorch-ood keeps the training features in scikit-learn's ``NearestNeighbors``, on the CPU, so jemkit hands it the
features there (float32, ``[N, D]``) rather than copying them to the device; ``predict_features`` scores (negated:
higher = in-distribution). The state is the normalised bank itself, so a restored detector needs no refit.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_ood.detector import KNN
from torch import Tensor

from jemkit.checks import check_integer
from jemkit.ood.detectors.base import Head, PytorchOODDetector, register

__all__ = ["KNNDetector", "default_knn_k"]


def default_knn_k(num_train: int) -> int:
    """KNN's ``k`` for ``num_train`` fitted features: ``round(num_train / 1000)``, at least 1.

    Sun et al. (2022) keep ``k`` at about a thousandth of the training set: k = 50 for CIFAR-10 (50,000 images),
    1,000 for ImageNet (1.28M), and 10 when they fit on 1% of ImageNet. So 1,400 digits get k = 1.
    """
    check_integer("num_train", num_train, 1)
    return max(1, round(num_train / 1000))


@register("knn")
class KNNDetector(PytorchOODDetector):
    """pytorch-ood's KNN on the CPU.

    Args:
        k: the neighbour rank; default :func:`default_knn_k` of the number of fitted features.
        chunk_size, device: those of :class:`~jemkit.ood.detectors.base.Detector`; ``device`` is unused, as
            scikit-learn works on the CPU.
    """

    title = "KNN"

    def __init__(self, k: int | None = None, chunk_size: int = 4096, device: torch.device | str | None = None) -> None:
        super().__init__(chunk_size, device)
        self.k = None if k is None else check_integer("k", k, 1)

    @torch.no_grad()
    def fit(self, z: Tensor, y: Tensor, head: Head | None = None) -> KNNDetector:
        """Fit on features ``z [N, D]``; the labels ``y [N]`` and ``head`` are not used.

        Raises:
            ValueError: ``k`` above ``N``.
        """
        n = z.shape[0]
        k = default_knn_k(n) if self.k is None else self.k
        if k > n:
            raise ValueError(f"knn_k={k} exceeds the number of fitted features ({n})")
        # scikit-learn's NearestNeighbors keeps the normalised features (N x D float32) on the CPU.
        self.model = KNN(None, k=k).fit_features(z.detach().float().cpu(), y.cpu())
        return self

    def state_dict(self) -> dict[str, Any]:
        """``k`` and the normalised training features ``bank [N, D]`` (float32, CPU)."""
        if self.model is None:
            raise RuntimeError(f"{self._title()} state_dict called before fit")
        return {"k": self.model.k, "bank": torch.from_numpy(self.model.knn._fit_X.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> KNNDetector:
        # the bank is already unit-norm; normalising it again is the identity up to rounding
        bank = state["bank"]
        self.model = KNN(None, k=state["k"]).fit_features(bank, torch.zeros(len(bank), dtype=torch.long))
        return self
