"""jemkit.ood.pipeline: one OOD pipeline (fit -> score -> compare) for the report and OODMonitor, its options checked
once, the fused score's reference gathered by a torchmetrics state, and callbacks that load no evaluation code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jemkit import JEM, DigitsDataModule, ReplayBuffer
from jemkit.callbacks import OODMonitor
from jemkit.evaluate import evaluate
from jemkit.models import SmallCNN
from jemkit.ood import FUSED_PARTS, FusedReference, FusedScore, OODOptions, OODPipeline, build_ood_sets
from jemkit.sampling import SGLD
from tests.helpers import trainer


class Affine(nn.Module):
    """logits = W x with known answers: inputs far from the origin get a large logsumexp."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def batches(x: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=16)


def test_options_refuse_unknown_names_once_for_every_caller():
    with pytest.raises(ValueError, match=r"unknown OOD set\(s\) \['svhn'\]; expected some of uniform"):
        OODOptions(sets=["svhn"]).check()
    with pytest.raises(ValueError, match=r"unknown OOD score\(s\) \['energy'\]"):
        OODPipeline(Affine(), OODOptions(scores=["energy"]))
    with pytest.raises(ValueError, match=r"unknown post-hoc detector\(s\) \['lof'\]"):
        OODMonitor(OODOptions(detectors=["lof"]))
    with pytest.raises(ValueError, match="fit_samples must be an integer >= 1"):
        OODOptions(fit_samples=0).check()


def test_the_pipeline_scores_and_compares_with_known_answers():
    model = Affine()
    pipeline = OODPipeline(model, OODOptions(scores=["logpx", "max_logit"], detectors=[], fused=False))
    pipeline.fit(None)
    data = torch.tensor([[3.0, 0.0], [0.0, 3.0]]).repeat(8, 1)  # logsumexp about 12
    near_origin = torch.zeros(16, 2) + 0.01  # logsumexp about log 2
    result = pipeline.run(batches(data), {"origin": batches(near_origin)}, fused_on=None)
    assert result.names == ["logpx", "max_logit"] and pipeline.described == {"detectors": []}
    torch.testing.assert_close(result.in_scores["max_logit"], torch.full((16,), 12.0))
    assert result.results["origin"]["logpx"] == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    assert "fused" not in result.in_scores


def test_the_fused_reference_metric_fits_the_fused_score_of_all_its_updates():
    torch.manual_seed(0)
    parts = {name: torch.randn(50) * (i + 1) + i for i, name in enumerate(FUSED_PARTS)}
    reference = FusedReference()
    reference.update({k: v[:20] for k, v in parts.items()})  # two shares, as two ranks would give them
    reference.update({k: v[20:] for k, v in parts.items()})
    gathered = reference.compute()
    expected = FusedScore.fit(parts)
    assert gathered.parts == expected.parts
    for part in FUSED_PARTS:
        assert gathered.stats[part] == pytest.approx(expected.stats[part])
    single = FusedReference()
    single.update({k: v[:1] for k, v in parts.items()})
    assert single.compute() is None  # one reference input cannot be standardised
    with pytest.raises(ValueError, match=r"needs the scores \['knn'\]"):
        FusedReference().update({"logpx": torch.zeros(2), "mahalanobis": torch.zeros(2)})


def test_the_report_and_the_callback_give_the_same_figures_on_the_same_data(tmp_path):
    """One pipeline: with the validation split also serving as the test split, OODMonitor (in-distribution =
    validation, fused on it) and evaluate() (in-distribution = test, fused on validation) must agree exactly."""

    class SameSplits(DigitsDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.test_dataset = self.val_dataset

    torch.manual_seed(0)
    datamodule = SameSplits(batch_size=32)
    jem = JEM(SmallCNN(width=8), sampler=SGLD(n_steps=2), buffer=ReplayBuffer(capacity=64))
    options = OODOptions(sets=["uniform", "interp"], detectors=["mahalanobis", "knn"], fit_samples=300)
    monitor = OODMonitor(options, max_samples=200, save_histograms=False)
    trainer(tmp_path, max_epochs=1, limit_train_batches=3, num_sanity_val_steps=0, callbacks=[monitor]).fit(
        jem, datamodule
    )
    report = evaluate(
        jem, datamodule, tmp_path / "eval", calibration=False, robustness=False, samples=False, ood=options,
        max_samples=200, progress=False,
    )  # fmt: skip
    assert set(report["ood"]) == set(monitor.last) == {"uniform", "interp"}
    for name, by_score in monitor.last.items():
        assert set(by_score) == {"logpx", "msp", "max_logit", "grad_norm", "mahalanobis", "knn", "fused", "logpx_ic"}
        for score, values in by_score.items():
            assert report["ood"][name][score] == pytest.approx(values, abs=1e-6), (name, score)


def test_built_sets_match_the_reference_and_refuse_wrong_shapes():
    reference = TensorDataset(torch.rand(30, 1, 4, 4), torch.zeros(30, dtype=torch.long))
    sets = build_ood_sets(reference, ["uniform", "shuffled"], num_samples=10)
    assert {name: len(s) for name, s in sets.items()} == {"uniform": 10, "shuffled": 10}
    wrong = TensorDataset(torch.rand(5, 3, 4, 4), torch.zeros(5))
    with pytest.raises(ValueError, match=r"OOD set 'mine' has inputs of shape \(3, 4, 4\).*\(1, 4, 4\)"):
        build_ood_sets(reference, [], extra_sets={"mine": wrong})


def test_importing_the_callbacks_loads_no_evaluation_attacks_or_corruptions():
    code = (
        "import sys, jemkit, jemkit.callbacks\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('jemkit.evaluate', 'jemkit.data.corruptions')))\n"
        "print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_report_scores_the_sets_that_fit_the_data_and_those_the_datamodule_offers(tmp_path):
    jem = JEM(SmallCNN(num_classes=5, width=8), buffer=ReplayBuffer(capacity=16, input_shape=(1, 8, 8)))
    open_set = DigitsDataModule(classes=(0, 1, 2, 3, 4))
    quiet = {"calibration": False, "robustness": False, "samples": False, "progress": False, "max_samples": 50}
    report = evaluate(jem, open_set, tmp_path / "a", ood=OODOptions(detectors=[], fused=False), **quiet)
    expected = {"uniform", "gaussian", "constant", "shuffled", "interp", "vflip", "invert", "heldout"}
    assert set(report["ood"]) == expected  # images get the mirrored sets; the open set offers its held-out digits
    alone = OODOptions(sets=["uniform"], detectors=[], fused=False, datamodule_sets=False)
    assert set(evaluate(jem, open_set, tmp_path / "b", ood=alone, **quiet)["ood"]) == {"uniform"}
