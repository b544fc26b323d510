"""Several post-hoc detectors fitted together on one classifier's features, as the evaluation, the OOD monitor and
the fused scores use them.

The collection knows no detector by itself: it looks names up in :data:`~jemkit.ood.detectors.base.DETECTORS`,
checks the features once, fits each detector in registration order (Mahalanobis and RMD sharing one pass of their
Gaussian statistics), skips with its reason a detector requested by default that cannot be fitted, and keeps the
``state_dict`` format of jemkit's earlier single-module version so that saved states still load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from jemkit.checks import check_integer, check_names
from jemkit.ood.detectors._gaussian import shared_statistics
from jemkit.ood.detectors.base import DETECTORS, CannotFitError, Detector, Head

__all__ = ["POSTHOC_DETECTORS", "PostHocDetectors"]

POSTHOC_DETECTORS: tuple[str, ...] = ("mahalanobis", "rmd", "knn", "vim")
"""jemkit's own detectors, the default of :class:`PostHocDetectors`; others may be added to
:data:`~jemkit.ood.detectors.base.DETECTORS` with :func:`~jemkit.ood.detectors.base.register`."""


class PostHocDetectors:
    """pytorch-ood's feature detectors, fitted on a classifier's training features and scored the jemkit way
    (**higher = more in-distribution**).

    Args:
        names: registered detectors (:data:`POSTHOC_DETECTORS` and any added with
            :func:`~jemkit.ood.detectors.base.register`); default :data:`POSTHOC_DETECTORS`, ViM skipped (reason in
            :attr:`skipped`) when :meth:`fit` gets no head. Naming ``"vim"`` explicitly makes a missing head an error.
        knn_k: KNN's neighbour rank; default :func:`~jemkit.ood.detectors.knn.default_knn_k` of the number of fitted
            features.
        vim_dim: ViM's principal dimension ``d`` (``1 <= d < D``); default
            :func:`~jemkit.ood.detectors.vim.default_vim_dim`.
        chunk_size: rows per chunk while fitting and scoring: bounds the memory, never changes a score.
        device: where the statistics are accumulated and scoring runs (KNN always runs on the CPU, in
            scikit-learn); default the device of the features given to :meth:`fit`.
        strict: a detector that cannot be fitted raises (``True``) or is skipped with its reason in
            :attr:`skipped` (``False``); default: strict when ``names`` are given.

    A one-logit binary head (``head_weight [1, D]``) is read as jemkit reads it, the logits ``[-g/2, g/2]``, so ViM's
    energy is the binary JEM's; Mahalanobis and RMD fit the two classes of the 0/1 labels.

    Attributes:
        fitted: the fitted :class:`~jemkit.ood.detectors.base.Detector` objects by name.
        detectors: what they score with by name (pytorch-ood's detectors for jemkit's own), see
            :attr:`~jemkit.ood.detectors.base.Detector.backend`.
        skipped: ``{name: reason}`` of requested-by-default detectors that could not be fitted.
        classes: the class labels seen at fit (Mahalanobis/RMD fit one Gaussian each; labels need not be contiguous).
        num_features: the feature size ``D`` seen at fit.
    """

    def __init__(
        self,
        names: Sequence[str] | None = None,
        knn_k: int | None = None,
        vim_dim: int | None = None,
        chunk_size: int = 4096,
        device: torch.device | str | None = None,
        strict: bool | None = None,
    ) -> None:
        explicit = names is not None if strict is None else strict
        names = POSTHOC_DETECTORS if names is None else names
        self.names = tuple(check_names("post-hoc detector(s)", names, tuple(DETECTORS), allow_empty=False))
        if knn_k is not None:
            check_integer("knn_k", knn_k, 1)
        if vim_dim is not None:
            check_integer("vim_dim", vim_dim, 1)
        self.explicit = explicit
        self.knn_k = knn_k
        self.vim_dim = vim_dim
        self.chunk_size = check_integer("chunk_size", chunk_size, 1)
        self.device = None if device is None else torch.device(device)
        self.fitted: dict[str, Detector] = {}
        self.skipped: dict[str, str] = {}
        self.classes: Tensor | None = None
        self.num_features: int | None = None

    @property
    def detectors(self) -> dict[str, Any]:
        """The fitted detectors' scoring objects by name (pytorch-ood's for jemkit's own detectors)."""
        return {name: detector.backend for name, detector in self.fitted.items()}

    def _build(self, name: str) -> Detector:
        """A new, unfitted detector ``name`` with this collection's settings."""
        options = {"knn": {"k": self.knn_k}, "vim": {"d": self.vim_dim}}.get(name, {})
        return DETECTORS[name](chunk_size=self.chunk_size, device=self.device, **options)

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(
        self, z: Tensor, y: Tensor, head_weight: Tensor | None = None, head_bias: Tensor | None = None
    ) -> PostHocDetectors:
        """Fit every detector on in-distribution training features ``z [N, D]`` with labels ``y [N]``.

        Args:
            z: features (:func:`jemkit.ood.features.extract_features`), any device and float dtype.
            y: class labels ``>= 0`` (integers, or 0/1 floats of a binary head).
            head_weight, head_bias: the last linear layer's ``W [C, D]`` and ``b [C]`` (``C = 1`` for a one-logit
                head; no bias: zeros), for ViM.

        Raises:
            ValueError: shapes that do not fit, negative or fractional labels, non-finite features, ``knn_k`` above
                ``N``, ``vim_dim`` not below ``D``, or ``"vim"`` named without a head.
        """
        z, y = self._check_training_data(z, y)
        self.fitted, self.skipped = {}, {}
        self.num_features = z.shape[1]
        self.classes, labels = torch.unique(y, return_inverse=True)
        head = None if head_weight is None else Head(head_weight, head_bias)
        with shared_statistics():
            for name in (name for name in DETECTORS if name in self.names):
                detector = self._build(name)
                try:
                    detector.fit(z, labels, head)
                except CannotFitError as reason:
                    if self.explicit:
                        raise ValueError(f"{detector.title or name} cannot be fitted: {reason}") from None
                    self.skipped[name] = str(reason)
                else:
                    self.fitted[name] = detector
        return self

    def _check_training_data(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``z [N, D]`` detached and ``y [N]`` as integer labels on ``z``'s device, or a ValueError saying what is
        wrong with them."""
        if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
            raise ValueError(
                f"z must be float features [N, D], got {type(z).__name__} {tuple(getattr(z, 'shape', ()))}"
            )
        if not isinstance(y, Tensor):
            raise ValueError(f"y must be a tensor of labels [N], got {type(y).__name__}")
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 1 or y.shape[0] != z.shape[0]:
            raise ValueError(f"y must be labels [N] = [{z.shape[0]}], got shape {tuple(y.shape)}")
        if z.shape[0] < 2:
            raise ValueError(f"need at least 2 training features to fit, got {z.shape[0]}")
        if y.is_floating_point():
            if not bool((y == y.round()).all()):
                raise ValueError("y must hold whole class labels (integers or 0/1 floats), got fractional values")
            y = y.long()
        y = y.detach().to(z.device)
        if bool((y < 0).any()):
            raise ValueError(f"y must hold class labels >= 0 (in-distribution only), got minimum {int(y.min())}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("z holds non-finite features (NaN or inf): the classifier diverged or the layer overflows")
        return z.detach(), y

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, z: Tensor) -> dict[str, Tensor]:
        """Scores ``{name: [M]}`` of features ``z [M, D]``, float32 on ``z``'s device, **higher = more
        in-distribution** (pytorch-ood's outlier scores negated). Fitted detectors only (see :attr:`skipped`)."""
        if not self.fitted:
            raise RuntimeError("PostHocDetectors.score called before fit")
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.num_features:
            raise ValueError(
                f"z must be features [M, {self.num_features}] like the fitted ones, got "
                f"{type(z).__name__} {tuple(getattr(z, 'shape', ()))}"
            )
        return {name: detector.score(z) for name, detector in self.fitted.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The fitted state as plain tensors and numbers (KNN: its normalised training features), for
        ``torch.save``: ``num_features``, ``classes``, ``skipped`` and each fitted detector's state by name."""
        state: dict[str, Any] = {"num_features": self.num_features, "classes": self.classes, "skipped": self.skipped}
        for name, detector in self.fitted.items():
            state[name] = detector.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> PostHocDetectors:
        """Rebuild the fitted detectors from :meth:`state_dict`'s output (on ``self.device`` or where saved)."""
        self.num_features, self.classes, self.skipped = state["num_features"], state["classes"], dict(state["skipped"])
        self.fitted = {name: self._build(name).load_state_dict(state[name]) for name in DETECTORS if name in state}
        return self
