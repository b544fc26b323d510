"""The checkpoints shipped in checkpoints/ load and keep the test metrics their README states."""

import json
from pathlib import Path

import torch

from jemkit import JEM, DigitsDataModule
from jemkit.data import FashionMNISTDataModule
from jemkit.data.idx import find_idx_folder

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


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


def test_a_card_names_the_best_detector_that_is_not_the_jems_own_and_keeps_the_previous_card(tmp_path):
    import sys

    sys.path.insert(0, str(CHECKPOINTS.parent / "benchmarks"))
    import checkpoint_card

    report = {
        "calibration": {"accuracy": 0.9, "nll": 0.3, "ece": 0.05, "brier": 0.1},
        "temperature_scaling": {"temperature": 1.5, "ece": 0.02},
        "ood": {
            "noise": {"logpx": {"auroc": 0.99}, "fused": {"auroc": 0.98}, "knn": {"auroc": 0.7}, "vim": {"auroc": 0.8}}
        },
    }
    ckpt = tmp_path / "m.ckpt"
    torch.save({"epoch": 3, "global_step": 30}, ckpt)
    (tmp_path / "report.json").write_text(json.dumps(report))
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps({"test/acc": 0.5, "previous": {"test/acc": 0.1}}))
    argv = ["--ckpt", str(ckpt), "--report", str(tmp_path / "report.json"), "--card", str(card_path)]
    new = checkpoint_card.main([*argv, "--recipe", "r.yaml", "--settings", "s"])
    assert new["ood_auroc_best_posthoc"] == {"noise": [0.8, "vim"]} and new["ood_auroc_logpx"] == {"noise": 0.99}
    assert (new["test/acc"], new["test/ece_temperature_scaled"], new["global_step"]) == (0.9, 0.02, 30)
    assert json.loads(card_path.read_text())["previous"] == {"test/acc": 0.5}  # one level of history


def test_the_fashion_checkpoint_loads_with_its_compact_buffer_and_meets_its_card():
    """The checkpoint alone (CI has no IDX files): its uint8 chains, samples drawn from them, a card within a point
    of its plain baseline. Where Debian's files are installed, the test accuracy the card records is recomputed."""
    jem = JEM.load_from_checkpoint(CHECKPOINTS / "jem-fashion-mnist.ckpt", map_location="cpu")
    recorded = json.loads((CHECKPOINTS / "jem-fashion-mnist.json").read_text())
    assert jem.buffer.samples.dtype == torch.uint8 and jem.buffer.samples.shape == (10_000, 1, 28, 28)
    assert recorded["test/acc"] >= recorded["baseline"]["test/acc"] - 0.01  # measured 0.880 against 0.887
    assert (CHECKPOINTS / "jem-fashion-mnist.ckpt").stat().st_size < 10 * 2**20
    jem.eval()
    x = jem.sample(64, source="buffer")
    assert x.shape == (64, 1, 28, 28) and torch.isfinite(x).all()
    if find_idx_folder([DEBIAN_FASHION_MNIST]) is None:
        return
    dm = FashionMNISTDataModule()
    dm.setup("test")
    images, labels = dm.test_dataset.tensors
    with torch.no_grad():
        accuracy = (jem(images).argmax(1) == labels).float().mean().item()
    assert abs(accuracy - recorded["test/acc"]) < 1e-6
