"""The shift section wired into evaluate() and ``jemkit evaluate --shift``."""

import json
from pathlib import Path

import pytest

from jemkit import DigitsDataModule
from jemkit.cli import main
from jemkit.evaluate import evaluate, format_report
from jemkit.evaluate.shift import ShiftOptions
from jemkit.loading import load_jem

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "jem-digits.ckpt"
FAST = {"robustness": False, "samples": False, "ood": False, "progress": False, "max_samples": 60}


def test_the_shift_section_uses_the_calibration_sections_temperature(tmp_path):
    jem = load_jem(str(CKPT))
    options = ShiftOptions(shifts=["contrast", "gaussian_noise"], severities=[5])
    report = evaluate(jem, DigitsDataModule(), tmp_path, shift=options, **FAST)
    shift = report["shift"]
    assert shift["temperature"] == pytest.approx(report["temperature_scaling"]["temperature"])
    assert set(shift["shifts"]) == {"contrast", "gaussian_noise"}
    assert shift["clean"]["accuracy"] == pytest.approx(report["calibration"]["accuracy"], abs=0.05)  # 60 of 270
    assert Path(report["figures"]["shift"]).stat().st_size > 0
    assert "Under distribution shift" in format_report(report)
    assert "shift" not in evaluate(jem, DigitsDataModule(), tmp_path, **FAST)  # off unless asked for


def test_shift_options_are_checked_against_the_data_kind_before_any_work(tmp_path):
    jem = load_jem(str(CKPT))
    with pytest.raises(ValueError, match="missing_values"):
        evaluate(jem, DigitsDataModule(), tmp_path / "x", shift=ShiftOptions(shifts=["missing_values"]), **FAST)
    assert not (tmp_path / "x").exists()


def test_the_command_line_turns_the_shift_section_on(tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--ckpt", str(CKPT), "--out", str(out), "--robustness.attacks", "[]", "--ood.sets", "[]"]
    args += ["--samples.per_class", "0", "--progress", "false", "--max_samples", "40"]
    args += ["--shift.shifts", "[pixelate]", "--shift.severities", "[2]"]
    main(args)
    report = json.loads((out / "report.json").read_text())
    assert list(report["shift"]["shifts"]) == ["pixelate"]
