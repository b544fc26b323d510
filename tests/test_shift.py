"""jemkit.evaluate.shift: the shift report, its table, figure and options, and the shift benchmark at a tiny size."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure
from torch.utils.data import TensorDataset

from jemkit.data.corruptions import SHIFTS, corrupt
from jemkit.evaluate.calibration import calibration_report
from jemkit.evaluate.shift import ShiftOptions, format_shift, shift_report, shift_section
from jemkit.pictures import shift_figure
from tests.helpers import TinyMLP


def _tiny_report(**kwargs):
    torch.manual_seed(0)
    x = torch.rand(40, 1, 4, 4) * 2 - 1
    y = (x.flatten(1).mean(1) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    model = TinyMLP(in_features=16, num_classes=4)
    return model, TensorDataset(x, y), shift_report(model, TensorDataset(x, y), **kwargs)


def test_shift_report_figures_and_means():
    model, dataset, report = _tiny_report(temperature=2.0, severities=[1, 3, 5], shifts=["contrast", "jpeg"])
    x, y = dataset.tensors
    with torch.no_grad():
        logits = model(x)
    clean = calibration_report(logits, y, 15)
    assert report["clean"]["accuracy"] == pytest.approx(clean["accuracy"])
    assert report["clean"]["ece_scaled"] == pytest.approx(calibration_report(logits / 2, y)["ece"])
    shifted = corrupt(x, "contrast", 1, None, torch.Generator().manual_seed(0))  # the first set drawn with seed 0
    with torch.no_grad():
        expected = calibration_report(model(shifted), y)["nll"]
    assert report["results"]["contrast"]["1"]["nll"] == pytest.approx(expected)
    rows = [report["results"][n][s] for n in ("contrast", "jpeg") for s in ("1", "3", "5")]
    assert report["mean"]["accuracy"] == pytest.approx(sum(r["accuracy"] for r in rows) / 6)
    severe = [report["results"][n][s]["ece"] for n in ("contrast", "jpeg") for s in ("3", "5")]
    assert report["mean_severe"]["ece"] == pytest.approx(sum(severe) / 4)
    assert report["by_severity"]["3"]["accuracy"] == pytest.approx(
        (report["results"]["contrast"]["3"]["accuracy"] + report["results"]["jpeg"]["3"]["accuracy"]) / 2
    )
    text = format_shift(report)
    assert "contrast" in text and "jpeg" in text and "mean, severity 3-5" in text and "ECE(T)" in text
    figure = shift_figure(report)
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    assert len(figure.axes[1].lines) == 2 + 1 + 1  # per shift, the mean, the mean after T


def test_shift_report_without_temperature_and_argument_checks():
    _, dataset, report = _tiny_report(severities=[2], shifts=["gaussian_noise"], max_samples=10)
    assert report["num_samples"] == 10 and "ece_scaled" not in report["mean"] and report["mean_severe"] == {}
    assert "ECE(T)" not in format_shift(report)
    model = TinyMLP(in_features=16, num_classes=4)
    with pytest.raises(ValueError, match="severities must be integers from 1 to 5"):
        shift_report(model, dataset, severities=[0])
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        shift_report(model, dataset, temperature=0.0)
    with pytest.raises(ValueError, match="is for tabular data"):
        shift_report(model, dataset, shifts=["missing_values"])
    with pytest.raises(ValueError, match="has no normalisation layer"):
        shift_report(model, dataset, adapt="tent", severities=[1], shifts=["contrast"])


def test_shift_options_and_section(tmp_path):
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        ShiftOptions(shifts=["fog"]).check()
    with pytest.raises(ValueError, match="severities"):
        ShiftOptions(severities=[6]).check()
    with pytest.raises(ValueError, match="adapt must be None, 'energy' or 'tent'"):
        ShiftOptions(adapt="bn").check()
    with pytest.raises(ValueError, match="adapt_mode"):
        ShiftOptions(adapt_mode="online").check()
    with pytest.raises(ValueError, match="is for signal data"):
        ShiftOptions(shifts=["time_shift"]).check((3, 8, 8))
    model, dataset, _ = _tiny_report(severities=[1], shifts=["contrast"])
    options = ShiftOptions(shifts=["contrast", "pixelate"], severities=[2])
    section, figures = shift_section(model, dataset, options, tmp_path, temperature=1.5)
    assert section["shifts"] == ["contrast", "pixelate"] and section["temperature"] == 1.5
    assert (tmp_path / "shift.png").is_file() and figures == {"shift": str(tmp_path / "shift.png")}


def test_the_shift_benchmark_runs_end_to_end_at_a_tiny_size(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ holds scripts
    import shift as benchmark

    out = tmp_path / "shift"
    argv = ["--scenarios", "wine-bn", "--seeds", "0", "--steps", "3", "--severities", "5", "--tea_steps", "1"]
    result = benchmark.main([*argv, "--ablation", "--workers", "1", "--out", str(out)])
    rows = result["summary"]["wine-bn"]
    expected = {"plain", "plain + T", "plain + Tent", "plain + energy", "JEM", "JEM + T", "JEM + energy"}
    expected |= {f"plain + {arm}" for arm in ("test-batch statistics only", "Tent, running statistics")}
    expected |= {"plain + energy, running statistics"}  # --ablation: the plain classifier's extra arms
    assert set(rows) == expected and all(entry["seeds"] == 1 for entry in rows.values())
    run = next(r for r in result["runs"] if r["config"] == "plain")
    assert rows["plain + T"]["mean"]["ece"][0] == pytest.approx(run["rows"]["none"]["mean"]["ece_scaled"])
    assert rows["plain + T"]["mean"]["accuracy"] == rows["plain"]["mean"]["accuracy"]
    assert set(rows["JEM"]["per_shift"]) == set(SHIFTS["tabular"])
    checks = result["verdicts"][0]["checks"]
    assert checks["acc"] == (rows["JEM"]["mean"]["accuracy"][0] >= rows["plain"]["mean"]["accuracy"][0] - 0.01)
    assert json.loads(Path(f"{out}.json").read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    table = Path(f"{out}.md").read_text()
    assert "| plain + energy |" in table and "| JEM + T |" in table and "feature_scaling" in table
