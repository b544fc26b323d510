"""Tests of jemkit.data.SignalsDataModule: shapes, raw (not [-1, 1]) amplitudes, the seeded stratified split, distinct
and learnable classes, and its error messages."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import RandomSampler

from jemkit.data import SignalsDataModule


@pytest.fixture(scope="module")
def signals() -> SignalsDataModule:
    dm = SignalsDataModule()
    dm.setup("fit")
    return dm


def _splits(dm: SignalsDataModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [ds.tensors for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]


def nearest_template(templates: torch.Tensor, x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Class of the template that correlates best with each signal ``x [N, 1, L]``, over integer shifts up to
    ``max_shift`` samples (correlation ignores the offset and a positive scale) -> ``[N]``."""
    bank = torch.stack([templates.roll(s, dims=1) for s in range(-max_shift, max_shift + 1)], 1)  # [K, shifts, L]
    bank = bank - bank.mean(-1, keepdim=True)
    bank = bank / bank.norm(dim=-1, keepdim=True)
    centred = x[:, 0] - x[:, 0].mean(-1, keepdim=True)
    return torch.einsum("nl,ksl->nks", centred, bank).amax(-1).argmax(-1)


def test_attributes_shapes_and_dtypes(signals):
    assert signals.num_classes == 10 and signals.input_shape == (1, 40) and signals.data_range is None
    assert signals.templates.shape == (10, 40) and signals.templates.dtype == torch.float32
    torch.testing.assert_close(signals.templates.abs().amax(1), torch.full((10,), 2.0))
    for x, y in _splits(signals):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 40) and y.shape == x.shape[:1]
    x, y = next(iter(signals.train_dataloader()))
    assert x.shape == (64, 1, 40) and y.shape == (64,)
    assert isinstance(signals.train_dataloader().sampler, RandomSampler)


def test_split_sizes_balance_and_stratification(signals):
    sizes = [len(y) for _, y in _splits(signals)]
    assert sum(sizes) == 3000 and abs(sizes[1] - 450) <= 1 and abs(sizes[2] - 450) <= 1
    all_labels = torch.cat([y for _, y in _splits(signals)])
    assert torch.bincount(all_labels).tolist() == [300] * 10
    for (_, y), size in zip(_splits(signals), sizes, strict=True):
        assert (torch.bincount(y, minlength=10) - size / 10).abs().max() <= 1


def test_amplitudes_are_raw_not_in_minus_one_one(signals):
    x = torch.cat([x for x, _ in _splits(signals)])
    assert x.abs().max() > 4.0  # deliberately outside [-1, 1]
    assert x.abs().max() < 8.0
    assert (x.abs() > 1).float().mean() > 0.1  # not a few outliers: a good share of all values


def test_same_seed_same_data_other_seed_other_draw_same_task(signals):
    same = SignalsDataModule(seed=0)
    same.setup("test")
    for (xa, ya), (xb, yb) in zip(_splits(signals), _splits(same), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = SignalsDataModule(seed=1)
    other.setup("test")
    assert not torch.equal(signals.test_dataset.tensors[0], other.test_dataset.tensors[0])
    assert torch.equal(signals.templates, other.templates)  # the seed redraws examples, not the classes
    assert not torch.equal(signals.templates, SignalsDataModule(template_seed=1).templates)


def test_templates_are_distinct_at_every_shift(signals):
    t = signals.templates - signals.templates.mean(1, keepdim=True)
    t = t / t.norm(dim=1, keepdim=True)
    for shift in range(-39, 40):
        similarity = t @ t.roll(shift, dims=1).T  # [K, K]: template i against template j shifted
        assert (
            similarity[~torch.eye(10, dtype=torch.bool)].max() < 0.85
        )  # 0.8 at most for exact (sub-sample) shifts; rolling wraps a little around


def test_classes_differ_nearest_template_accuracy(signals):
    # Clean (noise-free) shifted, scaled and offset templates are classified perfectly by their nearest template...
    x, y = signals.sample(500, torch.Generator().manual_seed(1), noise_std=0.0)
    assert (nearest_template(signals.templates, x, max_shift=6) == y).float().mean() == 1.0
    # ... and so are nearly all the noisy test signals, but only if the search covers the shifts.
    x, y = signals.test_dataset.tensors
    assert (nearest_template(signals.templates, x, max_shift=6) == y).float().mean() > 0.95
    assert (nearest_template(signals.templates, x, max_shift=0) == y).float().mean() < 0.5


def test_examples_are_scaled_offset_templates():
    dm = SignalsDataModule(max_shift=0.0, noise_std=0.0)
    x, y = dm.sample(200, torch.Generator().manual_seed(0))
    template = dm.templates[y].double()
    design = torch.stack([template, torch.ones_like(template)], -1)  # x = a * template + b
    fit = torch.linalg.lstsq(design, x[:, 0].double().unsqueeze(-1)).solution[..., 0]
    scale, offset = fit.unbind(-1)
    torch.testing.assert_close(design @ fit.unsqueeze(-1), x.double().transpose(1, 2), atol=1e-5, rtol=0)
    assert scale.min() >= 0.5 - 1e-4 and scale.max() <= 2.0 + 1e-4 and scale.max() > 1.7 and scale.min() < 0.6
    assert offset.abs().max() <= 1.0 + 1e-4 and offset.abs().max() > 0.9


def test_noise_has_the_requested_standard_deviation():
    dm = SignalsDataModule(noise_std=0.5)
    generator = torch.Generator().manual_seed(3)
    noisy, y = dm.sample(2000, generator)
    clean, y_clean = dm.sample(2000, torch.Generator().manual_seed(3), noise_std=0.0)
    assert torch.equal(y, y_clean)
    assert (noisy - clean).std().item() == pytest.approx(0.5, rel=0.03)


def test_other_sizes():
    dm = SignalsDataModule(num_classes=4, length=64, num_samples=400, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert dm.templates.shape == (4, 64) and dm.input_shape == (1, 64)
    assert [len(ds) for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)] == [240, 80, 80]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, r"num_classes must be an integer >= 2, got 1"),
        ({"length": 4}, r"length must be an integer >= 8, got 4"),
        ({"num_samples": 2.5}, r"num_samples must be an integer >= 1, got 2.5"),
        ({"noise_std": -0.1}, r"noise_std must be a finite number >= 0, got -0.1"),
        ({"max_shift": 0.5}, r"max_shift must be a fraction of the length in \[0, 0.5\), got 0.5"),
        ({"num_samples": 50}, r"num_samples=50 is too small for a stratified split .* at least num_classes=10"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"test_fraction": 0.0}, r"test_fraction must be in the open interval \(0, 1\), got 0.0"),
        ({"num_classes": 100, "length": 8}, r"could not draw 100 distinct templates of length 8 \(found \d+\)"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SignalsDataModule(**kwargs)
