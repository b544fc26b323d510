"""The input domain: fitted on data (or declared), the one source of the chains' box, noise sets and pictures."""

from __future__ import annotations

import warnings

import pytest
import torch

from jemkit import JEM, PYLD, InputDomain, ReplayBuffer, SampleGrid
from jemkit.data.ood import make_ood_dataset
from tests.helpers import TinyMLP, loader, trainer


def test_a_fitted_box_is_per_feature_for_rows_and_per_channel_for_images():
    rows = torch.randn(500, 3) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([0.0, 50.0, -3.0])
    domain = InputDomain().fit(rows)
    torch.testing.assert_close(domain.low, rows.min(0).values)
    torch.testing.assert_close(domain.high, rows.max(0).values)
    torch.testing.assert_close(domain.mean, rows.mean(0))
    images = torch.rand(64, 3, 4, 4) * torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1)
    box = InputDomain().fit(images)
    assert box.low.shape == (3, 1, 1)
    torch.testing.assert_close(box.high.flatten(), images.amax(dim=(0, 2, 3)))
    assert InputDomain(per="global").fit(images).low.numel() == 1


def test_unit_coordinates_map_the_box_to_minus_one_one_and_back():
    rows = torch.rand(200, 4) * torch.tensor([2.0, 20.0, 0.5, 8.0]) - 3.0
    domain = InputDomain().fit(rows)
    u = domain.to_unit(rows)
    assert float(u.min()) == pytest.approx(-1.0, abs=1e-5) and float(u.max()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(domain.from_unit(u), rows)
    noise = domain.uniform(1000, (4,), torch.Generator().manual_seed(0))
    assert bool((noise >= domain.low - 1e-5).all() and (noise <= domain.high + 1e-5).all())
    spread = noise.std(0) / rows.std(0)
    assert bool((spread > 0.5).all() and (spread < 2.0).all())  # uniform over each feature's own range


def test_an_unfitted_domain_is_the_unit_box_so_older_checkpoints_sample_as_before():
    domain = InputDomain()
    x = torch.randn(5, 2)
    torch.testing.assert_close(domain.to_unit(x), x)
    assert domain.bounds() == (-1.0, 1.0)


def test_bad_domains_are_refused():
    with pytest.raises(ValueError, match="declare both low and high"):
        InputDomain(low=0.0)
    with pytest.raises(ValueError, match="low < high"):
        InputDomain(low=1.0, high=1.0)
    with pytest.raises(ValueError, match="per must be"):
        InputDomain(per="pixel")
    with pytest.raises(ValueError, match="NaN or inf"):
        InputDomain().fit(torch.tensor([[float("nan")], [1.0]]))


def test_the_domain_travels_in_the_state_dict_and_missing_keys_leave_it_unfitted():
    domain = InputDomain().fit(torch.rand(50, 3) * 7)
    fresh = InputDomain()
    fresh.load_state_dict(domain.state_dict())
    torch.testing.assert_close(fresh.high, domain.high)
    old = InputDomain()
    old.load_state_dict({})  # a checkpoint written before the domain existed
    assert not old.is_fitted


def test_chains_on_standardised_rows_stay_in_the_data_box_and_spread_over_it(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 3) * torch.tensor([1.0, 4.0, 0.2]) + torch.tensor([5.0, -20.0, 0.0])
    y = (x[:, 0] > 5.0).long() + (x[:, 1] > -20).long()
    jem = JEM(TinyMLP(in_features=3), buffer=ReplayBuffer(capacity=128), sampler=PYLD(n_steps=5))
    trainer(tmp_path, max_steps=20).fit(jem, loader(x, y, 32, shuffle=True))
    samples = jem.sample(128)
    low, high = jem.domain.low, jem.domain.high
    assert bool((samples >= low - 1e-4).all() and (samples <= high + 1e-4).all())
    assert float(samples[:, 1].std()) > 1.0  # the wide feature's chains move on its own scale
    restored = JEM(TinyMLP(in_features=3), buffer=ReplayBuffer(capacity=128))
    restored.load_state_dict(jem.state_dict())  # what a checkpoint carries
    torch.testing.assert_close(restored.domain.high, jem.domain.high)


def test_noise_ood_sets_follow_the_domain():
    rows = torch.rand(300, 2) * torch.tensor([100.0, 1.0]) + torch.tensor([1000.0, 0.0])
    reference = torch.utils.data.TensorDataset(rows, torch.zeros(300, dtype=torch.long))
    domain = InputDomain().fit(rows)
    noise = torch.stack([make_ood_dataset("uniform", reference, 200, domain=domain)[i][0] for i in range(200)])
    assert float(noise[:, 0].min()) >= 1000 - 1e-3 and float(noise[:, 0].max()) <= 1100 + 1e-3
    assert float(noise[:, 0].std()) > 20  # spread over the box, not over [-1, 1]
    plain = torch.stack([make_ood_dataset("uniform", reference, 50)[i][0] for i in range(50)])
    assert float(plain.abs().max()) <= 1.0  # without a domain: jemkit's old [-1, 1] convention


@pytest.mark.parametrize(("shape", "kind"), [((1, 40), "signal"), ((30,), "tabular")])
def test_sample_pictures_for_signals_and_tabular_rows(tmp_path, shape, kind):
    x = torch.randn(96, *shape) * 3
    y = torch.arange(96) % 3
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 3))
    grid = SampleGrid(num_samples=8, per_class=2)
    jem = JEM(model, buffer=ReplayBuffer(capacity=32))
    trainer(tmp_path, max_steps=2, callbacks=[grid]).fit(jem, loader(x, y, 32))
    assert set(grid.last_paths) == {"buffer", "class"} and all(p.stat().st_size > 0 for p in grid.last_paths.values())


def test_sample_pictures_say_once_why_a_shape_gets_none(tmp_path):
    x, y = torch.randn(64, 2, 3, 4, 5), torch.arange(64) % 2  # 4-D inputs: no picture fits
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(120, 2))
    grid = SampleGrid(num_samples=4, per_class=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=2, callbacks=[grid]).fit(
            JEM(model, buffer=ReplayBuffer(capacity=16)), loader(x, y, 32)
        )
    said = [w for w in caught if "no sample pictures for inputs shaped (2, 3, 4, 5)" in str(w.message)]
    assert len(said) == 1 and grid.last_paths == {}
