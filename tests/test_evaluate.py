import json
from pathlib import Path

import pytest
import torch

from jemkit import DigitsDataModule
from jemkit.cli import main
from jemkit.evaluate import OODOptions, evaluate, format_report
from jemkit.loading import load_datamodule, load_jem
from jemkit.metrics import fit_temperature

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "jem-digits.ckpt"
FAST = [
    "--max_samples",
    "48",
    "--ood.sets",
    "[uniform, interp]",
    "--ood.scores",
    "[logpx, msp]",
    "--progress",
    "false",
    "--samples.per_class",
    "2",
    "--calibration.temperature_scaling",
    "true",
    "--robustness.defense_steps",
    "2",
    "--robustness.attacks",
    '[{"kind": "clean"}, {"kind": "pgd", "norm": "linf", "eps": 0.1, "steps": 3}, {"kind": "noise", "std": 0.2}]',
]


def test_evaluate_command_on_shipped_checkpoint_writes_valid_report(tmp_path, capsys):
    out = tmp_path / "eval"
    main(["evaluate", "--ckpt", str(CKPT), "--out", str(out), *FAST])
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == "DigitsDataModule" and report["num_test"] == 270
    assert report["calibration"]["accuracy"] >= 0.97
    # ECE and the temperature, recomputed here independently: 15 equal-width bins, the last one closed at 1
    jem, dm = load_jem(CKPT), DigitsDataModule()
    dm.setup("fit")
    dm.setup("test")
    with torch.no_grad():
        logits, y = jem(dm.test_dataset.tensors[0]), dm.test_dataset.tensors[1]
        val_logits = jem(dm.val_dataset.tensors[0])
    confidence, prediction = logits.softmax(1).max(1)
    bins = torch.clamp((confidence * 15).long(), max=14)
    ece = sum(
        (bins == k).float().mean() * (confidence[bins == k].mean() - (prediction == y)[bins == k].float().mean()).abs()
        for k in range(15)
        if (bins == k).any()
    )
    assert report["calibration"]["ece"] == pytest.approx(float(ece), abs=1e-6)
    temperature = fit_temperature(val_logits, dm.val_dataset.tensors[1])
    assert report["temperature_scaling"]["temperature"] == pytest.approx(temperature, rel=1e-4)
    assert set(report["ood"]) == {"uniform", "interp"}
    assert set(report["ood"]["uniform"]) == {"logpx", "msp", "mahalanobis", "rmd", "knn", "vim", "fused", "logpx_ic"}
    assert report["ood"]["uniform"]["logpx"]["auroc"] > 0.9  # a trained JEM tells digits from noise
    rows = {r["attack"]: r for r in report["robustness"]["rows"]}
    assert rows["pgd-linf"]["accuracy"] < rows["clean"]["accuracy"]
    assert rows["clean"]["defended_accuracy"] is not None
    for path in report["figures"].values():
        assert Path(path).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "OOD detection" in printed and "Robustness" in printed and "report.json" in printed
    assert format_report(report).startswith("Test set: DigitsDataModule")


def test_evaluate_python_api_with_explicit_datamodule(tmp_path):
    from jemkit import GaussianMixtureDataModule

    jem = load_jem(str(CKPT))
    with pytest.raises(ValueError, match="has no test data"):
        evaluate(jem, _Empty(), tmp_path)
    assert load_datamodule(str(CKPT)).__class__.__name__ == "DigitsDataModule"
    with pytest.raises(ValueError, match=r"has inputs of shape \(2,\) but the model expects \(1, 8, 8\)"):
        evaluate(
            jem,
            _DigitsWithExtra(),
            tmp_path,
            ood=OODOptions(sets=[]),
            ood_data={"toy": _toy_test(GaussianMixtureDataModule)},
            robustness=False,
            progress=False,
            samples=False,
        )


class _Empty:
    test_dataset = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0))

    def setup(self, stage):
        pass


class _DigitsWithExtra:
    def __init__(self):
        from jemkit import DigitsDataModule

        self.dm = DigitsDataModule()

    def setup(self, stage):
        self.dm.setup(stage)
        self.test_dataset, self.val_dataset = self.dm.test_dataset, self.dm.val_dataset


def _toy_test(cls):
    dm = cls()
    dm.setup("test")
    return dm.test_dataset


def test_evaluate_command_scores_user_ood_datamodules(tmp_path):
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--ckpt",
        str(CKPT),
        "--out",
        str(out),
        "--ood.sets",
        "[]",
        "--robustness.attacks",
        "[]",
        "--progress",
        "false",
        "--ood_data",
        '[{"class_path": "tests.test_evaluate.ShiftedDigits"}]',
        "--samples.per_class",
        "0",
        "--ood.scores",
        "[logpx]",
        "--max_samples",
        "64",
    ]
    main(args)
    report = json.loads((out / "report.json").read_text())
    assert list(report["ood"]) == ["ShiftedDigits"]
    # recomputed with scikit-learn on the same 64 + 64 inputs: log p(x) = logsumexp of the logits
    from sklearn.metrics import roc_auc_score

    jem, shifted, digits = load_jem(CKPT), ShiftedDigits(), DigitsDataModule()
    shifted.setup("test")
    digits.setup("test")
    with torch.no_grad():
        scores_in = torch.logsumexp(jem(digits.test_dataset.tensors[0][:64]), 1)
        scores_out = torch.logsumexp(jem(shifted.test_dataset.tensors[0][:64]), 1)
    expected = roc_auc_score([1] * 64 + [0] * 64, torch.cat([scores_in, scores_out]).numpy())
    assert report["ood"]["ShiftedDigits"]["logpx"]["auroc"] == pytest.approx(expected, abs=1e-6)


class ShiftedDigits(DigitsDataModule):
    """Digits moved by 3 pixels: a user-defined OOD set."""

    def setup(self, stage=None):
        super().setup(stage)
        x, y = self.test_dataset.tensors
        self.test_dataset = torch.utils.data.TensorDataset(torch.roll(x, 3, dims=-1), y)


def test_evaluate_command_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):  # a user's mistake: one line, no traceback
        main(["evaluate", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)])
    assert capsys.readouterr().err.startswith("jemkit: error: checkpoint not found")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        main(["evaluate", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path), "--debug"])
    not_a_ckpt = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, not_a_ckpt)
    with pytest.raises(ValueError, match="not a Lightning checkpoint of a JEM"):
        main(["evaluate", "--ckpt", str(not_a_ckpt), "--out", str(tmp_path), "--debug"])


def test_scores_that_point_the_wrong_way_are_flagged():
    report = {
        "data": "D",
        "num_test": 4,
        "calibration": {"accuracy": 1.0, "nll": 0.1, "brier": 0.1, "ece": 0.0, "mce": 0.0},
        "ood": {
            "noise": {
                "logpx": {"auroc": 0.99, "aupr_in": 1, "aupr_out": 1, "fpr95": 0},
                "grad_norm": {"auroc": 0.21, "aupr_in": 0.4, "aupr_out": 0.5, "fpr95": 1.0},
            }
        },
        "figures": {},
    }
    text = format_report(report)
    assert "! grad_norm points the wrong way on noise: AUROC 0.210 < 0.5 (the negated score would give 0.790)" in text
    assert "logpx points the wrong way" not in text


def test_evaluate_refuses_a_checkpoint_with_a_pickle_payload_in_one_line(tmp_path, capsys):
    from tests.test_checkpoint_io import _checkpoint_with_a_payload

    path, marker = _checkpoint_with_a_payload(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--ckpt", str(path), "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"jemkit: error: {path} is unsafe to load") and "load it with --weights_only false\n" in err
    assert "Traceback" not in err and not marker.exists() and not (tmp_path / "eval").exists()
