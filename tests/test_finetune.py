"""Fine-tuning an already-trained classifier into a JEM: the preset keeps what the classifier knew and adds OOD
detection (measured on digits), and the fine-tuning recipes run from a weights file given on the command line."""

from pathlib import Path

import pytest
import torch
import yaml

from jemkit import JEM, DigitsDataModule
from jemkit.cli import main
from jemkit.data.ood import PixelShuffled, UniformNoise
from jemkit.metrics import CalibrationMetrics, ood_metrics
from jemkit.models import SmallCNN
from jemkit.ood.scores import score_batches
from tests.helpers import FakeCIFAR10DataModule, trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _measure(jem: JEM, dm: DigitsDataModule) -> dict[str, float]:
    jem.eval()
    x, y = dm.test_dataset.tensors
    with torch.no_grad():
        logits = jem(x)
    calibration = CalibrationMetrics()
    calibration.update(logits, y)
    result = {k: float(v) for k, v in calibration.compute().items() if k in ("acc", "ece")}
    loader = torch.utils.data.DataLoader
    scores_in = score_batches(jem, loader(dm.test_dataset, batch_size=256), ["logpx"])["logpx"]
    for name, dataset in (("noise", UniformNoise(len(x), (1, 8, 8))), ("shuffled", PixelShuffled(dm.test_dataset))):
        scores_out = score_batches(jem, loader(dataset, batch_size=256), ["logpx"])["logpx"]
        result[name] = float(ood_metrics(scores_in, scores_out)["auroc"])
    return result


@pytest.mark.slow
@pytest.mark.parametrize("norm", [None, "batch"])
def test_the_finetune_preset_keeps_accuracy_and_adds_ood_detection(tmp_path, norm):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    dm.setup("test")
    classifier = SmallCNN(num_classes=10, in_channels=1, width=16, norm=norm)
    plain = JEM(classifier, weights={"px": 0.0}, data_noise=0.0)
    trainer(tmp_path, max_steps=500, limit_val_batches=0).fit(plain, dm)
    before = _measure(plain, dm)
    jem = JEM(classifier, preset="finetune")
    # a fifth of the pre-training; with BatchNorm two fifths: its accuracy dips over the first ~100 steps (seeds 0-3:
    # 1.5-1.9 points below the plain CNN in three of four at 100 steps, within 0.4 point at 200). The 100-step case
    # passed only by its seed's luck, and failed once 0.3's default buffer changed the pre-training's random stream.
    steps = 200 if norm == "batch" else 100
    trainer(tmp_path, max_steps=steps, limit_val_batches=0).fit(jem, dm)
    after = _measure(jem, dm)
    assert after["acc"] > before["acc"] - 0.015, (before, after)
    # a small budget for CI (full-size figures: benchmarks/RESULTS.md): OOD detection must improve clearly
    assert after["noise"] > max(before["noise"], 0.98), (before, after)
    assert after["shuffled"] > max(before["shuffled"], 0.92), (before, after)
    assert after["ece"] < 0.06, (before, after)


def _weights_file(tmp_path: Path, classifier: torch.nn.Module) -> str:
    path = tmp_path / "weights.pt"
    torch.save(classifier.state_dict(), path)
    return str(path)


def test_the_digits_finetune_recipe_starts_from_the_given_weights(tmp_path):
    pretrained = SmallCNN(num_classes=10, in_channels=1, width=32)
    path = _weights_file(tmp_path, pretrained)
    main(
        [
            "fit",
            "-c",
            str(RECIPES / "digits_finetune.yaml"),
            f"--model.classifier.init_args.path={path}",
            f"--trainer.default_root_dir={tmp_path}/run",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    Path(path).unlink()  # the checkpoint holds the weights: it loads without the original file and without arguments
    jem = JEM.load_from_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert jem.preset == "finetune" and jem.weights["px"] == 0.03
    moved = [
        float((a - b).abs().max()) for a, b in zip(jem.classifier.parameters(), pretrained.parameters(), strict=True)
    ]
    assert 0 < max(moved) < 0.1  # two small steps away from the given weights, not from a fresh initialisation


@pytest.mark.slow
def test_the_resnet18_finetune_recipe_runs_on_fake_cifar(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    path = _weights_file(tmp_path, torchvision.models.resnet18(num_classes=10))
    main(
        [
            "fit",
            "-c",
            str(RECIPES / "finetune_resnet18_cifar10.yaml"),
            f"--model.classifier.init_args.path={path}",
            "--data.class_path=tests.helpers.FakeCIFAR10DataModule",
            f"--data.init_args.root={tmp_path}",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            "--data.init_args.val_size=8",
            "--model.buffer=jemkit.sampling.ReplayBuffer",
            "--model.buffer.init_args.capacity=32",
            "--model.buffer.init_args.init=jemkit.sampling.GaussianInit",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    jem = JEM.load_from_checkpoint(tmp_path / "runs/finetune_resnet18_cifar10/checkpoints/last.ckpt")
    assert jem.preset == "finetune" and jem.chains.sampling_mode == "train"  # BatchNorm: train-mode sampling
    assert FakeCIFAR10DataModule.__name__  # the fake data stood in for CIFAR-10


def test_the_finetune_recipes_name_their_weights_and_cost():
    for name in ("digits_finetune.yaml", "finetune_resnet18_cifar10.yaml"):
        text = (RECIPES / name).read_text()
        config = yaml.safe_load(text)
        assert config["model"]["preset"] == "finetune"
        assert config["model"]["classifier"]["class_path"] == "jemkit.models.with_weights"
        assert "--model.classifier.init_args.path" in text.split("seed_everything")[0]
