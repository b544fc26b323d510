"""Post-hoc detectors in the evaluation report and OODMonitor, and the plain-classifier baseline beside the JEM."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from jemkit import JEM, PYLD, DigitsDataModule, ReplayBuffer
from jemkit.cli import main
from jemkit.evaluate import OODOptions, RobustnessOptions, SampleOptions, evaluate, format_report
from jemkit.evaluate.baseline import comparison, format_comparison
from jemkit.loading import PlainClassifier, load_classifier, load_jem
from jemkit.ood.detectors import PostHocDetectors
from jemkit.ood.features import extract_features, last_linear
from jemkit.ood.scores import RECOMMENDED_SCORE, PostHocScores, score_batches

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "jem-digits.ckpt"
FAST = {"robustness": False, "samples": False, "progress": False, "max_samples": 64}


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_the_scoring_loop_adds_the_detectors_scores_from_the_same_forward(digits):
    jem = load_jem(str(CKPT)).eval()
    train = torch.utils.data.DataLoader(digits.train_dataset, batch_size=100)
    posthoc = PostHocScores.fit(jem, train, max_samples=500)
    assert posthoc.names == ["mahalanobis", "rmd", "knn", "vim"]
    x = digits.test_dataset.tensors[0][:40]
    scores = score_batches(jem, [(x[:25],), (x[25:],)], ["logpx"], jem.temperature, posthoc=posthoc)
    # the same detectors fitted by hand on the same features, scored on the test features: the same numbers
    z_train, y_train = extract_features(jem.classifier, train, max_samples=500)
    head = last_linear(jem.classifier)
    by_hand = PostHocDetectors().fit(z_train, y_train, head.weight.detach(), head.bias.detach())
    z_test, _ = extract_features(jem.classifier, [(x, torch.zeros(40))])
    for name, expected in by_hand.score(z_test).items():
        assert torch.allclose(scores[name], expected, atol=1e-5), name
    assert torch.allclose(scores["logpx"], torch.logsumexp(jem(x), 1), atol=1e-5)


def test_the_baseline_is_scored_on_the_same_sets_and_compared(tmp_path, digits):
    jem = load_jem(str(CKPT))
    # the JEM's own classifier as the "plain" one: every shared figure must agree exactly
    baseline = PlainClassifier(jem.classifier)
    ood = OODOptions(sets=["uniform", "shuffled"], scores=["logpx", "msp"], detectors=["mahalanobis", "knn"])
    report = evaluate(jem, DigitsDataModule(), tmp_path, ood=ood, baseline=baseline, **FAST)
    base = report["baseline"]
    assert base["calibration"]["accuracy"] == report["calibration"]["accuracy"]
    assert base["temperature_scaling"]["ece"] == pytest.approx(report["temperature_scaling"]["ece"])
    for name in ("uniform", "shuffled"):
        for score in ("logpx", "msp", "mahalanobis", "knn"):
            assert base["ood"][name][score]["auroc"] == pytest.approx(report["ood"][name][score]["auroc"])
    compared = report["comparison"]
    assert compared["rows"]["accuracy"][0] == compared["rows"]["accuracy"][1]
    shuffled = compared["ood"]["shuffled"]
    assert shuffled["jem"]["score"] == RECOMMENDED_SCORE
    best = max(v["auroc"] for v in base["ood"]["shuffled"].values())
    assert shuffled["baseline_best"]["auroc"] == best
    text = format_report(report)
    assert "JEM beside the plain classifier" in text and "AUROC shuffled" in text
    assert (tmp_path / "baseline_reliability.png").exists() and (tmp_path / "baseline_ood_knn.png").exists()


def test_comparison_picks_the_best_plain_score_per_set():
    report = {"calibration": {"accuracy": 0.9, "ece": 0.02}, "temperature_scaling": {"ece": 0.01}}
    report["ood"] = {"noise": {"logpx": {"auroc": 0.95}, "msp": {"auroc": 0.97}}}
    baseline = {"calibration": {"accuracy": 0.92, "ece": 0.05}, "temperature_scaling": {"ece": 0.015}}
    baseline["ood"] = {"noise": {"logpx": {"auroc": 0.9}, "vim": {"auroc": 0.99}, "msp": {"auroc": 0.8}}}
    compared = comparison(report, baseline)
    assert compared["rows"]["ece_scaled"] == [0.01, 0.015]
    assert compared["ood"]["noise"] == {
        "jem": {"score": "logpx", "auroc": 0.95},
        "jem_best": {"score": "msp", "auroc": 0.97},
        "baseline_best": {"score": "vim", "auroc": 0.99},
        "baseline_same_rule": {"score": "logpx", "auroc": 0.9},  # the JEM's rule on the plain classifier
    }
    assert "plain with logpx: 0.9000" in "\n".join(format_comparison(compared))
    del baseline["ood"]["noise"]["logpx"]  # a baseline scored without the JEM's rule: no such figure, no crash
    compared = comparison(report, baseline)
    assert compared["ood"]["noise"]["baseline_same_rule"] == {"score": "logpx", "auroc": None}
    assert "plain with" not in "\n".join(format_comparison(compared))


def test_evaluate_command_with_a_baseline_state_dict(tmp_path, capsys):
    jem = load_jem(str(CKPT))
    weights = tmp_path / "plain.pt"
    torch.save(jem.classifier.state_dict(), weights)
    assert isinstance(load_classifier(str(weights), jem), PlainClassifier)
    out = tmp_path / "eval"
    args = ["evaluate", "--ckpt", str(CKPT), "--out", str(out), "--baseline_ckpt", str(weights)]
    args += ["--robustness.attacks", "[]", "--samples.per_class", "0", "--progress", "false", "--max_samples", "48"]
    args += ["--ood.sets", "[uniform]", "--ood.detectors", "[rmd]"]
    main(args)
    report = json.loads((out / "report.json").read_text())
    assert report["comparison"]["ood"]["uniform"]["baseline_best"]["score"] in ("logpx", "msp", "max_logit", "rmd")
    assert report["posthoc"]["detectors"] == ["rmd"] and report["baseline"]["posthoc"]["detectors"] == ["rmd"]
    assert "plain + toolbox" in capsys.readouterr().out


class _ConvOnly(nn.Module):
    """A classifier without any linear layer: a 1x1 convolution to class maps, then global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


def test_a_classifier_without_a_linear_layer_gets_a_clear_error_or_a_named_layer(tmp_path):
    jem = JEM(_ConvOnly(), sampler=PYLD(n_steps=1), buffer=ReplayBuffer(capacity=8, input_shape=(1, 8, 8)))
    with pytest.raises(ValueError, match=r"_ConvOnly has no nn.Linear layer .* name the layer whose output is the"):
        evaluate(jem, DigitsDataModule(), tmp_path, ood=OODOptions(sets=["uniform"]), **FAST)
    named = OODOptions(sets=["uniform"], detectors=["mahalanobis"], features="body.1")
    report = evaluate(jem, DigitsDataModule(), tmp_path, ood=named, **FAST)
    assert report["posthoc"]["features"] == "output of body.1" and "mahalanobis" in report["ood"]["uniform"]


def test_the_options_refuse_unknown_detectors_before_any_work(tmp_path):
    jem = load_jem(str(CKPT))
    with pytest.raises(ValueError, match=r"unknown post-hoc detector\(s\) \['odin'\]"):
        evaluate(jem, DigitsDataModule(), tmp_path / "x", ood=OODOptions(detectors=["odin"]), **FAST)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="per_class must be an integer >= 0"):
        evaluate(jem, DigitsDataModule(), tmp_path / "x", samples=SampleOptions(per_class=-1), robustness=False)
    with pytest.raises(ValueError, match="defense_steps must be an integer >= 0"):
        evaluate(jem, DigitsDataModule(), tmp_path / "x", robustness=RobustnessOptions(defense_steps=-2))


def test_evaluate_gives_back_every_train_flag(tmp_path):
    jem = load_jem(str(CKPT)).train()
    jem.classifier.head.eval()  # a mixed state must come back as it was, module by module
    before = {name: m.training for name, m in jem.named_modules()}
    evaluate(jem, DigitsDataModule(), tmp_path, ood=OODOptions(sets=["uniform"], detectors=["knn"]), **FAST)
    assert {name: m.training for name, m in jem.named_modules()} == before
