"""CIFAR10CDataModule on a tiny fake CIFAR-10-C folder written by the test (4 images per severity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jemkit.data import CIFAR10CDataModule
from jemkit.evaluate.shift import shift_report
from tests.helpers import TinyMLP

PER_SEVERITY = 4


def _write_fake(root, corruptions=("gaussian_noise", "contrast")):
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(PER_SEVERITY) % 10, 5).astype(np.int64)
    np.save(root / "labels.npy", labels)
    arrays = {}
    for name in corruptions:
        images = rng.integers(0, 256, size=(5 * PER_SEVERITY, 32, 32, 3), dtype=np.uint8)
        np.save(root / f"{name}.npy", images)
        arrays[name] = images
    return labels, arrays


def test_items_are_the_files_rows_scaled_to_symmetric_range(tmp_path):
    labels, arrays = _write_fake(tmp_path)
    dm = CIFAR10CDataModule(tmp_path, corruptions=["gaussian_noise", "contrast"], severities=[2, 5], batch_size=3)
    dm.setup("test")
    sets = dm.corrupted_sets()
    assert sorted(sets) == ["contrast", "gaussian_noise"] and sorted(sets["contrast"]) == [2, 5]
    x, y = sets["contrast"][5][1]
    row = 4 * PER_SEVERITY + 1  # severity 5 is the last block of rows
    expected = torch.from_numpy(arrays["contrast"][row].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert x.shape == (3, 32, 32) and torch.equal(x, expected) and int(y) == labels[row]
    assert len(dm.test_dataset) == 2 * 2 * PER_SEVERITY
    batches = list(dm.test_dataloader())
    assert sum(len(b[1]) for b in batches) == 16 and batches[0][0].dtype == torch.float32
    assert float(batches[0][0].min()) >= -1 and float(batches[0][0].max()) <= 1


def test_missing_file_is_named_with_where_to_get_it(tmp_path):
    _write_fake(tmp_path, corruptions=("gaussian_noise",))
    dm = CIFAR10CDataModule(tmp_path, corruptions=["gaussian_noise", "fog"])
    with pytest.raises(FileNotFoundError, match=r"fog\.npy.*zenodo"):
        dm.setup("test")
    with pytest.raises(FileNotFoundError, match=r"labels\.npy"):
        CIFAR10CDataModule(tmp_path / "nowhere").setup("test")


def test_bad_arguments_and_shapes(tmp_path):
    with pytest.raises(ValueError, match="unknown CIFAR-10-C corruption"):
        CIFAR10CDataModule(tmp_path, corruptions=["rain"])
    with pytest.raises(ValueError, match="severities"):
        CIFAR10CDataModule(tmp_path, severities=[0])
    _write_fake(tmp_path)
    np.save(tmp_path / "contrast.npy", np.zeros((7, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"contrast\.npy.*\[20, 32, 32, 3\]"):
        CIFAR10CDataModule(tmp_path, corruptions=["contrast"]).setup()


def test_shift_report_measures_the_ready_made_sets(tmp_path):
    _write_fake(tmp_path)
    dm = CIFAR10CDataModule(tmp_path, corruptions=["gaussian_noise", "contrast"], severities=[1, 3])
    sets = dm.corrupted_sets()
    model = TinyMLP(in_features=3 * 32 * 32, num_classes=10)
    report = shift_report(model, sets["contrast"][1], corrupted=sets, severities=[1, 3], n_bins=5)
    assert report["shifts"] == ["gaussian_noise", "contrast"] and report["severities"] == [1, 3]
    assert set(report["results"]["contrast"]) == {"1", "3"}
    with torch.no_grad():
        x = torch.stack([sets["gaussian_noise"][3][i][0] for i in range(PER_SEVERITY)])
        y = torch.stack([sets["gaussian_noise"][3][i][1] for i in range(PER_SEVERITY)])
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert report["results"]["gaussian_noise"]["3"]["accuracy"] == pytest.approx(accuracy)
