"""One evaluation of a trained JEM: calibration, OOD detection, robustness, samples and their FID/IS, as a report.

``evaluate(jem, datamodule, out_dir)`` is what ``jemkit evaluate`` runs; it is also the Python API. Each section has
its own options object (:class:`CalibrationOptions`, :class:`OODOptions`, :class:`RobustnessOptions`,
:class:`SampleOptions`, :class:`GenerativeOptions`), which the command line reads under the same names
(``--robustness.defense_steps 10``); ``False`` skips a section. It writes ``report.json`` and PNG figures into
``out_dir`` and returns the report as a dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from jemkit.classifier import sampling_context
from jemkit.evaluate.baseline import comparison, format_comparison
from jemkit.evaluate.calibration import CalibrationOptions, calibration_section, format_calibration
from jemkit.evaluate.generative import format_generative
from jemkit.evaluate.ood import format_ood, ood_section
from jemkit.evaluate.robustness import RobustnessOptions, attack_clip, format_robustness, robustness_section
from jemkit.evaluate.samples import SampleOptions, samples_section
from jemkit.evaluate.shift import ShiftOptions, format_shift, shift_section
from jemkit.evaluate.splits import capped_loader, split_dataset
from jemkit.metrics.generative import GenerativeOptions, generative_metrics
from jemkit.ood.pipeline import OODOptions, build_ood_sets, datamodule_ood_sets

if TYPE_CHECKING:
    from jemkit.module import JEM

__all__ = ["evaluate", "format_report"]


def _check_input_shape(jem: JEM, test_set: Dataset) -> None:
    input_shape = tuple(test_set[0][0].shape)
    expected = getattr(getattr(jem, "buffer", None), "input_shape", None)
    if expected is not None and input_shape != tuple(expected):
        raise ValueError(
            f"the data has inputs of shape {input_shape} but the checkpoint's model takes {tuple(expected)}: "
            "evaluate it on the data it was trained for (--data)"
        )


def _options(value: Any, default: type, on_by_default: bool = True) -> Any:
    """A section's options: ``True`` its defaults, ``False`` skipped (``None`` here), ``None`` its defaults or
    skipped as the section goes by default, else the options given."""
    if value is None:
        value = on_by_default
    if value is False:
        return None
    return default() if value is True else value


def evaluate(
    jem: JEM,
    datamodule: Any,
    out_dir: str | Path,
    calibration: CalibrationOptions | bool | None = None,
    ood: OODOptions | bool | None = None,
    robustness: RobustnessOptions | bool | None = None,
    samples: SampleOptions | bool | None = None,
    generative: GenerativeOptions | bool | None = None,
    shift: ShiftOptions | bool | None = None,
    ood_data: dict[str, Dataset] | None = None,
    baseline: nn.Module | None = None,
    max_samples: int | None = 1000,
    batch_size: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``jem`` on ``datamodule``'s test split; write ``out_dir/report.json`` and figures; return the report.

    Args:
        jem: a :class:`jemkit.JEM` (any module with ``forward -> logits``, ``device``, ``temperature`` and, for the
            defence and samples, ``purify``/``sample`` works).
        datamodule: any LightningDataModule with test data (``test_dataset`` or ``test_dataloader()``; validation
            data the same way for temperature scaling).
        out_dir: folder for ``report.json`` and PNGs (created).
        calibration: the calibration section's options (default :class:`CalibrationOptions`).
        ood: the OOD section's options (default :class:`OODOptions`: every built-in set and score).
        robustness: the robustness section's options (default :class:`RobustnessOptions`: PGD and noise inside
            the JEM's input domain, no defence).
        samples: the sample pictures' options (default :class:`SampleOptions`).
        generative: FID/IS of the JEM's samples against the test split (:class:`GenerativeOptions`; default:
            skipped).
        shift: accuracy and calibration under corruptions of the test split, optionally with test-time adaptation
            (:class:`~jemkit.evaluate.shift.ShiftOptions`; default: skipped; ``True``: every shift of the data's
            kind at severities 1-5).
        ood_data: more OOD sets ``{name: Dataset}`` of the test data's input shape.
        baseline: the plain classifier (:func:`~jemkit.evaluate.baseline.load_classifier`), evaluated beside the JEM
            with the same calibration and OOD options on the same sets: ``report["baseline"]`` and
            ``report["comparison"]`` (see :func:`~jemkit.evaluate.baseline.comparison`).
        max_samples: cap on the test (and each OOD) set for OOD and robustness; ``None`` for all.
        batch_size: evaluation batch size.
        progress: show progress bars.

    Every section's argument takes its options object, ``True`` for its defaults or ``False`` to skip it (``None``:
    as the section goes by default). The
    model is evaluated in eval mode; every submodule's train/eval flag is restored afterwards.
    """
    options = {
        "calibration": _options(calibration, CalibrationOptions),
        "ood": _options(ood, OODOptions),
        "robustness": _options(robustness, RobustnessOptions),
        "samples": _options(samples, SampleOptions),
        "generative": _options(generative, GenerativeOptions, on_by_default=False),
        "shift": _options(shift, ShiftOptions, on_by_default=False),
    }
    for name, section in options.items():  # refuse bad options before any work is done
        if section is None:
            continue
        if name == "robustness":
            section.check(attack_clip(jem))
        elif name == "shift":
            section.check(getattr(getattr(jem, "buffer", None), "input_shape", None))
        else:
            section.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_set = split_dataset(datamodule, "test")
    if test_set is None or len(test_set) == 0:
        raise ValueError(
            f"{type(datamodule).__name__} has no test data: expected a test_dataset or a test_dataloader() after setup"
        )
    _check_input_shape(jem, test_set)
    ood_sets = None  # built once, so that the JEM and the baseline are scored on the same inputs
    if options["ood"] is not None:
        extra = datamodule_ood_sets(datamodule) if options["ood"].datamodule_sets else {}
        domain = getattr(jem, "domain", None)
        ood_sets = build_ood_sets(test_set, options["ood"].sets, max_samples, domain, extra | (ood_data or {}))
    splits = _Splits(datamodule, test_set, ood_sets, out, max_samples, batch_size, progress)
    with sampling_context(jem, "eval"):
        report = _sections(jem, splits, options)
    if baseline is not None:
        with sampling_context(baseline, "eval"):
            section = _baseline(baseline, splits, options, report)
        report["baseline"] = section
        report["comparison"] = comparison(report, section)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


@dataclass
class _Splits:
    """What every section of one evaluation reads: the data's splits, the OOD sets, where figures go, the caps."""

    datamodule: Any
    test_set: Dataset
    ood_sets: dict[str, Dataset] | None
    out: Path
    max_samples: int | None
    batch_size: int
    progress: bool

    def split(self, stage: str) -> Dataset | None:
        return split_dataset(self.datamodule, stage)

    def ood(self, model: nn.Module, options: OODOptions, prefix: str = "") -> tuple[dict[str, Any], dict[str, str]]:
        """The OOD section of ``model`` on this evaluation's sets (detectors fitted on the training split, the fused
        score standardised on the validation split)."""
        train_set = self.split("fit") if options.detectors else None
        val_set = self.split("validate") if options.fused else None
        return ood_section(
            model, self.test_set, self.ood_sets or {}, options, train_set, self.out, self.max_samples,
            self.batch_size, self.progress, prefix, val_set,
        )  # fmt: skip


def _baseline(model: nn.Module, splits: _Splits, options: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The baseline's calibration and OOD sections, on the OOD sets the JEM was scored on; figures ``baseline_*``."""
    section: dict[str, Any] = {"model": type(getattr(model, "classifier", model)).__name__}
    calibration = options["calibration"] or CalibrationOptions(temperature_scaling=True)
    val_set = splits.split("validate") if calibration.temperature_scaling else None
    cal, figures = calibration_section(
        model, splits.test_set, val_set, splits.out, calibration, splits.batch_size, splits.progress, "baseline_"
    )
    section |= cal
    report["figures"] |= figures
    if options["ood"] is not None and splits.ood_sets:
        found, figures = splits.ood(model, options["ood"], "baseline_")
        section |= found
        report["figures"] |= figures
    return section


def _sections(jem: JEM, splits: _Splits, options: dict[str, Any]) -> dict[str, Any]:
    test_set, out, batch_size, max_samples = splits.test_set, splits.out, splits.batch_size, splits.max_samples
    report: dict[str, Any] = {"data": type(splits.datamodule).__name__, "num_test": len(test_set), "figures": {}}
    calibration: CalibrationOptions | None = options["calibration"]
    if calibration is not None:
        val_set = splits.split("validate") if calibration.temperature_scaling else None
        section, figures = calibration_section(jem, test_set, val_set, out, calibration, batch_size, splits.progress)
        report |= section
        report["figures"] |= figures
    if options["ood"] is not None:
        section, figures = splits.ood(jem, options["ood"])
        report |= section
        report["figures"] |= figures
    robustness: RobustnessOptions | None = options["robustness"]
    if robustness is not None and robustness.attack_configs():
        loader = capped_loader(test_set, batch_size, max_samples)
        report["robustness"] = robustness_section(jem, loader, robustness, splits.progress)
    if options["samples"] is not None:
        report["figures"] |= samples_section(jem, test_set, options["samples"], out)
    shift: ShiftOptions | None = options["shift"]
    if shift is not None:
        temperature = (report.get("temperature_scaling") or {}).get("temperature")
        n_bins = calibration.n_bins if calibration is not None else 15
        section, figures = shift_section(
            jem, test_set, shift, out, temperature, n_bins, max_samples, batch_size, splits.progress
        )
        report["shift"] = section
        report["figures"] |= figures
    generative: GenerativeOptions | None = options["generative"]
    if generative is not None:
        real = DataLoader(test_set, batch_size=batch_size)
        val_set = splits.split("validate")  # held-out data, measured as the samples are: the floor beside them
        heldout = DataLoader(val_set, batch_size=batch_size) if val_set is not None else None
        arguments = generative.metrics_arguments(jem)
        metrics = generative_metrics(
            jem, real, batch_size=batch_size, progress=splits.progress, heldout=heldout, **arguments
        )
        report["generative"] = {"real": "test", "heldout": "validation" if heldout is not None else None, **metrics}
    return report


def format_report(report: dict[str, Any]) -> str:
    """A readable text rendering of :func:`evaluate`'s report."""
    parts = [f"Test set: {report['data']} ({report['num_test']} examples)", ""]
    if "calibration" in report:
        parts += format_calibration(report)
    if "ood" in report:
        parts += format_ood(report["ood"], report.get("posthoc"))
    if "robustness" in report:
        parts += format_robustness(report["robustness"])
    if "shift" in report:
        parts += ["Under distribution shift", format_shift(report["shift"]), ""]
    if "generative" in report:
        parts += ["Generative quality", format_generative(report["generative"]), ""]
    if "comparison" in report:
        parts += format_comparison(report["comparison"])
    if report["figures"]:
        parts += ["Figures"] + [f"  {k}: {v}" for k, v in report["figures"].items()]
    return "\n".join(parts)
