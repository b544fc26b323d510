"""The checkpoints shipped in checkpoints/ load and keep the test metrics their README states."""

import json
from pathlib import Path

import torch

from jemkit import JEM, DigitsDataModule

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def test_digits_checkpoint_loads_without_arguments_and_meets_its_accuracy():
    jem = JEM.load_from_checkpoint(CHECKPOINTS / "jem-digits.ckpt", map_location="cpu")
    recorded = json.loads((CHECKPOINTS / "jem-digits.json").read_text())
    dm = DigitsDataModule()
    dm.setup("test")
    x, y = dm.test_dataset.tensors
    jem.eval()
    with torch.no_grad():
        logits = jem(x)
    accuracy = (logits.argmax(1) == y).float().mean().item()
    assert accuracy >= 0.97
    assert abs(accuracy - recorded["test/acc"]) < 1e-6
    # the replay buffer travels with the checkpoint
    assert jem.buffer.samples.shape == (jem.buffer.capacity, 1, 8, 8) and jem.buffer.capacity == 10_000
    assert torch.isfinite(jem.buffer.samples).all()
