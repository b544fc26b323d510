"""The energy-margin term (Liu et al. 2020): its value, where its outliers come from, and that it separates them."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jemkit import JEM, DigitsDataModule, ReplayBuffer
from jemkit.data import WithOutliers
from jemkit.data.ood import UniformNoise
from jemkit.losses import energy_margin_loss
from jemkit.metrics import ood_metrics
from jemkit.ood.scores import score_batches
from tests.helpers import KeepStart, TinyMLP, ZeroInit, trainer


def test_energy_margin_loss_penalises_only_the_wrong_side_of_each_margin():
    e_in, e_out = torch.tensor([-30.0, -20.0]), torch.tensor([-10.0, 0.0])
    # in: relu([-7, 3])^2 = [0, 9] -> 4.5; out: relu([5, -5])^2 = [25, 0] -> 12.5
    torch.testing.assert_close(energy_margin_loss(e_in, e_out), torch.tensor(17.0))
    torch.testing.assert_close(energy_margin_loss(e_in, e_out, margin_in=-40.0, margin_out=-30.0), torch.tensor(250.0))
    with pytest.raises(ValueError, match="margin_in must lie below margin_out"):
        energy_margin_loss(e_in, e_out, margin_in=-5.0, margin_out=-5.0)
    with pytest.raises(ValueError, match=r"expected e_sample of shape \[N\]"):
        energy_margin_loss(e_in, e_out[None])


def _linear_jem(**kwargs) -> tuple[JEM, torch.Tensor]:
    weight = torch.randn(3, 2)
    classifier = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        classifier.weight.copy_(weight)
    buffer = ReplayBuffer(capacity=9, reinit_prob=1.0, init=ZeroInit())
    return JEM(classifier, data_noise=0.0, sampler=KeepStart(), buffer=buffer, **kwargs), weight


def _step(jem: JEM, batch) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer
        return jem.training_step(batch, 0)


def test_the_margin_term_takes_the_replay_buffer_samples_as_outliers_when_the_batch_has_none():
    # Samples at the origin have logits 0, so E(x_q) = -log 3: the margin term has a closed form.
    jem, weight = _linear_jem(weights={"px": 0.0, "margin": 0.5}, margins=(-1.0, 0.5))
    x, y = torch.randn(6, 2) * 3, torch.tensor([0, 1, 2, 2, 1, 0])
    loss = _step(jem, (x, y))
    logits = x @ weight.T
    e_data, e_out = -torch.logsumexp(logits, 1), torch.full((6,), -math.log(3.0))
    margin = torch.relu(e_data + 1.0).square().mean() + torch.relu(0.5 - e_out).square().mean()
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, y) + 0.5 * margin)
    torch.testing.assert_close(jem.step_stats["margin"], margin)
    torch.testing.assert_close(jem.step_stats["energy_outlier"], e_out.mean())
    assert "px" in jem.step_stats  # the samples' statistics are reported, but weight px=0 keeps px out of the loss


def test_outliers_in_the_batch_replace_the_samples_and_must_match_the_data_shape():
    jem, weight = _linear_jem(weights={"margin": 1.0, "px": 0.0}, margins=(-1.0, 0.5))
    x, y, x_out = torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), torch.randn(5, 2)
    loss = _step(jem, {"data": (x, y), "outliers": (x_out, torch.zeros(5))})
    logits, logits_out = x @ weight.T, x_out @ weight.T
    e_data, e_out = -torch.logsumexp(logits, 1), -torch.logsumexp(logits_out, 1)
    margin = torch.relu(e_data + 1.0).square().mean() + torch.relu(0.5 - e_out).square().mean()
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, y) + margin)
    with pytest.raises(ValueError, match=r"outlier inputs have shape \(3,\), the data \(2,\)"):
        _step(jem, {"data": (x, y), "outliers": torch.randn(5, 3)})
    with pytest.raises(KeyError, match="labelled data under 'data'"):
        _step(jem, {"x": x, "outliers": x_out})
    with pytest.raises(ValueError, match="margin_in < margin_out"):
        JEM(nn.Linear(2, 3), margins=(0.0, -1.0))


def test_with_outliers_serves_an_outlier_batch_beside_every_training_batch():
    x, y = torch.randn(40, 2), torch.arange(40) % 3
    data = DigitsDataModule(batch_size=16)
    dm = WithOutliers(data, UniformNoise(7, (1, 8, 8)))
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)  # the labelled datamodule's attributes
    loader = dm.train_dataloader()
    batches = list(iter(loader))
    assert len(batches) == len(data.train_dataloader())  # the data sets the epoch; outliers are drawn with replacement
    (xb, yb), (x_out, label) = batches[0][0]["data"], batches[0][0]["outliers"]
    assert xb.shape == (16, 1, 8, 8) and x_out.shape == (16, 1, 8, 8) and (label == -1).all() and yb.shape == (16,)
    with pytest.raises(ValueError, match="outliers must be a non-empty Dataset"):
        WithOutliers(data, TensorDataset(x[:0], y[:0])).train_dataloader()
    assert isinstance(dm.val_dataloader(), DataLoader)


@pytest.mark.slow
def test_margin_training_on_outliers_makes_log_px_separate_them(tmp_path):
    # px=0: only the cross-entropy and the energy margins train; uniform noise as the known outliers.
    torch.manual_seed(0)
    dm = WithOutliers(DigitsDataModule(batch_size=32), UniformNoise(2000, (1, 8, 8), seed=1))
    jem = JEM(TinyMLP(in_features=64, num_classes=10, hidden=64), weights={"px": 0.0, "margin": 0.1}, margins=(-8, -2))
    trainer(tmp_path, max_steps=200, limit_val_batches=0).fit(jem, dm)
    jem.eval()
    test = DigitsDataModule(batch_size=32)
    test.setup("test")
    unseen_noise = UniformNoise(len(test.test_dataset), (1, 8, 8), seed=2)
    scores_in = score_batches(jem, DataLoader(test.test_dataset, batch_size=128), ["logpx"])["logpx"]
    scores_out = score_batches(jem, DataLoader(unseen_noise, batch_size=128), ["logpx"])["logpx"]
    assert ood_metrics(scores_in, scores_out)["auroc"] > 0.99
    assert scores_in.mean() - scores_out.mean() > 3  # log p(x) = -E(x): the margins ask for a gap of 6
