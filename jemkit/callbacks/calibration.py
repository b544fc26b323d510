"""Calibration of a classifier during validation and test: ECE, MCE, NLL, Brier, accuracy, reliability diagrams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torchmetrics import CatMetric
from typing_extensions import override

from jemkit.batches import unpack_batch
from jemkit.callbacks._logging import log_to_tensorboard, run_dir
from jemkit.checks import check_integer
from jemkit.metrics.calibration import CalibrationMetrics, ReliabilityDiagram
from jemkit.metrics.temperature import fit_temperature
from jemkit.pictures import reliability_diagram, save_figure

__all__ = ["CalibrationMonitor", "batch_logits"]

_PREFIX = {"validate": "val", "test": "test"}


def batch_logits(pl_module: pl.LightningModule, outputs: Any, batch: Any) -> tuple[Tensor, Tensor]:
    """Logits and labels of an evaluation batch: from the step's outputs when it returned them (a JEM does), else
    by calling the module on the batch's inputs."""
    x, y = unpack_batch(batch)
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"].float(), y
    return pl_module(x).float(), y


class CalibrationMonitor(Callback):
    """Measure calibration on every validation (and test) epoch and draw a reliability diagram.

    Logs ``{val,test}/cal/{acc,nll,brier,ece,mce}``; with ``temperature_scaling=True`` also fits a temperature on the
    epoch's logits (LBFGS on NLL, Guo et al. 2017) and logs ``.../cal/temperature`` and ``.../cal/ece_scaled``, the
    ECE after scaling. Metric states are torchmetrics states, so values are reduced over all DDP ranks; the PNG
    (``<log_dir>/calibration/reliability_<stage>_epoch=NNNN.png``) is written by rank zero only.

    Args:
        n_bins: equal-width confidence bins (15, as torchmetrics' ``CalibrationError``).
        temperature_scaling: also fit and report a temperature (keeps every logit of the epoch in memory).
        every_n_epochs: validation epochs between measurements (test always measures).
        save_diagram: write the reliability diagram PNG (and log it to TensorBoard loggers).
        dirname: folder under the log directory.

    Example::

        >>> trainer = pl.Trainer(callbacks=[CalibrationMonitor(temperature_scaling=True)])
    """

    def __init__(
        self,
        n_bins: int = 15,
        temperature_scaling: bool = False,
        every_n_epochs: int = 1,
        save_diagram: bool = True,
        dirname: str = "calibration",
    ) -> None:
        check_integer("every_n_epochs", every_n_epochs)
        check_integer("n_bins", n_bins)
        self.n_bins = n_bins
        self.temperature_scaling = temperature_scaling
        self.every_n_epochs = every_n_epochs
        self.save_diagram = save_diagram
        self.dirname = dirname
        self.metrics = CalibrationMetrics(n_bins)
        self.diagram = ReliabilityDiagram(n_bins, from_logits=True)
        self.logits = CatMetric()
        self.labels = CatMetric()
        self.last: dict[str, Tensor] = {}
        self.last_figure_path = None
        self._num_classes = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(n_bins=self.n_bins, temperature_scaling=self.temperature_scaling)

    def _active(self, trainer: pl.Trainer, stage: str) -> bool:
        if trainer.sanity_checking:
            return False
        return stage == "test" or trainer.current_epoch % self.every_n_epochs == 0

    def _reset(self, device: torch.device) -> None:
        for metric in (self.metrics, self.diagram, self.logits, self.labels):
            metric.to(device)
            metric.reset()

    def _update(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        logits, y = batch_logits(pl_module, outputs, batch)
        self.metrics.update(logits, y)
        self.diagram.update(logits, y)
        if self.temperature_scaling:
            self._num_classes = logits.shape[1]
            self.logits.update(logits)
            self.labels.update(y.float())

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        prefix = f"{_PREFIX[stage]}/cal"
        values = self.metrics.compute()  # collective under DDP: every rank calls it
        bins = self.diagram.compute()
        if self.temperature_scaling:
            logits = self.logits.compute().reshape(-1, self._num_classes)
            labels = self.labels.compute().long()
            temperature = fit_temperature(logits, labels)
            scaled = ReliabilityDiagram(self.n_bins, from_logits=True).to(logits.device)
            scaled.update(logits / temperature, labels)
            values["temperature"] = torch.tensor(temperature)
            values["ece_scaled"] = scaled.compute()["ece"]
        self.last = {k: v.detach().float().cpu() for k, v in values.items()}
        for name, value in self.last.items():
            pl_module.log(f"{prefix}/{name}", value, on_epoch=True)
        if self.save_diagram:
            self._save(trainer, stage, bins, run_dir(trainer))

    @rank_zero_only
    def _save(self, trainer: pl.Trainer, stage: str, bins: dict[str, Tensor], log_dir: Path) -> None:
        figure = reliability_diagram(
            bins["bin_confidence"].cpu(),
            bins["bin_accuracy"].cpu(),
            bins["bin_counts"].cpu(),
            title=f"{stage}, epoch {trainer.current_epoch}",
        )
        log_to_tensorboard(trainer, f"calibration/reliability_{stage}", figure=figure)
        path = log_dir / self.dirname / f"reliability_{stage}_epoch={trainer.current_epoch:04d}.png"
        self.last_figure_path = save_figure(figure, path)

    # ------------------------------------------------------------------ hooks
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(pl_module.device)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(pl_module.device)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active(trainer, "validate") and dataloader_idx == 0:
            self._update(pl_module, outputs, batch)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == 0:
            self._update(pl_module, outputs, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer, "validate"):
            self._finish(trainer, pl_module, "validate")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")
