"""The calibration section of the evaluation: accuracy, NLL, Brier, ECE and MCE, before and after temperature
scaling fitted on the validation split, with reliability diagrams."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from jemkit.batches import unpack_batch
from jemkit.checks import check_integer
from jemkit.evaluate.tables import text_table
from jemkit.metrics.calibration import CalibrationMetrics, ReliabilityDiagram
from jemkit.metrics.temperature import fit_temperature
from jemkit.pictures import reliability_diagram, save_figure

__all__ = ["CalibrationOptions", "calibration_report", "calibration_section", "format_calibration", "predict_logits"]


@dataclass
class CalibrationOptions:
    """What the calibration section measures.

    Args:
        temperature_scaling: fit a temperature on the validation split and report calibration after it too.
        n_bins: equal-width confidence bins of ECE/MCE and the reliability diagram.
    """

    temperature_scaling: bool = True
    n_bins: int = 15

    def check(self) -> None:
        check_integer("n_bins", self.n_bins)


@torch.no_grad()
def predict_logits(
    model: Any, loader: DataLoader, device: Any, desc: str = "logits", progress: bool = False
) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` (float32, CPU) and integer labels ``[N]`` of every batch of ``loader``."""
    logits, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = unpack_batch(batch)  # integer labels, also from 0/1 float labels of a binary head
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels).long()


def calibration_report(logits: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, Any]:
    """Accuracy, NLL, Brier, ECE, MCE and the reliability bins of logits ``[N, C]`` against labels ``[N]``.

    The same metric (:class:`~jemkit.metrics.CalibrationMetrics`) as the JEM's ``val/*`` and ``test/*`` logs and the
    :class:`~jemkit.callbacks.CalibrationMonitor`, so the three agree to the last digit.
    """
    scalars, diagram = CalibrationMetrics(n_bins), ReliabilityDiagram(n_bins, from_logits=True)
    scalars.update(logits, y)
    diagram.update(logits, y)
    values, bins = scalars.compute(), diagram.compute()
    return {
        "accuracy": float(values["acc"]),
        "nll": float(values["nll"]),
        "brier": float(values["brier"]),
        "ece": float(values["ece"]),
        "mce": float(values["mce"]),
        "bins": {
            "confidence": bins["bin_confidence"].tolist(),
            "accuracy": bins["bin_accuracy"].tolist(),
            "count": bins["bin_counts"].tolist(),
        },
    }


def _reliability_figure(calibration: dict[str, Any], title: str) -> Any:
    bins = calibration["bins"]
    return reliability_diagram(bins["confidence"], bins["accuracy"], bins["count"], title=title)


def calibration_section(
    model: nn.Module,
    test_set: Dataset,
    val_set: Dataset | None,
    out: Path,
    options: CalibrationOptions,
    batch_size: int = 128,
    progress: bool = False,
    prefix: str = "",
) -> tuple[dict[str, Any], dict[str, str]]:
    """``({"calibration", "temperature_scaling"?}, figures)`` on the whole test split, and after the temperature
    fitted on ``val_set`` (when given and ``options.temperature_scaling``). ``prefix`` names the figures' files."""
    device = model.device
    logits, y = predict_logits(model, DataLoader(test_set, batch_size=batch_size), device, "test logits", progress)
    section: dict[str, Any] = {"calibration": calibration_report(logits, y, options.n_bins)}
    figure = _reliability_figure(section["calibration"], "Reliability (test)")
    figures = {f"{prefix}reliability": str(save_figure(figure, out / f"{prefix}reliability.png"))}
    if not options.temperature_scaling or val_set is None or len(val_set) == 0:
        return section, figures
    val_loader = DataLoader(val_set, batch_size=batch_size)
    val_logits, val_y = predict_logits(model, val_loader, device, "val logits", progress)
    temperature = fit_temperature(val_logits, val_y)
    scaled = calibration_report(logits / temperature, y, options.n_bins)
    section["temperature_scaling"] = {
        "temperature": temperature,
        **{k: scaled[k] for k in ("nll", "brier", "ece", "mce")},
    }
    figure = _reliability_figure(scaled, f"Reliability (test, T={temperature:.2f})")
    figures[f"{prefix}reliability_scaled"] = str(save_figure(figure, out / f"{prefix}reliability_scaled.png"))
    return section, figures


def format_calibration(report: dict[str, Any]) -> list[str]:
    """The calibration table (raw, then after temperature scaling), as report lines."""
    cal, ts = report["calibration"], report.get("temperature_scaling")
    rows = [["raw", cal["accuracy"], cal["nll"], cal["brier"], cal["ece"], cal["mce"]]]
    if ts:
        rows.append([f"T={ts['temperature']:.3f}", cal["accuracy"], ts["nll"], ts["brier"], ts["ece"], ts["mce"]])
    return ["Calibration", text_table(["", "accuracy", "NLL", "Brier", "ECE", "MCE"], rows), ""]
