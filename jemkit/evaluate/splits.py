"""The splits of any LightningDataModule as datasets, and capped loaders over them, for the evaluation."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from jemkit.batches import unpack_batch

__all__ = ["capped_loader", "split_dataset"]


def split_dataset(datamodule: Any, stage: str) -> Dataset | None:
    """The test (``stage="test"``), validation (``"validate"``) or training (``"fit"``) split: the datamodule's
    ``test_dataset`` / ``val_dataset`` / ``train_dataset`` if it has one, else what its ``test_dataloader()`` /
    ``val_dataloader()`` / ``train_dataloader()`` yields, gathered; ``None`` when it has neither."""
    datamodule.setup(stage)
    name = {"test": "test", "validate": "val", "fit": "train"}[stage]
    dataset = getattr(datamodule, f"{name}_dataset", None)
    if dataset is not None:
        return dataset
    try:
        loader = getattr(datamodule, f"{name}_dataloader")()
    except (AttributeError, NotImplementedError, TypeError, MisconfigurationException):  # hooks left undefined
        return None
    xs, ys = [], []
    for batch in loader:
        x, y = unpack_batch(batch)
        xs.append(x)
        ys.append(y)
    return TensorDataset(torch.cat(xs), torch.cat(ys)) if xs else None


def capped_loader(dataset: Dataset, batch_size: int, max_samples: int | None = None) -> DataLoader:
    """The first ``max_samples`` examples of ``dataset`` in order (``None``: all)."""
    if max_samples is not None and len(dataset) > max_samples:
        dataset = Subset(dataset, range(max_samples))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
