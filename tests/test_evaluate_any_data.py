"""`evaluate` on data that is not images: any LightningDataModule, a one-logit binary head, shapes that do not fit."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from jemkit import JEM, ReplayBuffer
from jemkit.data import TabularDataModule
from jemkit.evaluate import OODOptions, SampleOptions, evaluate
from jemkit.models import MLP
from tests.helpers import trainer


class LoadersOnly(pl.LightningDataModule):
    """A datamodule as many users write one: loaders, no ``*_dataset`` attributes."""

    def __init__(self, data: TabularDataModule) -> None:
        super().__init__()
        data.setup("fit")
        self.data = data

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.data.test_dataset.tensors), batch_size=32)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.data.val_dataset.tensors), batch_size=32)


@pytest.fixture(scope="module")
def binary_jem(tmp_path_factory):
    torch.manual_seed(0)
    data = TabularDataModule(dataset="breast_cancer", label_dtype="float", batch_size=64)
    jem = JEM(MLP(30, 1), buffer=ReplayBuffer(capacity=256))
    trainer(tmp_path_factory.mktemp("fit"), max_steps=600).fit(jem, data)
    return jem, data


def test_a_binary_head_is_evaluated_from_a_datamodule_with_loaders_only(binary_jem, tmp_path):
    jem, data = binary_jem
    report = evaluate(
        jem,
        LoadersOnly(data),
        tmp_path,
        ood=OODOptions(sets=["uniform", "shuffled"]),
        robustness=False,
        samples=SampleOptions(per_class=2),
        progress=False,
    )
    assert report["num_test"] == len(data.test_dataset)
    assert report["calibration"]["accuracy"] > 0.9  # measured 0.97 after 600 steps
    assert 0 < report["temperature_scaling"]["temperature"] < 10  # fitted on the validation loader
    assert report["ood"]["uniform"]["logpx"]["auroc"] > 0.9  # noise over the standardised features' own box (0.95)
    assert any(name.startswith("samples_") for name in report["figures"])  # histograms of rows against data


def test_data_of_another_shape_than_the_model_is_named(binary_jem, tmp_path):
    jem, _ = binary_jem
    wine = TabularDataModule(dataset="wine")
    with pytest.raises(ValueError, match=r"inputs of shape \(13,\) but the checkpoint's model takes \(30,\)"):
        evaluate(jem, wine, tmp_path, robustness=False, progress=False)
