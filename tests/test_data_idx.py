"""IDX files where they lie (jemkit.data.idx and the MNIST-style modules): gzipped or not, Debian's flat folder or
torchvision's layout, found by default; missing files named with the layout, the package and download=True, before
anything is written. Tiny fixtures written here: CI never needs the Debian package."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from jemkit.data import FashionMNISTDataModule, MNISTDataModule
from jemkit.data.idx import IDX_SPLITS, find_idx_folder, read_idx, read_idx_split
from jemkit.data.ood import mnist_style_digits


def idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array in the IDX format (big-endian sizes after the type code 0x08)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_set(folder: Path, gzipped: bool, n_train: int = 40, n_test: int = 20) -> Path:
    """The four files of an MNIST-style set: image ``i`` is the constant ``i`` (its index), label ``i % 10``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = np.arange(n, dtype=np.uint8)[:, None, None].repeat(28, 1).repeat(28, 2)
        for stem, array in zip(IDX_SPLITS[split], (images, np.arange(n) % 10), strict=True):
            data = idx_bytes(array)
            if gzipped:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return folder


def test_read_idx_plain_gzipped_and_by_content_not_name(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(idx_bytes(array))
    (tmp_path / "zipped.gz").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "misnamed").write_bytes(gzip.compress(idx_bytes(array)))  # gzip recognised by its first bytes
    for name in ("plain", "zipped.gz", "misnamed"):
        loaded = read_idx(tmp_path / name)
        assert loaded.dtype == torch.uint8 and torch.equal(loaded, torch.from_numpy(array))
    signed = struct.pack(">BBBB", 0, 0, 0x0C, 1) + struct.pack(">I", 2) + struct.pack(">2i", -5, 7)
    (tmp_path / "ints").write_bytes(signed)
    assert read_idx(tmp_path / "ints").tolist() == [-5, 7]  # big-endian int32


def test_bad_idx_files_are_named(tmp_path):
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match=r"text is not an IDX file"):
        read_idx(tmp_path / "text")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((2, 3), dtype=np.uint8))[:-1])
    with pytest.raises(ValueError, match=r"short holds 5 bytes of data but its header announces shape \(2, 3\)"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_module_reads_debians_flat_folder_and_torchvisions_layout(tmp_path, gzipped):
    flat = write_set(tmp_path / "flat", gzipped)
    layout = write_set(tmp_path / "root" / "FashionMNIST" / "raw", gzipped)
    for root, found in ((flat, flat), (tmp_path / "root", layout)):
        dm = FashionMNISTDataModule(root=str(root), val_size=10, batch_size=8)
        dm.prepare_data()
        assert dm.data_folder() == found
        dm.setup(None)
        assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (30, 10, 20)
        x, y = dm.test_dataset[3]
        assert x.shape == (1, 28, 28) and torch.allclose(x, torch.full_like(x, 3 / 127.5 - 1)) and int(y) == 3
        train_x, _ = next(iter(dm.train_dataloader()))
        assert train_x.dtype == torch.float32 and train_x.min() >= -1 and train_x.max() <= 1


def test_debians_folder_is_found_without_arguments(tmp_path, monkeypatch):
    debian = write_set(tmp_path / "usr-share-datasets", gzipped=True)
    monkeypatch.setattr(FashionMNISTDataModule, "debian_folder", str(debian))
    monkeypatch.chdir(tmp_path)  # no ./data folder: the default root holds nothing
    dm = FashionMNISTDataModule(val_size=5)
    dm.prepare_data()
    assert dm.data_folder() == debian


def test_missing_files_name_the_layout_the_package_and_download_before_anything_is_fetched(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "debian_folder", str(tmp_path / "not-installed"))
    dm = FashionMNISTDataModule(root=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()  # download=False: refused here, before a Trainer writes its first file
    message = str(info.value)
    for part in ("t10k-labels-idx1-ubyte", ".gz", str((tmp_path / "data" / "FashionMNIST" / "raw").resolve())):
        assert part in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message
    with pytest.raises(FileNotFoundError, match="FashionMNIST dataset not found"):
        dm.setup("fit")
    assert not (tmp_path / "data").exists()


def test_download_is_skipped_when_the_files_are_found(tmp_path, monkeypatch):
    write_set(tmp_path, gzipped=True)

    def no_network(*args, **kwargs):
        raise AssertionError("torchvision was asked to download files that are present")

    monkeypatch.setattr(MNISTDataModule, "dataset_cls", no_network)
    MNISTDataModule(root=str(tmp_path), download=True).prepare_data()


def test_an_open_set_keeps_some_classes_and_holds_out_the_others(tmp_path):
    write_set(tmp_path, gzipped=False, n_train=60, n_test=30)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=6, classes=[2, 0, 1, 3, 4, 5])
    assert dm.num_classes == 6
    dm.setup(None)
    _, train_y = dm.train_dataset.tensors
    assert set(train_y.tolist()) == set(range(6)) and len(train_y) + 6 == 36  # 6 of every 10 images kept
    _, test_y = dm.test_dataset.tensors
    assert test_y.tolist()[:3] == [1, 2, 0]  # classes 0, 1, 2 relabelled by their position in `classes`
    sets = dm.ood_datasets()
    held_x, held_y = sets["heldout"].tensors
    assert sorted(set(held_y.tolist())) == [6, 7, 8, 9] and len(held_x) == 12
    assert len(sets["digits"]) == 1797
    with pytest.raises(ValueError, match=r"classes must be 2 to 10 distinct classes in 0\.\.9"):
        FashionMNISTDataModule(root=str(tmp_path), classes=[1, 1])


def test_mnist_style_digits_are_white_on_black_in_a_centred_box():
    digits = mnist_style_digits()
    x, y = digits.tensors
    assert x.shape == (1797, 1, 28, 28) and (y == -1).all()
    assert x.min() == -1.0 and x.max() <= 1.0
    border = torch.cat([x[..., :4, :].flatten(), x[..., -4:, :].flatten(), x[..., :4].flatten(), x[..., -4:].flatten()])
    assert (border == -1.0).all()  # the 20x20 box sits 4 pixels inside a black square
    assert x[..., 4:-4, 4:-4].mean() > x.mean()  # the ink is in the box
    assert mnist_style_digits(32).tensors[0].shape == (1797, 1, 32, 32)


def test_find_idx_folder_takes_the_first_complete_candidate(tmp_path):
    incomplete = tmp_path / "a"
    incomplete.mkdir()
    (incomplete / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((1, 28, 28))))
    complete = write_set(tmp_path / "b", gzipped=True)
    assert find_idx_folder([incomplete, complete]) == complete and find_idx_folder([incomplete]) is None
    images, labels = read_idx_split(complete, "test")
    assert images.shape == (20, 28, 28) and labels.dtype == torch.int64
