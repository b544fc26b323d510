"""Post-hoc OOD detectors on a classifier's features: what a user gets without training, to set a JEM beside.

The detectors are pytorch-ood's own (``pytorch_ood.detector``), one a file as pytorch-ood keeps them: Mahalanobis
(Lee et al. 2018), relative Mahalanobis (RMD, Ren et al. 2021), KNN (Sun et al. 2022) and ViM (Wang et al. 2022).
jemkit does not re-implement their scoring; it calls ``predict_features`` and flips the sign, because pytorch-ood
scores are *higher for outliers* and jemkit's (:mod:`jemkit.ood.scores`) are **higher for in-distribution inputs**.

Why the fitting is jemkit's: pytorch-ood's ``fit_features`` moves the whole ``[N, D]`` feature matrix to the
detector's device and works on it at once: RMD's background covariance materialises ``z - mean`` twice, ViM's fit
holds ``z - u``, the logits ``[N, C]`` and the residuals ``[N, D - d]`` together (pytorch-ood issues #9 and #93). On
ImageNet-1k features (1.28M x 2048, 10.5 GB in float32) that is about 30 GB at once on the device. Here the same
statistics (class means, the shared within-class scatter, the background scatter, ViM's covariance and alpha) are
accumulated over row chunks in float64 on ``device`` while ``z`` stays where it is (the CPU, where
:func:`jemkit.ood.features.extract_features` leaves it), then handed to pytorch-ood's detector as its fitted state:
memory ``O(chunk_size * D + D^2 + C * D)`` beyond ``z``. The scores equal those of pytorch-ood's plain fit (tested
to float32 rounding).

Each detector is a :class:`Detector` registered by name in :data:`DETECTORS`; :class:`PostHocDetectors` fits and
scores several of them together.

Example::

    >>> z, y = extract_features(classifier, train_loader)
    >>> head = last_linear(classifier)
    >>> detectors = PostHocDetectors().fit(z, y, head.weight, head.bias)
    >>> scores = detectors.score(z_test)  # {"mahalanobis": [M], "rmd": [M], "knn": [M], "vim": [M]}
"""

# isort: off
# The detector modules register themselves on import, in this order: the order of DETECTORS, of scores and of states.
from jemkit.ood.detectors.base import DETECTORS, CannotFitError, Detector, Head, register
from jemkit.ood.detectors.mahalanobis import MahalanobisDetector
from jemkit.ood.detectors.rmd import RMDDetector
from jemkit.ood.detectors.knn import KNNDetector, default_knn_k
from jemkit.ood.detectors.vim import ViMDetector, default_vim_dim
from jemkit.ood.detectors.collection import POSTHOC_DETECTORS, PostHocDetectors
# isort: on

__all__ = [
    "DETECTORS",
    "POSTHOC_DETECTORS",
    "CannotFitError",
    "Detector",
    "Head",
    "KNNDetector",
    "MahalanobisDetector",
    "PostHocDetectors",
    "RMDDetector",
    "ViMDetector",
    "default_knn_k",
    "default_vim_dim",
    "register",
]
