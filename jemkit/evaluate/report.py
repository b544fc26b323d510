"""One evaluation of a trained JEM: calibration, OOD detection, robustness, samples and their FID/IS, as a report.

``evaluate(jem, datamodule, out_dir)`` is what ``jemkit evaluate`` runs; it is also the Python API. It writes
``report.json`` and PNG figures into ``out_dir`` and returns the report as a dict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from jemkit.data.ood import OOD_SETS, check_ood_dataset, make_ood_dataset
from jemkit.evaluate.generative import format_generative, generative_metrics
from jemkit.evaluate.plots import reliability_diagram, save_figure, score_histogram
from jemkit.evaluate.robustness import robust_accuracy
from jemkit.evaluate.samples import save_sample_grids
from jemkit.metrics.calibration import CalibrationMetrics, ReliabilityDiagram
from jemkit.metrics.ood import ood_metrics
from jemkit.metrics.temperature import fit_temperature
from jemkit.scores import SCORES, score_batches

__all__ = ["DEFAULT_ATTACKS", "calibration_report", "evaluate", "format_report"]

DEFAULT_ATTACKS: tuple[dict[str, Any], ...] = (
    {"kind": "clean"},
    {"kind": "pgd", "norm": "linf", "eps": 0.03, "steps": 10, "restarts": 1},
    {"kind": "pgd", "norm": "linf", "eps": 0.1, "steps": 10, "restarts": 1},
    {"kind": "pgd", "norm": "l2", "eps": 0.5, "steps": 10, "restarts": 1},
    {"kind": "noise", "std": 0.1},
    {"kind": "noise", "std": 0.3},
)
"""Epsilons in the units of jemkit's [-1, 1] inputs (twice the [0, 1] values)."""


def _batches(dataset: Dataset, batch_size: int, max_samples: int | None) -> DataLoader:
    if max_samples is not None and len(dataset) > max_samples:
        dataset = Subset(dataset, range(max_samples))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def _logits_and_labels(jem: Any, loader: DataLoader, desc: str, progress: bool) -> tuple[Tensor, Tensor]:
    logits, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        logits.append(jem(x.to(jem.device)).float().cpu())
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


def evaluate(
    jem: Any,
    datamodule: Any,
    out_dir: str | Path,
    ood: Sequence[str] = OOD_SETS,
    ood_datasets: dict[str, Dataset] | None = None,
    scores: Sequence[str] = SCORES,
    attacks: Sequence[dict[str, Any]] = DEFAULT_ATTACKS,
    defense_steps: int = 0,
    temperature_scaling: bool = True,
    n_bins: int = 15,
    max_samples: int | None = 1000,
    batch_size: int = 128,
    num_sample_images: int = 8,
    generative: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``jem`` on ``datamodule``'s test split; write ``out_dir/report.json`` and figures; return the report.

    Args:
        jem: a :class:`jemkit.JEM` (any module with ``forward -> logits``, ``temperature``, ``sample`` works).
        datamodule: provides ``test_dataset`` (and ``val_dataset`` for temperature scaling) after ``setup``.
        out_dir: folder for ``report.json`` and PNGs (created).
        ood: names of built-in OOD sets (see :data:`jemkit.data.ood.OOD_SETS`).
        ood_datasets: extra OOD sets ``{name: Dataset}`` with the same input shape.
        scores: OOD scores (see :data:`jemkit.scores.SCORES`).
        attacks: robustness settings (see :func:`jemkit.evaluate.robustness.robust_accuracy`).
        defense_steps: if > 0, also report accuracy after this many SGLD refinement steps on ``log p(x)``.
        temperature_scaling: fit a temperature on the validation split and report calibration after it too.
        n_bins: equal-width confidence bins of ECE/MCE and the reliability diagram.
        max_samples: cap on test (and each OOD) set size for OOD and robustness; ``None`` for all.
        batch_size: evaluation batch size.
        num_sample_images: samples per class in the sample grid (0: no samples).
        generative: keyword arguments of :func:`~jemkit.evaluate.generative_metrics` (e.g. ``{"num_samples": 1000,
            "sources": ["buffer", "fresh"]}``) to measure FID/IS of the JEM's samples against the test split;
            ``None`` skips it.
        progress: show progress bars.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jem.eval()
    datamodule.setup("test")
    test_set = getattr(datamodule, "test_dataset", None)
    if test_set is None or len(test_set) == 0:
        raise ValueError(f"{type(datamodule).__name__} has no test data (test_dataset is empty or missing)")
    input_shape = tuple(test_set[0][0].shape)
    report: dict[str, Any] = {"data": type(datamodule).__name__, "num_test": len(test_set), "figures": {}}

    # Calibration on the whole test split.
    logits, y = _logits_and_labels(jem, DataLoader(test_set, batch_size=batch_size), "test logits", progress)
    report["calibration"] = calibration_report(logits, y, n_bins)
    figure = _reliability_figure(report["calibration"], "Reliability (test)")
    report["figures"]["reliability"] = str(save_figure(figure, out / "reliability.png"))
    if temperature_scaling:
        datamodule.setup("validate")
        val_set = getattr(datamodule, "val_dataset", None)
        if val_set is not None and len(val_set) > 0:
            val_logits, val_y = _logits_and_labels(
                jem, DataLoader(val_set, batch_size=batch_size), "val logits", progress
            )
            temperature = fit_temperature(val_logits, val_y)
            scaled = calibration_report(logits / temperature, y, n_bins)
            report["temperature_scaling"] = {
                "temperature": temperature,
                **{k: scaled[k] for k in ("nll", "brier", "ece", "mce")},
            }
            figure = _reliability_figure(scaled, f"Reliability (test, T={temperature:.2f})")
            report["figures"]["reliability_scaled"] = str(save_figure(figure, out / "reliability_scaled.png"))

    # OOD detection: in-distribution test inputs are the positives.
    def score_set(dataset: Dataset, desc: str) -> dict[str, Tensor]:
        batches = tqdm(_batches(dataset, batch_size, max_samples), desc=desc, disable=not progress, leave=False)
        return score_batches(jem, batches, scores, jem.temperature, jem.device)

    ood_sets = {name: make_ood_dataset(name, test_set, max_samples and min(max_samples, len(test_set))) for name in ood}
    ood_sets |= ood_datasets or {}
    if ood_sets and scores:
        in_scores = score_set(test_set, "OOD in-dist")
        report["ood"] = {}
        by_score: dict[str, dict[str, Tensor]] = {s: {"in-distribution": in_scores[s]} for s in scores}
        for name, dataset in ood_sets.items():
            check_ood_dataset(dataset, input_shape, name)
            out_scores = score_set(dataset, f"OOD {name}")
            report["ood"][name] = {
                s: {k: float(v) for k, v in ood_metrics(in_scores[s], out_scores[s]).items()} for s in scores
            }
            for s in scores:
                by_score[s][name] = out_scores[s]
        for s, groups in by_score.items():
            aurocs = {name: f"AUROC {report['ood'][name][s]['auroc']:.3f}" for name in ood_sets}
            figure = score_histogram(groups, title=f"OOD score: {s}", xlabel=s, legend_extra=aurocs)
            report["figures"][f"ood_{s}"] = str(save_figure(figure, out / f"ood_{s}.png"))

    # Robustness, optionally with the JEM defence (SGLD refinement of the attacked input before classifying).
    if attacks:
        defense = (lambda x: jem.purify(x, defense_steps)) if defense_steps > 0 else None
        rows = robust_accuracy(
            jem,
            _batches(test_set, batch_size, max_samples),
            list(attacks),
            defense=defense,
            device=jem.device,
            progress=progress,
        )
        report["robustness"] = {"defense_steps": defense_steps, "rows": rows}

    if num_sample_images > 0 and getattr(jem, "buffer", None) is not None and jem.buffer.is_initialized:
        paths = save_sample_grids(jem, out, per_class=num_sample_images, suffix="eval")
        report["figures"] |= {f"samples_{k}": str(v) for k, v in paths.items()}

    if generative is not None:
        real = DataLoader(test_set, batch_size=batch_size)
        report["generative"] = {
            "real": "test",
            **generative_metrics(jem, real, **({"batch_size": batch_size, "progress": progress} | generative)),
        }

    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _reversed_scores(ood: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """A warning line for every score that ranks an OOD set as *more* in-distribution than the test data."""
    return [
        f"! {score} points the wrong way on {name}: AUROC {values['auroc']:.3f} < 0.5 (the negated score would give "
        f"{1 - values['auroc']:.3f}); the model gives these inputs the values it gives data"
        for name, scores in ood.items()
        for score, values in scores.items()
        if values["auroc"] < 0.5
    ]


def format_report(report: dict[str, Any]) -> str:
    """A readable text rendering of :func:`evaluate`'s report."""
    cal = report["calibration"]
    ts = report.get("temperature_scaling")
    parts = [f"Test set: {report['data']} ({report['num_test']} examples)", ""]
    header = ["", "accuracy", "NLL", "Brier", "ECE", "MCE"]
    rows = [["raw", cal["accuracy"], cal["nll"], cal["brier"], cal["ece"], cal["mce"]]]
    if ts:
        rows.append([f"T={ts['temperature']:.3f}", cal["accuracy"], ts["nll"], ts["brier"], ts["ece"], ts["mce"]])
    parts += ["Calibration", _table(header, rows), ""]
    if "ood" in report:
        names = list(report["ood"])
        scores = list(next(iter(report["ood"].values())))
        rows = [
            [n, s, *(report["ood"][n][s][k] for k in ("auroc", "aupr_in", "aupr_out", "fpr95"))]
            for n in names
            for s in scores
        ]
        parts += [
            "OOD detection (in-distribution = positive)",
            _table(["OOD set", "score", "AUROC", "AUPR-in", "AUPR-out", "FPR95"], rows),
            *_reversed_scores(report["ood"]),
            "",
        ]
    if "robustness" in report:
        rob = report["robustness"]
        rows = [
            [
                r["attack"],
                r["eps"] if r.get("eps") is not None else r.get("std"),
                r["accuracy"],
                r.get("defended_accuracy"),
            ]
            for r in rob["rows"]
        ]
        defended = f"defended ({rob['defense_steps']} SGLD steps)" if rob["defense_steps"] else "defended"
        parts += ["Robustness", _table(["attack", "eps/std", "accuracy", defended], rows), ""]
    if "generative" in report:
        parts += ["Generative quality", format_generative(report["generative"]), ""]
    if report["figures"]:
        parts += ["Figures"] + [f"  {k}: {v}" for k, v in report["figures"].items()]
    return "\n".join(parts)
