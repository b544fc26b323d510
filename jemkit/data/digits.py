"""scikit-learn's 8x8 handwritten digits as a LightningDataModule: real images that need no download.

``load_digits`` ships 1797 genuine handwritten digits inside scikit-learn, so tests, tutorials and CI can
train and sample a JEM on real image data in seconds on a CPU and without internet access. By default images are
scaled to the same ``[-1, 1]`` range as jemkit's other image modules; ``normalization="unit"`` gives ``[0, 1]`` and
``normalization="standard"`` the mean/std-standardised pixels many user pipelines feed their classifiers (a JEM's
input domain is fitted on whichever it gets).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from jemkit.checks import check_choice, check_integer
from jemkit.data._common import SplitDataModule, check_batch_size, check_split_fractions, stratified_split

__all__ = ["NORMALIZATIONS", "DigitsDataModule"]

NORMALIZATIONS: tuple[str, ...] = ("symmetric", "unit", "standard")
"""Accepted ``normalization`` values of :class:`DigitsDataModule`."""


class RandomShiftDataset(TensorDataset):
    """Images ``[N, C, H, W]`` translated by up to ``shift`` pixels per axis, the background filled with ``fill``.

    The classic augmentation for small digit images: it is label-preserving and roughly doubles the effective data.
    ``fill`` is the value of a blank (no ink) pixel: -1 for images in ``[-1, 1]``, 0 for ``[0, 1]``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int, fill: float = -1.0) -> None:
        super().__init__(images, labels)
        self.shift = shift
        self.fill = fill

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = super().__getitem__(index)
        s = self.shift
        padded = torch.nn.functional.pad(image, (s, s, s, s), value=self.fill)
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        return padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]], label


class DigitsDataModule(SplitDataModule):
    """The scikit-learn digits (1797 real 8x8 grey images, 10 classes) with a seeded, stratified split.

    Images are float32 ``[N, 1, 8, 8]`` mapped from the raw ``[0, 16]`` ink levels as ``normalization`` says; labels
    are int64. The train/val/test split is stratified by class and fixed by ``seed``, so every split holds every
    digit and two modules with the same seed see exactly the same examples.

    ``normalization``, with ``x01 = raw / 16`` the ink level in ``[0, 1]``:

    - ``"symmetric"`` (default): ``raw / 8 - 1`` in ``[-1, 1]``, jemkit's usual range for samplers.
    - ``"unit"``: ``x01`` in ``[0, 1]``.
    - ``"standard"``: ``(x01 - mean) / std`` with the scalar mean and (population) standard deviation of all pixels
      of the training split (after ``classes`` is applied), like ImageNet's per-channel normalisation; with the
      default split ``mean`` ~ 0.305 and ``std`` ~ 0.376, so pixels span about ``[-0.81, 1.85]``. ``pixel_mean``
      and ``pixel_std`` hold the two numbers after ``setup``.

    ``data_range`` is the instance's true pixel range: ``(-1, 1)``, ``(0, 1)``, or for ``"standard"`` the
    standardised blank and full-ink values ``(-mean / std, (1 - mean) / std)``, known only after ``setup`` (``None``
    before). The class attribute ``DigitsDataModule.data_range`` is the default's ``(-1, 1)``.

    Args:
        batch_size: examples per batch in every loader (the train loader drops the last partial batch).
        val_fraction: fraction of all 1797 images held out for validation, in (0, 1).
        test_fraction: fraction of all 1797 images held out for testing, in (0, 1); the two fractions must sum
            to less than 1.
        seed: seed of the split (not of the training run).
        num_workers: ``DataLoader`` worker processes; 0 loads in the main process, which is fastest here.
        shift: training images are randomly translated by up to this many pixels (0: no augmentation).
        classes: keep only these digits (relabelled ``0..k-1`` in the given order) for an open-set split; the other
            digits' test images become ``heldout_dataset``, near-OOD inputs for the model trained on the rest.
        normalization: ``"symmetric"``, ``"unit"`` or ``"standard"`` (see above).

    Example::

        dm = DigitsDataModule(batch_size=32)
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [32, 1, 8, 8] in [-1, 1], y: [32] int64
    """

    num_classes: int = 10
    input_shape: ClassVar[tuple[int, ...]] = (1, 8, 8)
    data_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
        shift: int = 0,
        classes: Sequence[int] | None = None,
        normalization: str = "symmetric",
    ) -> None:
        super().__init__()
        check_batch_size(batch_size)
        check_split_fractions(val_fraction, test_fraction)
        check_integer("num_workers", num_workers, minimum=0)
        if not 0 <= shift <= 3:
            raise ValueError(f"shift must be an integer number of pixels in [0, 3], got {shift!r}")
        if classes is not None:
            classes = [int(c) for c in classes]
            if len(set(classes)) != len(classes) or not 2 <= len(classes) <= 10 or not set(classes) <= set(range(10)):
                raise ValueError(f"classes must be 2 to 10 distinct digits in 0..9, got {classes!r}")
        check_choice("normalization", normalization, NORMALIZATIONS)
        self.save_hyperparameters()
        self.normalization = normalization
        self.data_range: tuple[float, float] | None = {"symmetric": (-1.0, 1.0), "unit": (0.0, 1.0)}.get(normalization)
        self.pixel_mean: float | None = None
        self.pixel_std: float | None = None
        self.classes = classes
        self.num_classes = len(classes) if classes is not None else 10
        self.heldout_dataset: TensorDataset | None = None
        self.shift = shift
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load and split the digits once; later calls (any stage) are no-ops."""
        if self.train_dataset is not None:
            return
        images, labels = load_digits(return_X_y=True)
        if self.normalization == "symmetric":
            x = torch.from_numpy(images).float().view(-1, *self.input_shape) / 8.0 - 1.0
        else:  # "unit", and "standard" once the training split is known
            x = torch.from_numpy(images).float().view(-1, *self.input_shape) / 16.0
        y = torch.from_numpy(labels).long()
        train, val, test = stratified_split(labels, self.val_fraction, self.test_fraction, self.seed)
        if self.classes is not None:  # open set: the kept classes, relabelled 0..k-1; the others' test images held out
            kept = torch.isin(y, torch.tensor(self.classes))
            self.heldout_dataset = TensorDataset(x[test[~kept[test]]], y[test[~kept[test]]])
            train, val, test = (i[kept[i]] for i in (train, val, test))
            relabel = torch.full((10,), -1, dtype=torch.long)
            relabel[torch.tensor(self.classes)] = torch.arange(len(self.classes))
            y = relabel[y]
        fill = -1.0 if self.normalization == "symmetric" else 0.0  # a blank pixel
        if self.normalization == "standard":  # the training split's statistics, as a user's pipeline would compute them
            train_pixels = x[train].double()
            mean, std = train_pixels.mean().item(), train_pixels.std(correction=0).item()
            x = (x - mean) / std
            if self.heldout_dataset is not None:
                held_x, held_y = self.heldout_dataset.tensors
                self.heldout_dataset = TensorDataset((held_x - mean) / std, held_y)
            self.pixel_mean, self.pixel_std = mean, std
            self.data_range = (-mean / std, (1.0 - mean) / std)
            fill = -mean / std
        self.train_dataset = (
            RandomShiftDataset(x[train], y[train], self.shift, fill)
            if self.shift
            else TensorDataset(x[train], y[train])
        )
        self.val_dataset = TensorDataset(x[val], y[val])
        self.test_dataset = TensorDataset(x[test], y[test])
