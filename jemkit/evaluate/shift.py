"""Calibration and accuracy under distribution shift: a model measured on the corruptions of
:mod:`jemkit.data.corruptions`, at severities 1 to 5, optionally with test-time adaptation (:mod:`jemkit.adapt`).

Accuracy, NLL and ECE per corruption and severity, as Ovadia et al. (2019) measured them, before and after a
temperature fitted on clean validation data.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from jemkit.batches import unpack_batch
from jemkit.checks import check_integer
from jemkit.classifier import select_logits
from jemkit.data.corruptions import SHIFTS, check_shift, corrupt, data_kind
from jemkit.evaluate.calibration import calibration_report
from jemkit.evaluate.tables import text_table
from jemkit.pictures import save_figure, shift_figure
from jemkit.sampling.domain import InputDomain

__all__ = ["ShiftOptions", "format_shift", "shift_report", "shift_section"]


# ---------------------------------------------------------------------------------------------- the report
_METRICS = ("accuracy", "nll", "brier", "ece", "mce")


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _gather(dataset: Dataset, max_samples: int | None, batch_size: int) -> tuple[Tensor, Tensor]:
    if max_samples is not None and len(dataset) > max_samples:
        dataset = Subset(dataset, range(max_samples))
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = unpack_batch(batch)
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError("shift_report got an empty dataset")
    return torch.cat(xs), torch.cat(ys).long()


@contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _predict(model: nn.Module, adapt: Any, x: Tensor, batch_size: int) -> Tensor:
    """Logits ``[N, C]`` of ``x``: the model as it is, or each batch adapted first (``adapt``, reset before)."""
    device = _model_device(model if adapt is None else adapt)
    logits = []
    if adapt is not None:
        adapt.reset()
        for chunk in x.split(batch_size):
            logits.append(adapt(chunk.to(device)).detach().float().cpu())
        return torch.cat(logits)
    with torch.no_grad(), _evaluation_mode(model):
        for chunk in x.split(batch_size):
            logits.append(select_logits(model(chunk.to(device))).float().cpu())
    return torch.cat(logits)


def _metrics(logits: Tensor, y: Tensor, temperature: float | None, n_bins: int) -> dict[str, float]:
    raw = calibration_report(logits, y, n_bins)
    result = {k: raw[k] for k in _METRICS}
    if temperature is not None:
        scaled = calibration_report(logits / temperature, y, n_bins)
        result |= {f"{k}_scaled": scaled[k] for k in _METRICS if k != "accuracy"}
    return result


def _mean(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(row[k] for row in rows) for k in rows[0]} if rows else {}


def _resolve_adapter(adapt: Any, model: nn.Module, domain: InputDomain | None) -> Any:
    if adapt is None or not isinstance(adapt, str):
        if adapt is not None and not (callable(adapt) and hasattr(adapt, "reset")):
            raise TypeError(
                f"adapt must be None, a method name ('energy', 'tent') or an adapter with reset() such as "
                f"jemkit.adapt.EnergyAdaptation, got {type(adapt).__name__}"
            )
        return adapt
    from jemkit.adapt import make_adapter  # evaluation without adaptation never loads it

    return make_adapter(adapt, model, domain=domain).to(_model_device(model))


def shift_report(
    model: nn.Module,
    dataset: Dataset,
    domain: InputDomain | None = None,
    temperature: float | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    shifts: Sequence[str] | None = None,
    n_bins: int = 15,
    batch_size: int = 128,
    max_samples: int | None = None,
    adapt: Any = None,
    progress: bool = False,
    seed: int = 0,
    corrupted: Mapping[str, Mapping[int, Dataset]] | None = None,
) -> dict[str, Any]:
    """Accuracy, NLL, Brier, ECE and MCE of ``model`` on ``dataset`` (clean) and under every shift and severity.

    Args:
        model: a :class:`jemkit.JEM` or any classifier returning logits (a one-logit binary head is read as two).
        dataset: the clean test split, ``(x, y)`` items; the shifted sets are generated from it (the first
            ``max_samples`` items).
        domain: where the inputs live; default the model's ``domain`` (a JEM's), else the unit box ``[-1, 1]``.
        temperature: a temperature fitted by the caller on clean validation data
            (:func:`jemkit.metrics.fit_temperature`); NLL, Brier, ECE and MCE are then also reported after it
            (``*_scaled``).
        severities: severities to measure, each 1 to 5 (the clean set is always measured, as severity 0).
        shifts: shift names (:data:`SHIFTS`); default all of the data's kind.
        n_bins: equal-width confidence bins of ECE/MCE.
        batch_size: evaluation (and adaptation) batch size.
        max_samples: cap on the number of test items; ``None`` for all.
        adapt: test-time adaptation: ``None``, a method name (``"energy"``, ``"tent"``; built with
            :func:`jemkit.adapt.make_adapter` around ``model`` and ``domain``) or a ready adapter (e.g.
            ``EnergyAdaptation(model)``), which is reset before every set and adapts continually over its batches
            (episodically if built so), as in Tent's and TEA's protocol; the model is restored at the end.
        progress: show a progress bar over the sets.
        seed: seed of the corruptions' random stream: the same seed, the same shifted sets.
        corrupted: ready-made shifted sets ``{shift: {severity: Dataset}}`` (e.g.
            :meth:`jemkit.data.CIFAR10CDataModule.corrupted_sets`) to measure instead of generating them; then
            ``shifts`` and ``severities`` default to what it holds.

    Returns:
        ``{"kind", "shifts", "severities", "num_samples", "temperature", "adapt", "seed", "clean": metrics,
        "results": {shift: {severity: metrics}}, "by_severity": {severity: mean over shifts}, "mean": mean over every
        shift and severity, "mean_severe": mean over severities 3 to 5}``, metrics being ``accuracy, nll, brier, ece,
        mce`` (and ``*_scaled`` with a temperature); severities are string keys (JSON).
    """
    check_integer("batch_size", batch_size)
    check_integer("n_bins", n_bins)
    if max_samples is not None:
        check_integer("max_samples", max_samples)
    if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0 or None, got {temperature!r}")
    domain = domain if domain is not None else getattr(model, "domain", None)
    if domain is not None and not isinstance(domain, InputDomain):
        raise TypeError(f"domain must be an InputDomain or None, got {type(domain).__name__}")
    x, y = _gather(dataset, max_samples, batch_size)
    kind = data_kind(x.shape[1:])
    if corrupted is not None:
        shifts = list(shifts if shifts is not None else corrupted)
        severities = list(severities if severities is not None else sorted({s for v in corrupted.values() for s in v}))
        missing = [(n, s) for n in shifts for s in severities if n not in corrupted or s not in corrupted[n]]
        if missing:
            raise ValueError(f"corrupted holds no set for (shift, severity) {missing[:5]}; it has {sorted(corrupted)}")
    else:
        shifts = list(shifts if shifts is not None else SHIFTS[kind])
        for name in shifts:
            check_shift(name, x.shape[1:])
    severities = [int(s) for s in severities]
    for s in severities:
        if isinstance(s, bool) or not 1 <= s <= 5:
            raise ValueError(f"severities must be integers from 1 to 5, got {list(severities)}")
    if not shifts or not severities:
        raise ValueError(f"shift_report needs at least one shift and one severity, got {shifts} and {severities}")
    adapter = _resolve_adapter(adapt, model, domain)
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, dict[str, dict[str, float]]] = {}
    jobs = [(name, s) for name in shifts for s in severities]
    try:
        clean = _metrics(_predict(model, adapter, x, batch_size), y, temperature, n_bins)
        for name, s in tqdm(jobs, desc="shifts", disable=not progress, leave=False):
            if corrupted is not None:
                x_shift, y_shift = _gather(corrupted[name][s], max_samples, batch_size)
            else:
                x_shift, y_shift = corrupt(x, name, s, domain, generator), y
            logits = _predict(model, adapter, x_shift, batch_size)
            results.setdefault(name, {})[str(s)] = _metrics(logits, y_shift, temperature, n_bins)
    finally:
        if adapter is not None:
            adapter.reset()  # the model leaves as it came: the adapted parameters restored exactly
    by_severity = {str(s): _mean([results[n][str(s)] for n in shifts]) for s in severities}
    severe = [results[n][str(s)] for n in shifts for s in severities if s >= 3]
    return {
        "kind": kind,
        "shifts": shifts,
        "severities": severities,
        "num_samples": len(x),
        "temperature": temperature,
        "adapt": None if adapter is None else repr(adapter),
        "seed": seed,
        "clean": clean,
        "results": results,
        "by_severity": by_severity,
        "mean": _mean([row for rows in results.values() for row in rows.values()]),
        "mean_severe": _mean(severe),
    }


# ---------------------------------------------------------------------------------------------- rendering
def _cell(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def format_shift(section: dict[str, Any]) -> str:
    """A text rendering of :func:`shift_report`'s result: accuracy per shift and severity, then the summary rows
    (clean, each severity, the means) with NLL and ECE, raw and after the temperature. Figures in percent but NLL."""
    scaled = section.get("temperature") is not None
    severities = [str(s) for s in section["severities"]]
    title = f"Distribution shift ({section['kind']} data, {section['num_samples']} examples per set"
    title += f"; T={section['temperature']:.3f}" if scaled else ""
    title += f"; adaptation: {section['adapt']})" if section.get("adapt") else ")"
    per_shift = [
        [
            name,
            *(_cell(rows[s]["accuracy"]) for s in severities),
            _cell(_mean(list(rows.values()))["accuracy"]),
            _cell(_mean(list(rows.values()))["ece"]),
            *([_cell(_mean(list(rows.values()))["ece_scaled"])] if scaled else []),
        ]
        for name, rows in section["results"].items()
    ]
    header = ["shift", *(f"acc s{s}" for s in severities), "acc mean", "ECE mean", *(["ECE(T) mean"] if scaled else [])]
    summary_rows = [("clean", section["clean"])]
    summary_rows += [(f"severity {s}", section["by_severity"][s]) for s in severities]
    summary_rows += [("mean", section["mean"])]
    if section["mean_severe"]:
        summary_rows += [("mean, severity 3-5", section["mean_severe"])]
    summary = [
        [
            label,
            _cell(m["accuracy"]),
            _cell(m["nll"], percent=False),
            _cell(m["ece"]),
            *([_cell(m["nll_scaled"], percent=False), _cell(m["ece_scaled"])] if scaled else []),
        ]
        for label, m in summary_rows
    ]
    summary_header = ["set", "acc %", "NLL", "ECE %", *(["NLL(T)", "ECE(T) %"] if scaled else [])]
    return "\n".join([title, text_table(header, per_shift), "", text_table(summary_header, summary)])


# ---------------------------------------------------------------------------------------------- options
ADAPT_MODES = ("continual", "episodic")


@dataclass
class ShiftOptions:
    """What the shift section measures (``jemkit evaluate --shift.*``).

    Args:
        shifts: shift names (:data:`SHIFTS`); ``None`` for all of the data's kind.
        severities: severities 1 to 5 to measure (the clean set is always measured).
        adapt: test-time adaptation: ``None``, ``"energy"`` (TEA: the contrastive energy with Langevin negatives)
            or ``"tent"`` (entropy minimisation); both update only the normalisation layers' affine parameters
            (:mod:`jemkit.adapt`).
        adapt_mode: ``"continual"`` (adapt over the batches of a set, reset between sets: Tent's and TEA's protocol)
            or ``"episodic"`` (reset before every batch).
        adapt_steps: optimiser updates per test batch (TEA and Tent: 1).
        adapt_lr: the adaptation's Adam learning rate (TEA and Tent: 1e-3).
        adapt_arguments: further keyword arguments of the adapter, e.g. ``{"sampler": SGLD(40, 0.1, 0.01)}`` for
            the energy adaptation's chains (see :class:`~jemkit.adapt.EnergyAdaptation`).
        seed: seed of the corruptions: the same seed, the same shifted sets.

    Example::

        >>> options = ShiftOptions(severities=[3, 5], adapt="energy")
        >>> section = options.report(jem, datamodule.test_dataset, temperature=1.3)
    """

    shifts: list[str] | None = None
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    adapt: str | None = None
    adapt_mode: str = "continual"
    adapt_steps: int = 1
    adapt_lr: float = 1e-3
    adapt_arguments: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def check(self, input_shape: Sequence[int] | None = None) -> None:
        """Refuse unknown shifts (or shifts of another data kind than ``input_shape``'s), severities outside 1-5 and
        unknown adaptation settings, before any work is done."""
        for name in self.shifts or []:
            check_shift(name, input_shape)
        if not self.severities or any(isinstance(s, bool) or s not in (1, 2, 3, 4, 5) for s in self.severities):
            raise ValueError(f"severities must be integers from 1 to 5, got {self.severities!r}")
        if self.adapt is not None and self.adapt not in ("energy", "tent"):
            raise ValueError(f"adapt must be None, 'energy' or 'tent', got {self.adapt!r}")
        if self.adapt_mode not in ADAPT_MODES:
            raise ValueError(f"adapt_mode must be one of {ADAPT_MODES}, got {self.adapt_mode!r}")
        check_integer("adapt_steps", self.adapt_steps)
        if isinstance(self.adapt_lr, bool) or not (isinstance(self.adapt_lr, (int, float)) and self.adapt_lr > 0):
            raise ValueError(f"adapt_lr must be a number > 0, got {self.adapt_lr!r}")
        check_integer("seed", self.seed, minimum=0)

    def adapter(self, model: nn.Module, domain: InputDomain | None = None) -> Any:
        """The adapter these options ask for around ``model`` (``None`` without adaptation); a classifier without
        normalisation layers raises ``ValueError`` here."""
        if self.adapt is None:
            return None
        from jemkit.adapt import make_adapter

        options = {"mode": self.adapt_mode, "steps": self.adapt_steps, "lr": self.adapt_lr, **self.adapt_arguments}
        return make_adapter(self.adapt, model, domain=domain, **options).to(_model_device(model))

    def report(
        self,
        model: nn.Module,
        dataset: Dataset,
        domain: InputDomain | None = None,
        temperature: float | None = None,
        n_bins: int = 15,
        batch_size: int = 128,
        max_samples: int | None = 1000,
        progress: bool = False,
    ) -> dict[str, Any]:
        """:func:`shift_report` with these options."""
        self.check()
        domain = domain if domain is not None else getattr(model, "domain", None)
        return shift_report(
            model,
            dataset,
            domain,
            temperature,
            severities=self.severities,
            shifts=self.shifts,
            n_bins=n_bins,
            batch_size=batch_size,
            max_samples=max_samples,
            adapt=self.adapter(model, domain),
            progress=progress,
            seed=self.seed,
        )


def shift_section(
    model: nn.Module,
    test_set: Dataset,
    options: ShiftOptions,
    out: Path,
    temperature: float | None = None,
    n_bins: int = 15,
    max_samples: int | None = 1000,
    batch_size: int = 128,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(section, figures)`` for the evaluation report: :meth:`ShiftOptions.report` on the test split (the
    temperature is the calibration section's), and the figure of accuracy and ECE against severity."""
    section = options.report(model, test_set, None, temperature, n_bins, batch_size, max_samples, progress)
    return section, {"shift": str(save_figure(shift_figure(section), out / "shift.png"))}
