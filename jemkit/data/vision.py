"""The torchvision image benchmarks of the JEM literature as LightningDataModules that share one recipe.

Every module here scales images to ``[-1, 1]`` (the range jemkit's samplers start from and clamp to), holds
out a seeded validation split from the training set *without* augmentation, and turns torchvision's terse
"Dataset not found" into an error that says where it looked and how to fetch the files. The five public
classes differ only in a few class attributes, so adding a dataset (or swapping in a fake one in a test) means
overriding ``dataset_cls`` and friends rather than copying code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torchvision.transforms as T
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets

from jemkit.checks import check_integer
from jemkit.data._common import SplitDataModule, check_batch_size
from jemkit.data.idx import IDX_SPLITS, find_idx_folder, read_idx_split
from jemkit.data.ood import mnist_style_digits

__all__ = [
    "VisionDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "SVHNDataModule",
]


class _TransformedSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image: one loaded dataset, several views."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, transform: Callable | None) -> None:
        self.dataset = dataset
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        image, target = self.dataset[int(self.indices[i])]
        return (self.transform(image) if self.transform is not None else image), target


class VisionDataModule(SplitDataModule):
    """Shared base of the torchvision data modules; subclasses set the class attributes below.

    The training split of the torchvision dataset is loaded once (without a transform) and split by a seeded
    permutation into ``val_size`` validation images and the rest for training; the training view applies
    :meth:`train_transform` (augmentation + scaling), the validation view only :meth:`eval_transform`
    (scaling), so validation is never augmented. The official test split is used for testing and prediction.

    Class attributes a subclass (or a test) sets: ``dataset_cls`` (a torchvision-style dataset class called as
    ``dataset_cls(root, train=..., transform=..., download=...)``; override :meth:`_make_dataset` for another
    signature), ``dataset_name``, ``num_classes``, ``channels``, ``image_size``, ``random_crop`` and
    ``horizontal_flip`` (augmentations used when ``augment=True``).

    Args:
        root: directory holding the dataset files (torchvision's layout, e.g. ``<root>/MNIST/raw``).
        download: fetch missing files in :meth:`prepare_data` (needs internet access).
        batch_size: examples per batch in every loader (the train loader drops the last partial batch).
        num_workers: ``DataLoader`` worker processes.
        val_size: number of training images held out for validation (0 for none).
        augment: apply the dataset's training augmentation (none for MNIST-style sets).
        seed: seed of the train/validation split.

    Example::

        class MyDataModule(VisionDataModule):
            dataset_cls = datasets.KMNIST
            dataset_name = "KMNIST"
            channels, image_size = 1, 28
    """

    dataset_cls: ClassVar[type[Dataset]]
    dataset_name: ClassVar[str]
    num_classes: ClassVar[int] = 10
    channels: ClassVar[int] = 3
    image_size: ClassVar[int] = 32
    random_crop: ClassVar[bool] = False
    horizontal_flip: ClassVar[bool] = False
    data_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int = 5000,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_batch_size(batch_size)
        check_integer("val_size", val_size, minimum=0)
        self.save_hyperparameters()
        self.root = str(root)
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.augment = augment
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image as the loaders return it."""
        return (self.channels, self.image_size, self.image_size)

    def _resize(self) -> list[Callable]:
        """Transforms that bring the stored PIL image to ``input_shape`` (none by default)."""
        return []

    def _augmentation(self) -> list[Callable]:
        """The random training augmentation of this dataset (empty when ``augment=False``)."""
        if not self.augment:
            return []
        size = self.input_shape[-1]
        augmentation: list[Callable] = []
        if self.random_crop:
            # Reflection padding as in the JEM code: zero padding would add black borders that are not data.
            augmentation.append(T.RandomCrop(size, padding=4, padding_mode="reflect"))
        if self.horizontal_flip:
            augmentation.append(T.RandomHorizontalFlip())
        return augmentation

    def _scale(self) -> list[Callable]:
        half = (0.5,) * self.channels
        return [T.ToTensor(), T.Normalize(half, half)]  # [0, 255] -> [0, 1] -> [-1, 1]

    def eval_transform(self) -> T.Compose:
        """PIL image -> float tensor of ``input_shape`` in ``[-1, 1]``, deterministic."""
        return T.Compose([*self._resize(), *self._scale()])

    def train_transform(self) -> T.Compose:
        """:meth:`eval_transform` with this dataset's random augmentation inserted before the scaling."""
        return T.Compose([*self._resize(), *self._augmentation(), *self._scale()])

    def _make_dataset(self, train: bool, download: bool = False) -> Dataset:
        return self.dataset_cls(self.root, train=train, transform=None, download=download)

    def _load(self, train: bool) -> Dataset:
        try:
            return self._make_dataset(train)
        except RuntimeError as err:
            if "not found" not in str(err).lower():
                raise
            root = str(Path(self.root).resolve())
            raise FileNotFoundError(
                f"{self.dataset_name} dataset not found in root directory {root!r}. "
                "Pass download=True (or `--data.download true` on the CLI) on a machine with internet access "
                "to fetch it there, or copy torchvision's files for it into that directory."
            ) from err

    def prepare_data(self) -> None:
        """Download both splits if ``download=True``, else do nothing (``setup`` reports missing files)."""
        if self.download:
            for train in (True, False):
                self._make_dataset(train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the ``stage`` needs (all of them for ``None``); already built ones are kept."""
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            full_train = self._load(train=True)
            if self.val_size >= len(full_train):
                raise ValueError(
                    f"val_size must be smaller than the {len(full_train)} training images of "
                    f"{self.dataset_name}, got {self.val_size}"
                )
            order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(self.seed))
            val_indices, train_indices = order[: self.val_size].sort().values, order[self.val_size :]
            self.train_dataset = _TransformedSubset(full_train, train_indices, self.train_transform())
            self.val_dataset = _TransformedSubset(full_train, val_indices, self.eval_transform())
        if stage in (None, "test", "predict") and self.test_dataset is None:
            test = self._load(train=False)
            self.test_dataset = _TransformedSubset(test, torch.arange(len(test)), self.eval_transform())


class _MNISTStyleDataModule(VisionDataModule):
    """28x28 grey images in the four IDX files of MNIST's format, read by jemkit itself (:mod:`jemkit.data.idx`):
    gzipped or not, in ``root``, in torchvision's ``<root>/<Name>/raw/`` or in the folder a Debian package installs;
    no augmentation; optional zero padding to 32x32; optionally some classes only (an open set).

    The images are scaled to ``[-1, 1]`` once, when the split is built (no per-image transform runs while training).
    """

    channels: ClassVar[int] = 1
    debian_folder: ClassVar[str | None] = None
    """Where a Debian package puts the files (searched after ``root``)."""
    debian_package: ClassVar[str | None] = None

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int = 5000,
        augment: bool = True,
        seed: int = 0,
        pad_to_32: bool = False,
        classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(root, download, batch_size, num_workers, val_size, augment, seed)
        self.pad_to_32 = pad_to_32
        if classes is not None:
            classes = [int(c) for c in classes]
            if len(set(classes)) != len(classes) or not 2 <= len(classes) <= 10 or not set(classes) <= set(range(10)):
                raise ValueError(f"classes must be 2 to 10 distinct classes in 0..9, got {classes!r}")
            self.num_classes = len(classes)
        self.classes = classes
        self.heldout_dataset: Dataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = 32 if self.pad_to_32 else 28
        return (self.channels, size, size)

    def _resize(self) -> list[Callable]:
        return [T.Pad(2)] if self.pad_to_32 else []  # zero padding, i.e. background (-1 after scaling)

    # ------------------------------------------------------------------ where the files are
    def candidate_folders(self) -> list[Path]:
        """Where the four IDX files are looked for, in order: ``root``, torchvision's ``<root>/<Name>/raw``, then
        the Debian package's folder."""
        root = Path(self.root)
        folders = [root, root / self.dataset_name / "raw"]
        return folders + ([Path(self.debian_folder)] if self.debian_folder else [])

    def data_folder(self) -> Path | None:
        """The first folder of :meth:`candidate_folders` holding all four files (each plain or gzipped)."""
        return find_idx_folder(self.candidate_folders())

    def _missing(self) -> FileNotFoundError:
        files = ", ".join(stem for pair in IDX_SPLITS.values() for stem in pair)
        where = ", ".join(repr(str(folder.resolve())) for folder in self.candidate_folders())
        package = ""
        if self.debian_package:
            package = f"install Debian's package (apt-get install {self.debian_package}: {self.debian_folder}), "
        return FileNotFoundError(
            f"{self.dataset_name} dataset not found: its four IDX files ({files}; each plain or gzipped .gz) are in "
            f"none of {where}. To get them: {package}point root at a folder holding them, or pass download=True "
            "(`--data.download true` on the CLI) on a machine with internet access to fetch them into "
            f"{str(Path(self.root).resolve() / self.dataset_name / 'raw')!r}."
        )

    def prepare_data(self) -> None:
        """Find the files; with ``download=True`` fetch them through torchvision unless they are found already
        (Debian's copies, or gzipped ones, are used as they are: torchvision would not recognise them). Missing files
        without ``download`` raise the error of :meth:`setup` here, before a Trainer writes its first log file."""
        if self.data_folder() is not None:
            return
        if not self.download:
            raise self._missing()
        for train in (True, False):
            self.dataset_cls(self.root, train=train, download=True)

    # ------------------------------------------------------------------ splits
    def _images(self, split: str) -> tuple[Tensor, Tensor]:
        """``(images [N, 1, H, W] in [-1, 1], labels [N])`` of ``split``, padded as the module says."""
        folder = self.data_folder()
        if folder is None:
            raise self._missing()
        images, labels = read_idx_split(folder, split)
        x = images.unsqueeze(1).float() / 127.5 - 1.0
        if self.pad_to_32:
            x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
        return x, labels

    def _kept(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The examples of the kept classes, relabelled ``0..k-1`` in the order given (all of them without
        ``classes``)."""
        if self.classes is None:
            return x, y
        relabel = torch.full((10,), -1, dtype=torch.long)
        relabel[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        keep = relabel[y] >= 0
        return x[keep], relabel[y[keep]]

    def setup(self, stage: str | None = None) -> None:
        """Read the files once for the ``stage`` (all splits for ``None``); ``FileNotFoundError`` naming where they
        were looked for and how to get them otherwise."""
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            x, y = self._kept(*self._images("train"))
            if self.val_size >= len(x):
                raise ValueError(
                    f"val_size must be smaller than the {len(x)} training images of {self.dataset_name}, got "
                    f"{self.val_size}"
                )
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
            val, train = order[: self.val_size].sort().values, order[self.val_size :]
            self.train_dataset = TensorDataset(x[train], y[train])
            self.val_dataset = TensorDataset(x[val], y[val])
        if stage in (None, "test", "predict") and self.test_dataset is None:
            x, y = self._images("test")
            if self.classes is not None:  # the other classes' test images: near-OOD for a model trained on the rest
                held = ~torch.isin(y, torch.tensor(self.classes))
                self.heldout_dataset = TensorDataset(x[held], y[held])
            self.test_dataset = TensorDataset(*self._kept(x, y))


class MNISTDataModule(_MNISTStyleDataModule):
    """MNIST: 60k/10k grey 28x28 handwritten digits, 10 classes, as ``[1, 28, 28]`` (or 32x32) in [-1, 1].

    Args:
        root: folder holding the four IDX files (``train-images-idx3-ubyte`` ..., gzipped or not), directly or in
            torchvision's ``<root>/MNIST/raw``.
        download: fetch missing files in ``prepare_data`` (needs internet access).
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.
        val_size: training images held out for validation.
        augment: accepted for a uniform interface; MNIST uses no augmentation.
        seed: seed of the train/validation split.
        pad_to_32: zero-pad the images to 32x32 (e.g. for a WideResNet built for CIFAR).
        classes: keep only these classes (relabelled ``0..k-1``); the others' test images become
            ``heldout_dataset``.

    Example::

        dm = MNISTDataModule(root="data", download=True, pad_to_32=True)
        dm.prepare_data()
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [64, 1, 32, 32]
    """

    dataset_cls = datasets.MNIST
    dataset_name = "MNIST"


class FashionMNISTDataModule(_MNISTStyleDataModule):
    """Fashion-MNIST: 60k/10k grey 28x28 clothing images, 10 classes; the options of :class:`MNISTDataModule`.

    Found without arguments where Debian's ``dataset-fashion-mnist`` installs it (``/usr/share/datasets/
    fashion-mnist``, gzipped), or in ``root`` / ``<root>/FashionMNIST/raw`` (torchvision's layout).
    :meth:`ood_datasets` gives its near-OOD companions: MNIST-style digits (the likelihood models' classic failure,
    Nalisnick et al. 2019) and, with ``classes``, the held-out classes.

    Example::

        dm = FashionMNISTDataModule(val_size=1000)                  # Debian's files, or data/FashionMNIST/raw
        open_set = FashionMNISTDataModule(classes=[0, 1, 2, 3, 4, 5])  # 6 classes in, 4 held out
    """

    dataset_cls = datasets.FashionMNIST
    dataset_name = "FashionMNIST"
    debian_folder = "/usr/share/datasets/fashion-mnist"
    debian_package = "dataset-fashion-mnist"

    def ood_datasets(self) -> dict[str, Dataset]:
        """Near-OOD sets that make sense beside clothes: ``digits`` (scikit-learn's real handwritten digits drawn
        as MNIST draws them, :func:`jemkit.data.ood.mnist_style_digits`) and ``heldout`` (with ``classes``)."""
        sets: dict[str, Dataset] = {"digits": mnist_style_digits(self.input_shape[-1])}
        if self.classes is not None:
            self.setup("test")
            sets["heldout"] = self.heldout_dataset
        return sets


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10: 50k/10k colour 32x32 images, 10 classes; train augmentation = random crop (pad 4) + flip.

    Args:
        root: directory holding ``cifar-10-batches-py``.
        download: fetch missing files in ``prepare_data`` (needs internet access).
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.
        val_size: training images held out (unaugmented) for validation.
        augment: random crop with 4-pixel padding and horizontal flip on training images, as in JEM.
        seed: seed of the train/validation split.

    Example::

        dm = CIFAR10DataModule(root="data", batch_size=64, num_workers=4)
        dm.setup("fit")
        x, y = next(iter(dm.val_dataloader()))  # x: [64, 3, 32, 32] in [-1, 1], never augmented
    """

    dataset_cls = datasets.CIFAR10
    dataset_name = "CIFAR10"
    random_crop = True
    horizontal_flip = True


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 50k/10k colour 32x32 images, 100 fine classes; same recipe as :class:`CIFAR10DataModule`.

    Args:
        root: directory holding ``cifar-100-python``.
        download: fetch missing files in ``prepare_data`` (needs internet access).
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.
        val_size: training images held out (unaugmented) for validation.
        augment: random crop with 4-pixel padding and horizontal flip on training images.
        seed: seed of the train/validation split.

    Example::

        dm = CIFAR100DataModule(root="data")
        assert dm.num_classes == 100
    """

    dataset_cls = datasets.CIFAR100
    dataset_name = "CIFAR100"
    num_classes = 100


class SVHNDataModule(VisionDataModule):
    """SVHN: 73k/26k colour 32x32 house-number digits, labels 0..9; random crop, no flip (digits are chiral).

    Uses torchvision's ``split="train"`` and ``split="test"`` (not ``"extra"``); reading the ``.mat`` files
    needs scipy.

    Args:
        root: directory holding ``train_32x32.mat`` and ``test_32x32.mat``.
        download: fetch missing files in ``prepare_data`` (needs internet access).
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.
        val_size: training images held out (unaugmented) for validation.
        augment: random crop with 4-pixel padding on training images (never flipped).
        seed: seed of the train/validation split.

    Example::

        dm = SVHNDataModule(root="data", download=True)  # often used as the OOD set for CIFAR-10
    """

    dataset_cls = datasets.SVHN
    dataset_name = "SVHN"
    random_crop = True
    horizontal_flip = False

    def _make_dataset(self, train: bool, download: bool = False) -> Dataset:
        split = "train" if train else "test"
        return self.dataset_cls(self.root, split=split, transform=None, download=download)
