"""Tabular classification as a LightningDataModule: your own feature matrix, or a dataset shipped with scikit-learn.

A JEM does not need images: any classifier of feature vectors ``[B, D]`` (an MLP, say) can be trained as one. This
module takes arrays ``x [N, D]``, ``y [N]`` from Python, or one of scikit-learn's bundled datasets by name (``wine``,
``breast_cancer``, ``iris``, ``digits``: they ship inside the package, nothing is downloaded), splits them with a
seeded, stratified split and by default standardises every feature with the training split's mean and standard
deviation, the usual pipeline of a tabular model. The features therefore keep their own scale: they are *not* mapped
into ``[-1, 1]`` and there is no ``data_range`` box.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from torch.utils.data import TensorDataset

from jemkit.checks import check_choice, check_integer
from jemkit.data._common import SplitDataModule, check_batch_size, check_split_fractions, stratified_split

__all__ = ["LABEL_DTYPES", "SKLEARN_DATASETS", "TabularDataModule"]

SKLEARN_DATASETS: dict[str, Callable[..., Any]] = {
    "breast_cancer": load_breast_cancer,  # 569 x 30, 2 classes (malignant, benign)
    "digits": load_digits,  # 1797 x 64 (8x8 pixels as features), 10 classes
    "iris": load_iris,  # 150 x 4, 3 classes
    "wine": load_wine,  # 178 x 13, 3 classes
}
"""scikit-learn datasets that ship with the package (no download), by the name ``dataset`` accepts."""

LABEL_DTYPES: tuple[str, ...] = ("long", "float")
"""Accepted ``label_dtype`` values: int64 class indices ``[B]``, or float 0/1 targets ``[B, 1]`` (two classes only)."""


def _as_numpy(name: str, value: Any) -> np.ndarray:
    """``value`` (numpy array, tensor, pandas object or nested lists) as a numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be array-like (numpy array, tensor or nested lists), got {type(value)}"
        ) from error


class TabularDataModule(SplitDataModule):
    """Feature vectors ``x [N, D]`` with class labels ``y [N]``, split into train/val/test by a seeded stratified split.

    Give either ``dataset`` (a name in ``SKLEARN_DATASETS``; the form LightningCLI uses) or the arrays ``x`` and ``y``
    (Python users)::

        dm = TabularDataModule.from_sklearn("wine", batch_size=32)  # or TabularDataModule(dataset="wine")
        dm = TabularDataModule(x=features, y=labels)  # numpy arrays, tensors, DataFrames or lists
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [32, 13] float32, y: [32] int64 in 0..2

    and on the command line ``jemkit fit --data jemkit.data.TabularDataModule --data.dataset wine ...``.

    Labels may be any values (ints, strings, floats): the sorted distinct values become classes ``0..K-1`` and are
    kept in ``classes``. The split is stratified by class and fixed by ``seed``. With ``standardize=True`` every
    feature is shifted and scaled by the *training* split's mean and (population) standard deviation, which
    ``feature_mean`` and ``feature_std`` ``[D]`` hold after ``setup``: the training split then has per-feature mean 0
    and standard deviation 1, the other splits only approximately. A feature that is constant on the training split is
    only centred. Inputs are float32 ``[B, D]``; labels int64 ``[B]``, or with ``label_dtype="float"`` float32 0/1
    ``[B, 1]`` (class 1 is ``classes[1]``), the targets of a one-logit binary head trained with BCE. That option needs
    exactly two classes; ``num_classes`` stays 2 (the model's one-logit head takes ``num_classes=1``).

    Attributes:
        num_classes: number of classes ``K``.
        input_shape: ``(D,)``.
        feature_names: the ``D`` feature names if known (scikit-learn datasets, a DataFrame's columns, the argument),
            else ``None``.
        classes: the original label value of each class index.
        class_names: names of the classes (scikit-learn's ``target_names``, else the labels as strings).
        data_range: ``None``: features are unbounded; a JEM's ``InputDomain`` fits the box on the training data.

    Args:
        dataset: name of a scikit-learn dataset (``SKLEARN_DATASETS``), or ``None`` when ``x`` and ``y`` are given.
        x: features ``[N, D]``; not stored in the hyper-parameters (nor in checkpoints).
        y: labels ``[N]`` (or ``[N, 1]``); not stored in the hyper-parameters.
        feature_names: names of the ``D`` features of ``x`` (overrides a DataFrame's columns).
        standardize: standardise features with the training split's statistics.
        label_dtype: ``"long"`` (int64 class indices ``[B]``) or ``"float"`` (float32 0/1 ``[B, 1]``, two classes only).
        batch_size: examples per batch in every loader (the train loader drops the last partial batch, so keep it well
            below the training split's size: wine has 124 training examples with the default fractions).
        val_fraction: fraction of the examples held out for validation, in (0, 1).
        test_fraction: fraction of the examples held out for testing, in (0, 1); the fractions must sum to < 1.
        seed: seed of the split.
        num_workers: ``DataLoader`` worker processes; 0 loads in the main process, which is fastest here.
    """

    data_range: ClassVar[tuple[float, float] | None] = None

    def __init__(
        self,
        dataset: str | None = None,
        x: Any = None,
        y: Any = None,
        feature_names: Sequence[str] | None = None,
        standardize: bool = True,
        label_dtype: str = "long",
        batch_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_batch_size(batch_size)
        check_split_fractions(val_fraction, test_fraction)
        check_integer("num_workers", num_workers, minimum=0)
        check_choice("label_dtype", label_dtype, LABEL_DTYPES)
        self.save_hyperparameters(ignore=["x", "y"])
        class_names: list[str] | None = None
        if dataset is not None:
            if x is not None or y is not None:
                raise ValueError(f"give either dataset or the arrays x and y, not both (got dataset={dataset!r})")
            features, labels, feature_names, class_names = self._load_sklearn(dataset, feature_names)
        else:
            if x is None or y is None:
                raise ValueError(
                    "give dataset (one of "
                    f"{', '.join(map(repr, sorted(SKLEARN_DATASETS)))}) or both arrays x [N, D] and y [N]; got "
                    f"x={'None' if x is None else 'an array'} and y={'None' if y is None else 'an array'}"
                )
            if feature_names is None and hasattr(x, "columns"):  # a pandas DataFrame
                feature_names = [str(c) for c in x.columns]
            features, labels = _as_numpy("x", x), _as_numpy("y", y)
        features = self._check_features(features)
        classes, labels = self._check_labels(labels, len(features))
        if feature_names is not None:
            feature_names = [str(name) for name in feature_names]
            if len(feature_names) != features.shape[1]:
                raise ValueError(
                    f"feature_names must name each of the {features.shape[1]} features, got {len(feature_names)} names"
                )
        if label_dtype == "float" and len(classes) != 2:
            raise ValueError(
                f"label_dtype='float' gives 0/1 targets for a binary (one-logit) head and needs exactly 2 classes, got "
                f"{len(classes)} classes; use label_dtype='long' for more"
            )
        self.dataset = dataset
        self.feature_names: list[str] | None = feature_names
        self.classes: list[Any] = classes.tolist()
        self.class_names: list[str] = class_names if class_names is not None else [str(c) for c in self.classes]
        self.num_classes = len(classes)
        self.input_shape: tuple[int, ...] = (features.shape[1],)
        self.standardize = standardize
        self.label_dtype = label_dtype
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self._features = features
        self._labels = labels
        self._indices = self._split(labels)
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    @classmethod
    def from_sklearn(cls, name: str, **kwargs: Any) -> TabularDataModule:
        """The scikit-learn dataset ``name`` (see ``SKLEARN_DATASETS``); ``kwargs`` go to the constructor."""
        return cls(dataset=name, **kwargs)

    @staticmethod
    def _load_sklearn(
        name: str, feature_names: Sequence[str] | None
    ) -> tuple[np.ndarray, np.ndarray, Sequence[str] | None, list[str]]:
        if not isinstance(name, str) or name.strip().lower().replace("-", "_") not in SKLEARN_DATASETS:
            raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(SKLEARN_DATASETS))}")
        bunch = SKLEARN_DATASETS[name.strip().lower().replace("-", "_")]()
        if feature_names is None:
            feature_names = [str(f) for f in bunch.feature_names] if "feature_names" in bunch else None
        return bunch.data, bunch.target, feature_names, [str(t) for t in bunch.target_names]

    @staticmethod
    def _check_features(x: np.ndarray) -> np.ndarray:
        if x.ndim != 2:
            hint = " (one feature? pass x.reshape(-1, 1))" if x.ndim == 1 else ""
            raise ValueError(f"x must be 2-D [N, D] (examples x features), got shape {tuple(x.shape)}{hint}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must hold at least one example and one feature, got shape {tuple(x.shape)}")
        try:
            x = x.astype(np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"x must hold numbers, got dtype {x.dtype}") from error
        bad = ~np.isfinite(x)
        if bad.any():
            rows, cols = np.nonzero(bad)
            raise ValueError(
                f"x must be finite, got {int(bad.sum())} NaN or infinite values (the first at row {rows[0]}, "
                f"feature {cols[0]}); impute or drop them first"
            )
        return x

    @staticmethod
    def _check_labels(y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct label values (sorted) and the labels as int64 class indices ``[N]``."""
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D [N] (one label per example), got shape {tuple(y.shape)}")
        if len(y) != n:
            raise ValueError(f"x and y must have the same length N, got {n} examples in x and {len(y)} labels in y")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise ValueError("y must not hold NaN or infinite labels")
        classes, indices = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"y must hold at least 2 classes to classify, got {len(classes)}: {classes.tolist()!r}")
        return classes, indices.reshape(-1).astype(np.int64)

    def _split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted train/val/test row indices of a split stratified by class and fixed by ``seed``."""
        try:
            train, val, test = stratified_split(labels, self.val_fraction, self.test_fraction, self.seed)
        except ValueError as error:
            counts = np.bincount(labels).tolist()
            raise ValueError(
                f"cannot split {len(labels)} examples with class counts {counts} into stratified train/val/test splits "
                f"with val_fraction={self.val_fraction!r} and test_fraction={self.test_fraction!r}: every class needs "
                f"enough examples for every split ({error})"
            ) from error
        return train.numpy(), val.numpy(), test.numpy()

    def setup(self, stage: str | None = None) -> None:
        """Standardise (if asked) and build the three splits once; later calls (any stage) are no-ops."""
        if self.train_dataset is not None:
            return
        x, labels = self._features, self._labels
        train, val, test = self._indices
        if self.standardize:
            mean = x[train].mean(axis=0)
            std = x[train].std(axis=0)
            std = np.where(std > 0, std, 1.0)  # a constant feature is only centred
            x = (x - mean) / std
            self.feature_mean = torch.from_numpy(mean).float()
            self.feature_std = torch.from_numpy(std).float()
        features = torch.from_numpy(x).float()
        y = torch.from_numpy(labels)
        if self.label_dtype == "float":
            y = y.float().unsqueeze(1)
        self.train_dataset, self.val_dataset, self.test_dataset = (
            TensorDataset(features[i], y[i])
            for i in (torch.from_numpy(train), torch.from_numpy(val), torch.from_numpy(test))
        )
