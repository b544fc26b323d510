"""CIFAR-10-C (Hendrycks & Dietterich 2019) from its ``.npy`` files: the CIFAR-10 test set under 19 corruptions at
severities 1 to 5, the benchmark of calibration under shift (Ovadia et al. 2019) and of test-time adaptation.

The release is a folder of ``<corruption>.npy`` arrays ``[50000, 32, 32, 3]`` uint8 (the 10,000 test images at
severity 1, then 2, ... 5) and one ``labels.npy`` ``[50000]``. Images are scaled to ``[-1, 1]`` like
:class:`~jemkit.data.CIFAR10DataModule`'s, so a model trained there is evaluated here unchanged. The arrays are
memory-mapped: only the images a loader reads are loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from jemkit.checks import check_integer, check_names
from jemkit.data._common import check_batch_size, make_loader

__all__ = ["CIFAR10C_CORRUPTIONS", "CIFAR10C_EXTRA", "CIFAR10CDataModule", "CorruptedImages"]

CIFAR10C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 corruptions of the benchmark (the files the release's averages are taken over)."""

CIFAR10C_EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""The four held-out corruptions the release also ships (for validation)."""

_SOURCE = "https://zenodo.org/records/2535967 (CIFAR-10-C.tar, 2.9 GB; Hendrycks & Dietterich 2019)"


class CorruptedImages(Dataset):
    """One corruption at one severity: ``(image [3, 32, 32] float in [-1, 1], label)`` items read from the arrays.

    Args:
        images: the corruption's array ``[5 * n, 32, 32, 3]`` uint8 (memory-mapped).
        labels: the labels ``[5 * n]``.
        severity: 1 to 5; the rows ``[(severity - 1) * n, severity * n)``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, severity: int) -> None:
        self.per_severity = len(labels) // 5
        self.offset = (severity - 1) * self.per_severity
        self.images, self.labels, self.severity = images, labels, severity

    def __len__(self) -> int:
        return self.per_severity

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        row = self.offset + index % len(self)
        image = torch.from_numpy(np.array(self.images[row], dtype=np.float32)).permute(2, 0, 1)
        return image / 127.5 - 1.0, torch.tensor(int(self.labels[row]), dtype=torch.long)


class CIFAR10CDataModule(LightningDataModule):
    """CIFAR-10-C's corrupted test sets from a folder of the release's ``.npy`` files, no download.

    ``test_dataset`` (and the test and predict loaders) chain every chosen corruption and severity;
    :meth:`corrupted_sets` gives them one by one, ``{corruption: {severity: Dataset}}``, the form
    :func:`jemkit.evaluate.shift.shift_report` takes as ``corrupted=``.

    Args:
        root: the folder holding ``labels.npy`` and ``<corruption>.npy`` (the release's ``CIFAR-10-C/``).
        corruptions: corruption names (:data:`CIFAR10C_CORRUPTIONS`, :data:`CIFAR10C_EXTRA`).
        severities: severities 1 to 5.
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.

    Raises:
        FileNotFoundError: in :meth:`setup`, naming the first missing file and where to get the data.
        ValueError: on unknown corruptions, severities outside 1 to 5, or arrays of unexpected shapes.

    Example::

        >>> dm = CIFAR10CDataModule("data/CIFAR-10-C", corruptions=["gaussian_noise", "contrast"], severities=[5])
        >>> dm.setup("test")
        >>> sets = dm.corrupted_sets()  # {"gaussian_noise": {5: Dataset}, "contrast": {5: Dataset}}
    """

    num_classes: ClassVar[int] = 10
    input_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)
    data_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)

    def __init__(
        self,
        root: str = "data/CIFAR-10-C",
        corruptions: Sequence[str] = CIFAR10C_CORRUPTIONS,
        severities: Sequence[int] = (1, 2, 3, 4, 5),
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_batch_size(batch_size)
        corruptions, severities = list(corruptions), list(severities)
        known = CIFAR10C_CORRUPTIONS + CIFAR10C_EXTRA
        check_names("CIFAR-10-C corruption(s)", corruptions, known, allow_empty=False)
        if not severities or any(isinstance(s, bool) or s not in (1, 2, 3, 4, 5) for s in severities):
            raise ValueError(f"severities must be integers from 1 to 5, got {severities!r}")
        check_integer("num_workers", num_workers, minimum=0)
        self.save_hyperparameters()
        self.root = Path(root)
        self.corruptions, self.severities = corruptions, severities
        self.batch_size, self.num_workers = batch_size, num_workers
        self.test_dataset: Dataset | None = None
        self._sets: dict[str, dict[int, Dataset]] = {}

    def _load(self, name: str) -> np.ndarray:
        path = self.root / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10-C file {str(path.resolve())!r} not found: download {_SOURCE}, unpack it and pass "
                "root=<the CIFAR-10-C folder> (it holds labels.npy and one <corruption>.npy per corruption)"
            )
        return np.load(path, mmap_mode="r")

    def setup(self, stage: str | None = None) -> None:
        """Open (memory-map) the arrays once and check their shapes; later calls are no-ops."""
        if self.test_dataset is not None:
            return
        labels = self._load("labels")
        if labels.ndim != 1 or len(labels) == 0 or len(labels) % 5:
            raise ValueError(
                f"{self.root / 'labels.npy'} holds an array of shape {labels.shape}; expected [5 * n] labels "
                "(n test images at each of 5 severities)"
            )
        for name in self.corruptions:
            images = self._load(name)
            if images.shape != (len(labels), 32, 32, 3) or images.dtype != np.uint8:
                raise ValueError(
                    f"{self.root / (name + '.npy')} holds {images.dtype} images of shape {images.shape}; expected "
                    f"uint8 [{len(labels)}, 32, 32, 3] to match labels.npy"
                )
            self._sets[name] = {s: CorruptedImages(images, labels, s) for s in self.severities}
        self.test_dataset = ConcatDataset([d for sets in self._sets.values() for d in sets.values()])

    def corrupted_sets(self) -> dict[str, dict[int, Dataset]]:
        """``{corruption: {severity: Dataset}}`` of the chosen corruptions and severities (after :meth:`setup`)."""
        if not self._sets:
            self.setup("test")
        return {name: dict(sets) for name, sets in self._sets.items()}

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return make_loader(self.test_dataset, self.batch_size, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
