"""Tests of jemkit.data: splits, value ranges, loaders and error messages of every data module.

No test downloads anything: the digits ship with scikit-learn, the toy data are drawn on the fly, MNIST is read
from tiny files written here in the real idx format, and the colour datasets are replaced by a fake dataset class.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision.transforms import RandomCrop, RandomHorizontalFlip

from jemkit.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    GaussianMixtureDataModule,
    MNISTDataModule,
    SVHNDataModule,
)
from tests.helpers import FakeColourData

# ----------------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


def _splits(dm) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [ds.tensors for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]


def test_digits_attributes_shapes_dtypes_and_range(digits):
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert digits.data_range == (-1.0, 1.0)
    for x, y in _splits(digits):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and y.shape == x.shape[:1]
    x = torch.cat([x for x, _ in _splits(digits)])
    assert x.min().item() == -1.0 and x.max().item() == 1.0  # raw 0 -> -1 and raw 16 -> 1 exactly


def test_digits_splits_partition_the_dataset_in_the_requested_fractions(digits):
    sizes = [len(y) for _, y in _splits(digits)]
    assert sum(sizes) == 1797
    assert abs(sizes[1] - 0.15 * 1797) <= 1 and abs(sizes[2] - 0.15 * 1797) <= 1
    # Every original image (with its label) appears exactly once across the three splits.
    images, labels = load_digits(return_X_y=True)
    expected = Counter(
        (img.astype(np.float32) / 8 - 1).tobytes() + bytes([lab]) for img, lab in zip(images, labels, strict=True)
    )
    seen = Counter(
        xi.flatten().numpy().tobytes() + bytes([int(yi)])
        for x, y in _splits(digits)
        for xi, yi in zip(x, y, strict=True)
    )
    assert seen == expected


def test_digits_split_is_stratified(digits):
    _, labels = load_digits(return_X_y=True)
    total = np.bincount(labels, minlength=10)
    for (_, y), fraction in zip(_splits(digits), (0.7, 0.15, 0.15), strict=True):
        counts = torch.bincount(y, minlength=10).numpy()
        assert (counts > 0).all()
        assert np.abs(counts - fraction * total).max() <= 1.5


def test_digits_split_is_deterministic_per_seed(digits):
    same = DigitsDataModule(seed=0)
    same.setup("test")
    for (xa, ya), (xb, yb) in zip(_splits(digits), _splits(same), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = DigitsDataModule(seed=1)
    other.setup("test")
    assert not torch.equal(digits.test_dataset.tensors[0], other.test_dataset.tensors[0])


def test_digits_setup_is_idempotent(digits):
    train = digits.train_dataset
    for stage in ("fit", "validate", "test", "predict", None):
        digits.setup(stage)
    assert digits.train_dataset is train


def test_digits_loaders(digits):
    train = digits.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.drop_last
    batches = list(train)
    assert len(batches) == len(digits.train_dataset) // 64
    assert all(x.shape == (64, 1, 8, 8) and y.shape == (64,) for x, y in batches)
    for loader, dataset in (
        (digits.val_dataloader(), digits.val_dataset),
        (digits.test_dataloader(), digits.test_dataset),
        (digits.predict_dataloader(), digits.test_dataset),
    ):
        assert isinstance(loader.sampler, SequentialSampler) and not loader.drop_last
        xs = torch.cat([x for x, _ in loader])
        assert torch.equal(xs, dataset.tensors[0])  # whole split, in order, last partial batch kept


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.0}, r"val_fraction must be in the open interval \(0, 1\), got 0.0"),
        ({"test_fraction": 1.2}, r"test_fraction must be in the open interval \(0, 1\), got 1.2"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"val_fraction \+ test_fraction must be < 1.*got 0.6 \+ 0.5"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be an integer >= 1, got 2.5"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


# -------------------------------------------------------------------------------------------- Gaussian mixture


def test_toy_shapes_attributes_and_splits():
    dm = GaussianMixtureDataModule(num_samples=1000, batch_size=50)
    assert dm.num_classes == 8 and dm.input_shape == (2,) and dm.data_range == (-1.0, 1.0)
    assert dm.means.shape == (8, 2) and dm.std == 0.08
    assert torch.allclose(dm.means.norm(dim=1), torch.full((8,), 0.6))
    dm.setup("fit")
    assert [len(ds) for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)] == [800, 100, 100]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 2) and x.dtype == torch.float32 and y.shape == (50,) and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 16 and len(dm.val_dataloader()) == 2


def test_toy_samples_match_the_true_mixture():
    dm = GaussianMixtureDataModule(num_samples=8000)
    dm.setup()
    x, y = (
        torch.cat(t)
        for t in zip(*(ds.tensors for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)), strict=True)
    )
    assert torch.bincount(y).tolist() == [1000] * 8
    assert x.abs().max() < 1.0  # inside data_range
    for k in range(8):
        xk = x[y == k]
        assert torch.allclose(xk.mean(0), dm.means[k], atol=0.015)  # standard error 0.08 / sqrt(1000) = 0.0025
        assert torch.allclose(xk.std(0), torch.full((2,), dm.std), rtol=0.1)


def test_toy_log_prob_is_the_mixture_density():
    dm = GaussianMixtureDataModule(num_classes=4, radius=0.5, std=0.1)
    components = torch.distributions.Independent(torch.distributions.Normal(dm.means, 0.1), 1)
    mixture = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.ones(4)), components)
    x = torch.rand(64, 2) * 2 - 1
    assert torch.allclose(dm.log_prob(x), mixture.log_prob(x), atol=1e-4)


def test_toy_is_deterministic_per_seed_and_validates_arguments():
    a, b, c = GaussianMixtureDataModule(seed=3), GaussianMixtureDataModule(seed=3), GaussianMixtureDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.train_dataset.tensors[0], b.train_dataset.tensors[0])
    assert not torch.equal(a.train_dataset.tensors[0], c.train_dataset.tensors[0])
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2, got 1"):
        GaussianMixtureDataModule(num_classes=1)
    with pytest.raises(ValueError, match=r"std=0"):
        GaussianMixtureDataModule(std=0)
    with pytest.raises(ValueError, match=r"num_samples=5 is too small"):
        GaussianMixtureDataModule(num_samples=5)


# ------------------------------------------------------------------------------------------ torchvision modules


@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule, SVHNDataModule])
def test_vision_missing_dataset_says_where_and_how_to_download(cls, tmp_path):
    dm = cls(root=str(tmp_path))
    dm.prepare_data()  # download=False: must neither fetch nor fail
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert dm.dataset_name in message and str(tmp_path.resolve()) in message
    assert "download=True" in message and "--data.download true" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(FileNotFoundError, match=re.escape(dm.dataset_name)):
        dm.setup("test")


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format of LeCun's MNIST files (big-endian sizes, type code 0x08)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist_images(n: int) -> np.ndarray:
    """Image ``i`` is the constant ``3 i + 1`` with one black (0) and one white (255) pixel, so it is recognisable."""
    images = (3 * np.arange(n, dtype=np.uint8) + 1)[:, None, None].repeat(28, 1).repeat(28, 2)
    images[:, 0, 0], images[:, 0, 1] = 0, 255
    return images


@pytest.fixture
def mnist_root(tmp_path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", _fake_mnist_images(n))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path


def _image_index(x: torch.Tensor) -> int:
    return round(((x[0, 5, 5].item() + 1) / 2 * 255 - 1) / 3)


def test_mnist_round_trip_from_idx_files(mnist_root):
    dm = MNISTDataModule(root=str(mnist_root), val_size=10, batch_size=8)
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10 and dm.data_range == (-1.0, 1.0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 10

    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 3  # 30 // 8, last partial batch dropped
    x, y = train_batches[0]
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0

    raw = torch.from_numpy(_fake_mnist_images(40)).float() / 255 * 2 - 1
    val_indices = []
    for xs, ys in dm.val_dataloader():
        for xi, yi in zip(xs, ys, strict=True):
            i = _image_index(xi)
            assert torch.allclose(xi[0], raw[i], atol=1e-6)  # exactly the stored image: scaled, not augmented
            assert yi.item() == i % 10
            val_indices.append(i)
    train_indices = [_image_index(xi) for xs, _ in dm.train_dataloader() for xi in xs]
    assert len(set(val_indices)) == 10 and not set(val_indices) & set(train_indices)

    dm.setup("test")
    assert sum(len(x) for x, _ in dm.test_dataloader()) == 12


def test_mnist_split_seed_padding_and_size_check(mnist_root):
    def val_images(**kwargs) -> torch.Tensor:
        dm = MNISTDataModule(root=str(mnist_root), val_size=10, **kwargs)
        dm.setup("validate")
        return torch.cat([x for x, _ in dm.val_dataloader()])

    assert torch.equal(val_images(seed=1), val_images(seed=1))
    assert not torch.equal(val_images(seed=1), val_images(seed=2))

    padded = val_images(pad_to_32=True)
    assert padded.shape == (10, 1, 32, 32)
    assert MNISTDataModule(pad_to_32=True).input_shape == (1, 32, 32)
    assert (padded[..., :2, :] == -1).all() and (padded[..., -2:] == -1).all()  # zero padding = background
    assert torch.equal(padded[..., 2:-2, 2:-2], val_images())

    with pytest.raises(ValueError, match=r"val_size must be smaller than the 40 training images of MNIST, got 40"):
        MNISTDataModule(root=str(mnist_root), val_size=40).setup("fit")
    with pytest.raises(ValueError, match=r"val_size must be an integer >= 0, got -1"):
        MNISTDataModule(val_size=-1)


def test_mnist_style_sets_are_never_augmented():
    for cls in (MNISTDataModule, FashionMNISTDataModule):
        transforms = cls(augment=True).train_transform().transforms
        assert not any(isinstance(t, RandomCrop | RandomHorizontalFlip) for t in transforms)


COLOUR = [(CIFAR10DataModule, 10, True), (CIFAR100DataModule, 100, True), (SVHNDataModule, 10, False)]


@pytest.mark.parametrize(("cls", "num_classes", "flips"), COLOUR)
def test_colour_transforms(cls, num_classes, flips):
    dm = cls()
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == num_classes and dm.data_range == (-1.0, 1.0)
    transforms = dm.train_transform().transforms
    crops = [t for t in transforms if isinstance(t, RandomCrop)]
    assert len(crops) == 1 and crops[0].size == (32, 32) and crops[0].padding == 4
    assert any(isinstance(t, RandomHorizontalFlip) for t in transforms) == flips
    for t in (*cls(augment=False).train_transform().transforms, *dm.eval_transform().transforms):
        assert not isinstance(t, RandomCrop | RandomHorizontalFlip)


@pytest.mark.parametrize(("cls", "num_classes", "flips"), COLOUR)
def test_colour_loaders_augment_train_but_not_val(cls, num_classes, flips, monkeypatch, tmp_path):
    monkeypatch.setattr(cls, "dataset_cls", FakeColourData)
    torch.manual_seed(0)
    dm = cls(root=str(tmp_path), val_size=6, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_dataset) == 18 and len(dm.val_dataset) == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    assert x.min() >= -1.0 and x.max() <= 1.0

    # Training images are augmented: reading the same one repeatedly gives different tensors.
    reads = [dm.train_dataset[0][0] for _ in range(5)]
    assert any(not torch.equal(reads[0], r) for r in reads[1:])

    # Validation images are exactly the scaled, un-augmented images of the underlying training set.
    originals = [dm.eval_transform()(image) for image, _ in FakeColourData(None, transform=None)]
    for xs, _ in dm.val_dataloader():
        for xi in xs:
            assert sum(torch.equal(xi, o) for o in originals) == 1

    dm.setup("test")
    assert sum(len(x) for x, _ in dm.test_dataloader()) == 8


def test_prepare_data_downloads_both_splits_only_when_asked(monkeypatch):
    calls = []

    class Recorder(FakeColourData):
        def __init__(self, root, **kwargs) -> None:
            calls.append(kwargs)
            super().__init__(root, **kwargs)

    monkeypatch.setattr(SVHNDataModule, "dataset_cls", Recorder)
    SVHNDataModule(download=False).prepare_data()
    assert calls == []
    SVHNDataModule(download=True).prepare_data()
    assert sorted((c["split"], c["download"]) for c in calls) == [("test", True), ("train", True)]


def test_other_dataset_errors_are_not_masked(monkeypatch):
    class Broken(FakeColourData):
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("corrupted pickle")

    monkeypatch.setattr(CIFAR10DataModule, "dataset_cls", Broken)
    with pytest.raises(RuntimeError, match="corrupted pickle"):
        CIFAR10DataModule().setup("fit")


def test_digits_shift_augmentation_translates_training_images_only():
    import torch.nn.functional as F

    from jemkit.data.digits import RandomShiftDataset

    dm = DigitsDataModule(shift=1)
    dm.setup("fit")
    assert isinstance(dm.train_dataset, RandomShiftDataset)
    assert not isinstance(dm.val_dataset, RandomShiftDataset)
    image, label = dm.train_dataset.tensors[0][5], dm.train_dataset.tensors[1][5]
    padded = F.pad(image, (1, 1, 1, 1), value=-1.0)
    candidates = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
    seen = set()
    for _ in range(60):
        shifted, got_label = dm.train_dataset[5]
        assert got_label == label and shifted.shape == (1, 8, 8)
        matches = [i for i, c in enumerate(candidates) if torch.equal(c, shifted)]
        assert matches, "output is not a 1-pixel translation of the input"
        seen.add(matches[0])
    assert len(seen) > 3  # the translation is random
    with pytest.raises(ValueError, match="shift must be"):
        DigitsDataModule(shift=5)


def test_digits_open_set_split_keeps_given_classes_and_holds_out_the_rest():
    full, open_set = DigitsDataModule(), DigitsDataModule(classes=[7, 0, 3])
    full.setup("fit")
    open_set.setup("fit")
    assert open_set.num_classes == 3
    _, y_full = full.test_dataset.tensors
    x, y = open_set.test_dataset.tensors
    assert set(y.tolist()) == {0, 1, 2}  # 7 -> 0, 0 -> 1, 3 -> 2
    assert len(y) == int(torch.isin(y_full, torch.tensor([7, 0, 3])).sum())
    kept_images = full.test_dataset.tensors[0][y_full == 7]
    torch.testing.assert_close(x[y == 0], kept_images)
    _, held_y = open_set.heldout_dataset.tensors
    assert set(held_y.tolist()) == set(range(10)) - {7, 0, 3} and len(held_y) + len(y) == len(y_full)
    with pytest.raises(ValueError, match="classes must be 2 to 10 distinct digits"):
        DigitsDataModule(classes=[1, 1])
