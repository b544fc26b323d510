import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import TensorDataset

from jemkit import JEM, SGLD, DigitsDataModule, GaussianMixtureDataModule, ReplayBuffer
from jemkit.callbacks import CalibrationMonitor, OODMonitor, SampleGrid
from jemkit.metrics import CalibrationMetrics, fit_temperature
from jemkit.models import SmallCNN
from jemkit.ood import OODOptions
from tests.helpers import TinyMLP


def fit(tmp_path, jem, datamodule, callbacks, **kwargs):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **({"max_epochs": 1, "limit_train_batches": 2} | kwargs),
    )
    trainer.fit(jem, datamodule)
    return trainer


def small_digits_jem():
    return JEM(SmallCNN(width=8), sampler=SGLD(n_steps=2), buffer=ReplayBuffer(capacity=64))


def test_callbacks_write_files_and_log_metrics_during_fit(tmp_path):
    calibration = CalibrationMonitor(temperature_scaling=True)
    ood = OODMonitor(OODOptions(sets=["uniform", "interp"]), max_samples=64)
    samples = SampleGrid(per_class=2, num_samples=16, fresh_steps=3)
    trainer = fit(tmp_path, small_digits_jem(), DigitsDataModule(batch_size=32), [calibration, ood, samples])
    log_dir = tmp_path / "logs" / "version_0"
    assert (log_dir / "calibration" / "reliability_validate_epoch=0000.png").stat().st_size > 0
    for score in ("logpx", "msp", "max_logit", "grad_norm", "rmd", "vim", "fused"):
        assert (log_dir / "ood" / f"{score}_epoch=0000.png").stat().st_size > 0
    assert (log_dir / "samples" / "buffer_epoch=0000.png").exists()
    assert (log_dir / "samples" / "class_final.png").exists()
    metrics = trainer.callback_metrics
    for key in (
        "val/cal/ece",
        "val/cal/mce",
        "val/cal/brier",
        "val/cal/nll",
        "val/cal/acc",
        "val/cal/temperature",
        "val/cal/ece_scaled",
        "val/ood/uniform/logpx/auroc",
        "val/ood/interp/grad_norm/fpr95",
        "val/ood/uniform/mahalanobis/auroc",
        "val/ood/interp/knn/aupr_in",
        "val/ood/uniform/fused/auroc",
    ):
        assert key in metrics, key
    # the callback and the module's own metrics are one calibration path: they agree to the last digit
    for key in ("acc", "nll", "ece", "brier", "mce"):
        torch.testing.assert_close(metrics[f"val/cal/{key}"], metrics[f"val/{key}"])
    # the temperature is the one fitted to the validation logits
    jem = trainer.lightning_module
    with torch.no_grad():
        batches = [(jem(x), y) for x, y in trainer.datamodule.val_dataloader()]
    logits, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert float(calibration.last["temperature"]) == pytest.approx(fit_temperature(logits, labels), rel=1e-4)
    assert set(ood.last) == {"uniform", "interp"}
    for name in ("uniform", "interp"):
        for score, values in ood.last[name].items():
            assert metrics[f"val/ood/{name}/{score}/auroc"] == pytest.approx(values["auroc"])


def test_calibration_runs_on_test_and_for_plain_lightning_modules(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyMLP(num_classes=8)

        def forward(self, x):
            return self.net(x)

        def test_step(self, batch, batch_idx):  # returns nothing: the callback computes logits itself
            pass

    monitor = CalibrationMonitor(n_bins=10, save_diagram=False)
    dm = GaussianMixtureDataModule()
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[monitor], default_root_dir=tmp_path)
    trainer.test(Plain(), dm, verbose=False)
    assert {"test/cal/ece", "test/cal/acc"} <= set(trainer.callback_metrics)
    dm.setup("test")
    x, y = dm.test_dataset.tensors
    expected = CalibrationMetrics(n_bins=10)
    expected.update(trainer.lightning_module(x).detach(), y)
    torch.testing.assert_close(monitor.last["ece"], expected.compute()["ece"], rtol=1e-5, atol=1e-6)


def test_sample_grid_draws_energy_landscape_for_2d_data(tmp_path):
    jem = JEM(TinyMLP(num_classes=8), sampler=SGLD(n_steps=2, step_size=0.01), buffer=ReplayBuffer(capacity=64))
    samples = SampleGrid(num_samples=32)
    fit(tmp_path, jem, GaussianMixtureDataModule(), [samples], limit_val_batches=0)
    assert samples.last_paths["landscape"].name == "landscape_final.png"
    assert samples.last_paths["landscape"].stat().st_size > 0


def test_ood_monitor_rejects_bad_sets(tmp_path):
    wrong_shape = TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4))
    with pytest.raises(ValueError, match=r"has inputs of shape \(3, 8, 8\) but the model expects \(1, 8, 8\)"):
        monitor = OODMonitor(OODOptions(sets=[]), extra_sets={"rgb": wrong_shape})
        fit(tmp_path, small_digits_jem(), DigitsDataModule(), [monitor])
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0))
    with pytest.raises(ValueError, match="empty"):
        monitor = OODMonitor(OODOptions(sets=[]), extra_sets={"none": empty})
        fit(tmp_path, small_digits_jem(), DigitsDataModule(), [monitor])
    with pytest.raises(ValueError, match="at least one OOD set"):
        OODMonitor(OODOptions(sets=[], datamodule_sets=False))
    with pytest.raises(ValueError, match="unknown OOD score"):
        OODMonitor(OODOptions(scores=["entropy"]))
    with pytest.raises(ValueError, match="max_samples must be an integer >= 1"):
        OODMonitor(max_samples=0)


class RecordingExperiment:
    def __init__(self):
        self.calls = []

    def add_figure(self, tag, figure, step, close):
        self.calls.append(("figure", tag, step, close))

    def add_image(self, tag, image, global_step):
        self.calls.append(("image", tag, global_step, tuple(image.shape)))


def test_pictures_go_to_every_tensorboard_logger_and_no_other(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from jemkit.callbacks._logging import log_to_tensorboard

    experiment = RecordingExperiment()

    class RecordingTensorBoard(TensorBoardLogger):
        @property
        def experiment(self):
            return experiment

    trainer = SimpleNamespace(loggers=[CSVLogger(tmp_path), RecordingTensorBoard(tmp_path)], global_step=7)
    log_to_tensorboard(trainer, "ood/logpx", figure=object())
    log_to_tensorboard(trainer, "samples/buffer", image=torch.zeros(3, 4, 4))
    assert experiment.calls == [("figure", "ood/logpx", 7, False), ("image", "samples/buffer", 7, (3, 4, 4))]
