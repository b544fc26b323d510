"""Tests of DigitsDataModule's ``normalization``: ``"symmetric"`` is the historical [-1, 1] scaling bit for bit,
``"unit"`` is [0, 1], ``"standard"`` uses the training split's pixel mean and standard deviation only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jemkit.data import DigitsDataModule
from jemkit.data.digits import RandomShiftDataset


def _built(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def _splits(dm: DigitsDataModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [ds.tensors for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]


@pytest.fixture(scope="module")
def unit() -> DigitsDataModule:
    return _built(normalization="unit")


def test_symmetric_is_the_default_and_unchanged_bit_for_bit(unit):
    default, symmetric = _built(), _built(normalization="symmetric")
    assert default.normalization == "symmetric" and default.data_range == (-1.0, 1.0)
    for (xd, yd), (xs, ys), (xu, yu) in zip(_splits(default), _splits(symmetric), _splits(unit), strict=True):
        assert torch.equal(xd, xs) and torch.equal(yd, ys) and torch.equal(yd, yu)  # same split for every scaling
        raw = xu * 16.0  # the ink levels 0..16, exactly (division by 16 is exact in float32)
        assert torch.equal(raw, raw.round())
        assert torch.equal(xd, raw / 8.0 - 1.0)  # the historical formula


def test_unit_is_zero_one(unit):
    x = torch.cat([x for x, _ in _splits(unit)])
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert unit.data_range == (0.0, 1.0) and unit.pixel_mean is None


def test_standard_uses_the_training_split_statistics_only(unit):
    dm = DigitsDataModule(normalization="standard")
    assert dm.data_range is None  # unknown until the training split is seen
    dm.setup("fit")
    unit_train = unit.train_dataset.tensors[0].double()
    mean, std = unit_train.mean().item(), unit_train.std(correction=0).item()
    assert dm.pixel_mean == pytest.approx(mean, rel=1e-9) and dm.pixel_std == pytest.approx(std, rel=1e-9)
    train = dm.train_dataset.tensors[0].double()
    assert abs(train.mean().item()) < 1e-5 and train.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    for (x, _), (xu, _) in zip(_splits(dm)[1:], _splits(unit)[1:], strict=True):
        torch.testing.assert_close(x, ((xu.double() - mean) / std).float())
        assert abs(x.double().mean().item()) > 1e-4  # not re-standardised with its own statistics
    low, high = -mean / std, (1.0 - mean) / std
    assert dm.data_range == pytest.approx((low, high))
    x = torch.cat([x for x, _ in _splits(dm)])
    assert x.min().item() == pytest.approx(low, abs=1e-6) and x.max().item() == pytest.approx(high, abs=1e-6)
    assert -0.9 < low < -0.7 and 1.7 < high < 2.0  # about [-0.81, 1.85]: outside [-1, 1] on top


def test_standard_open_set_uses_the_kept_classes_and_scales_the_held_out_images():
    dm = _built(normalization="standard", classes=[0, 1, 2])
    unit = _built(normalization="unit", classes=[0, 1, 2])
    unit_train = unit.train_dataset.tensors[0].double()
    assert dm.pixel_mean == pytest.approx(unit_train.mean().item(), rel=1e-9)
    held, held_unit = dm.heldout_dataset.tensors[0], unit.heldout_dataset.tensors[0]
    torch.testing.assert_close(held, ((held_unit.double() - dm.pixel_mean) / dm.pixel_std).float())


@pytest.mark.parametrize("normalization", ["unit", "standard"])
def test_shift_augmentation_fills_with_a_blank_pixel(normalization):
    dm = _built(normalization=normalization, shift=1)
    assert isinstance(dm.train_dataset, RandomShiftDataset)
    blank = 0.0 if normalization == "unit" else -dm.pixel_mean / dm.pixel_std
    assert dm.train_dataset.fill == pytest.approx(blank)
    image = dm.train_dataset.tensors[0][5]
    padded = F.pad(image, (1, 1, 1, 1), value=blank)
    candidates = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
    for _ in range(30):
        shifted, _ = dm.train_dataset[5]
        assert any(torch.equal(c, shifted) for c in candidates)


def test_unknown_normalization():
    with pytest.raises(ValueError, match=r"unknown normalization 'imagenet'; expected one of 'symmetric', 'unit', 'st"):
        DigitsDataModule(normalization="imagenet")
