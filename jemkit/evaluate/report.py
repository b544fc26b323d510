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
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from jemkit.adapters import unpack_batch
from jemkit.data.ood import OOD_SETS, check_ood_dataset, make_ood_dataset
from jemkit.evaluate.generative import format_generative, generative_metrics
from jemkit.evaluate.plots import reliability_diagram, save_figure, score_histogram
from jemkit.evaluate.robustness import jem_defense, robust_accuracy, threat_model
from jemkit.evaluate.samples import save_sample_grids
from jemkit.metrics.calibration import CalibrationMetrics, ReliabilityDiagram
from jemkit.metrics.temperature import fit_temperature
from jemkit.scores import SCORES, compare_scores, reversed_scores, score_batches

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
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = unpack_batch(batch)  # integer labels, also from 0/1 float labels of a binary head
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
    robustness: dict[str, Any] | None = None,
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
        datamodule: any LightningDataModule with test data (``test_dataset`` or ``test_dataloader()``; validation
            data the same way for temperature scaling).
        out_dir: folder for ``report.json`` and PNGs (created).
        ood: names of built-in OOD sets (see :data:`jemkit.data.ood.OOD_SETS`); the noise sets are drawn in the
            JEM's input domain.
        ood_datasets: extra OOD sets ``{name: Dataset}`` with the same input shape.
        scores: OOD scores (see :data:`jemkit.scores.SCORES`).
        attacks: robustness settings (see :func:`jemkit.evaluate.robustness.robust_accuracy`).
        defense_steps: if > 0, also report accuracy behind JEM's defence, this many steps of its own sampler on
            ``E(x)`` (:meth:`~jemkit.JEM.purify`), under attacks through the defence (worst case per example).
        robustness: keyword arguments of :func:`~jemkit.evaluate.robustness.robust_accuracy` that set the threat
            model: ``clip``, ``adaptive``, ``eot``, ``draws``, ``control`` (e.g. ``{"adaptive": []}`` for transfer
            attacks only); ``clip`` defaults to the datamodule's ``data_range`` (``None``, unbounded data: no clamp).
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
    test_set = _split(datamodule, "test")
    if test_set is None or len(test_set) == 0:
        raise ValueError(
            f"{type(datamodule).__name__} has no test data: expected a test_dataset or a test_dataloader() after setup"
        )
    input_shape = tuple(test_set[0][0].shape)
    expected = getattr(getattr(jem, "buffer", None), "input_shape", None)
    if expected is not None and input_shape != tuple(expected):
        raise ValueError(
            f"the data has inputs of shape {input_shape} but the checkpoint's model takes {tuple(expected)}: "
            "evaluate it on the data it was trained for (--data)"
        )
    report: dict[str, Any] = {"data": type(datamodule).__name__, "num_test": len(test_set), "figures": {}}
    val_set = _split(datamodule, "validate") if temperature_scaling else None
    _calibration_section(report, jem, test_set, val_set, out, n_bins, batch_size, progress)
    sets = {
        name: make_ood_dataset(
            name, test_set, max_samples and min(max_samples, len(test_set)), domain=getattr(jem, "domain", None)
        )
        for name in ood
    }
    sets |= ood_datasets or {}
    if sets and scores:
        _ood_section(report, jem, test_set, sets, scores, out, max_samples, batch_size, progress)
    if attacks:
        defense = jem_defense(jem, defense_steps) if defense_steps > 0 else None
        options = dict(robustness or {})
        options.setdefault("clip", getattr(datamodule, "data_range", (-1.0, 1.0)))  # None: unbounded data
        threat = threat_model(defense, **options)  # checks the options before the long run
        loader = _batches(test_set, batch_size, max_samples)
        rows = robust_accuracy(
            jem, loader, list(attacks), defense=defense, device=jem.device, progress=progress, **options
        )
        report["robustness"] = {"defense_steps": defense_steps, "threat_model": threat, "rows": rows}
    if num_sample_images > 0 and getattr(jem, "buffer", None) is not None and jem.buffer.is_initialized:
        data = torch.stack([test_set[i][0] for i in range(min(len(test_set), 64))])
        paths = save_sample_grids(jem, out, per_class=num_sample_images, suffix="eval", data=data)
        report["figures"] |= {f"samples_{k}": str(v) for k, v in paths.items()}
    if generative is not None:
        real = DataLoader(test_set, batch_size=batch_size)
        report["generative"] = {
            "real": "test",
            **generative_metrics(jem, real, **({"batch_size": batch_size, "progress": progress} | generative)),
        }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _split(datamodule: Any, stage: str) -> Dataset | None:
    """The test (``stage="test"``) or validation split of any LightningDataModule: its ``test_dataset`` /
    ``val_dataset`` if it has one, else what its ``test_dataloader()`` / ``val_dataloader()`` yields, gathered."""
    datamodule.setup(stage)
    name = "test" if stage == "test" else "val"
    dataset = getattr(datamodule, f"{name}_dataset", None)
    if dataset is not None:
        return dataset
    try:
        loader = getattr(datamodule, f"{name}_dataloader")()
    except (AttributeError, NotImplementedError, TypeError):  # Lightning's default hooks raise when not defined
        return None
    xs, ys = [], []
    for batch in loader:
        x, y = unpack_batch(batch)
        xs.append(x)
        ys.append(y)
    return TensorDataset(torch.cat(xs), torch.cat(ys)) if xs else None


def _calibration_section(
    report: dict[str, Any],
    jem: Any,
    test_set: Dataset,
    val_set: Dataset | None,
    out: Path,
    n_bins: int,
    batch_size: int,
    progress: bool,
) -> None:
    """Calibration on the whole test split, and after temperature scaling fitted on the validation split."""
    logits, y = _logits_and_labels(jem, DataLoader(test_set, batch_size=batch_size), "test logits", progress)
    report["calibration"] = calibration_report(logits, y, n_bins)
    figure = _reliability_figure(report["calibration"], "Reliability (test)")
    report["figures"]["reliability"] = str(save_figure(figure, out / "reliability.png"))
    if val_set is None or len(val_set) == 0:
        return
    val_logits, val_y = _logits_and_labels(jem, DataLoader(val_set, batch_size=batch_size), "val logits", progress)
    temperature = fit_temperature(val_logits, val_y)
    scaled = calibration_report(logits / temperature, y, n_bins)
    report["temperature_scaling"] = {
        "temperature": temperature,
        **{k: scaled[k] for k in ("nll", "brier", "ece", "mce")},
    }
    figure = _reliability_figure(scaled, f"Reliability (test, T={temperature:.2f})")
    report["figures"]["reliability_scaled"] = str(save_figure(figure, out / "reliability_scaled.png"))


def _ood_section(
    report: dict[str, Any],
    jem: Any,
    test_set: Dataset,
    sets: dict[str, Dataset],
    scores: Sequence[str],
    out: Path,
    max_samples: int | None,
    batch_size: int,
    progress: bool,
) -> None:
    """OOD detection, in-distribution test inputs positive: metrics per set and score, a histogram per score."""

    def score_set(dataset: Dataset, desc: str) -> dict[str, Tensor]:
        batches = tqdm(_batches(dataset, batch_size, max_samples), desc=desc, disable=not progress, leave=False)
        return score_batches(jem, batches, scores, jem.temperature, jem.device)

    input_shape = tuple(test_set[0][0].shape)
    in_scores = score_set(test_set, "OOD in-dist")
    out_scores = {}
    for name, dataset in sets.items():
        check_ood_dataset(dataset, input_shape, name)
        out_scores[name] = score_set(dataset, f"OOD {name}")
    report["ood"] = compare_scores(in_scores, out_scores)
    for s in scores:
        groups = {"in-distribution": in_scores[s]} | {name: values[s] for name, values in out_scores.items()}
        aurocs = {name: f"AUROC {report['ood'][name][s]['auroc']:.3f}" for name in sets}
        figure = score_histogram(groups, title=f"OOD score: {s}", xlabel=s, legend_extra=aurocs)
        report["figures"][f"ood_{s}"] = str(save_figure(figure, out / f"ood_{s}.png"))


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
    return [f"! {message}" for message in reversed_scores(ood)]


def _robustness_columns(rob: dict[str, Any]) -> list[tuple[str, str]]:
    """``(row key, title)`` of the accuracy columns: undefended, each attack on the defence, their worst case."""
    threat = rob.get("threat_model") or {}
    if not rob.get("defense_steps"):
        return [("accuracy", "accuracy")]
    eot = threat.get("eot", 1)
    titles = {"transfer": "transfer", "bpda": "BPDA" + (f"+EOT{eot}" if eot > 1 else ""), "unrolled": "unrolled"}
    attacks = threat.get("attacks", ["transfer"])
    columns = [("accuracy", "undefended"), *((f"{a}_accuracy", titles.get(a, a)) for a in attacks)]
    columns.append(("defended_accuracy", "defended (worst)" if len(attacks) > 1 else "defended"))
    if threat.get("fixed_noise_control"):
        columns.append(("fixed_noise_accuracy", "noise fixed"))
    return columns


def _robustness_notes(rob: dict[str, Any]) -> list[str]:
    """The threat model under the table, in words."""
    threat = rob.get("threat_model")
    if not threat:
        return []
    data_range = threat["data_range"]
    units = f"in data units (range {data_range}) and on [0, 1]" if data_range else "in data units (unbounded data)"
    notes = [f"threat model: {threat['attacker']}; budgets {units}"]
    if threat.get("defense"):
        kind = "random" if threat["random"] else "deterministic"
        notes.append(f"defence: {threat['defense']}, {kind}: {threat['sampler']}")
        notes.append(
            f"defended: {threat['defended_accuracy']}; {threat['eot']} gradient draw(s) per attack step (EOT); "
            f"prediction: {threat['prediction']}"
        )
        if len(threat["attacks"]) == 1:
            notes.append("! transfer attacks only: the defended figures are upper bounds on robustness")
    return notes


def _robustness_section(rob: dict[str, Any]) -> list[str]:
    """The robustness table and its threat model."""
    columns = _robustness_columns(rob)
    rows = [
        [
            r["attack"],
            r["eps"] if r.get("eps") is not None else r.get("std"),
            r.get("eps_01") if r.get("eps_01") is not None else r.get("std_01"),
            *(r.get(key) for key, _ in columns),
        ]
        for r in rob["rows"]
    ]
    table = _table(["attack", "eps/std", "on [0,1]", *(title for _, title in columns)], rows)
    return ["Robustness", table, *_robustness_notes(rob), ""]


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
        parts += _robustness_section(report["robustness"])
    if "generative" in report:
        parts += ["Generative quality", format_generative(report["generative"]), ""]
    if report["figures"]:
        parts += ["Figures"] + [f"  {k}: {v}" for k, v in report["figures"].items()]
    return "\n".join(parts)
