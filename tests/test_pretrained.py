"""Weights of an already-trained classifier load from a state_dict file or a checkpoint, or are refused by name."""

import pytest
import torch

from jemkit import JEM
from jemkit.models import SmallCNN, with_weights
from tests.helpers import loader, trainer


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_plain_state_dict_file_loads(tmp_path):
    trained = SmallCNN(num_classes=10, in_channels=1, width=8)
    torch.save(trained.state_dict(), tmp_path / "cnn.pt")
    loaded = with_weights(SmallCNN(num_classes=10, in_channels=1, width=8), str(tmp_path / "cnn.pt"))
    assert _same_weights(loaded, trained)


def test_the_classifier_inside_a_jem_checkpoint_loads(tmp_path):
    jem = JEM(SmallCNN(num_classes=3, in_channels=1, width=8), weights={"px": 0.0})
    x, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 3
    fit = trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    fit.fit(jem, loader(x, y))
    fit.save_checkpoint(tmp_path / "jem.ckpt")
    loaded = with_weights(SmallCNN(num_classes=3, in_channels=1, width=8), str(tmp_path / "jem.ckpt"))
    assert _same_weights(loaded, jem.classifier)


def test_weights_that_do_not_fit_are_refused_by_name(tmp_path):
    torch.save(SmallCNN(num_classes=10, in_channels=1, width=8).state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(ValueError, match=r"(?s)do not fit SmallCNN: .*size mismatch for head.weight"):
        with_weights(SmallCNN(num_classes=5, in_channels=1, width=8), str(tmp_path / "cnn.pt"))
    with pytest.raises(ValueError, match=r"missing \[.*running_mean.*, unexpected \[.features.0.0.bias"):
        with_weights(SmallCNN(num_classes=10, in_channels=1, width=8, norm="batch"), str(tmp_path / "cnn.pt"))
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        with_weights(SmallCNN(), str(tmp_path / "missing.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"cannot read weights from .*broken\.pt"):
        with_weights(SmallCNN(), str(tmp_path / "broken.pt"))
