"""Metrics on constructed inputs with known answers: OOD (jemkit.metrics.ood), calibration, temperature scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from torchmetrics.functional.classification import (
    binary_specificity_at_sensitivity,
    multiclass_calibration_error,
)
from torchmetrics.utilities import dim_zero_cat

from jemkit.metrics import (
    CalibrationMetrics,
    OODMetrics,
    ReliabilityDiagram,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    fpr_at_tpr,
    max_calibration_error,
    negative_log_likelihood,
    ood_metrics,
    reliability_bins,
)


def _values(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------- OOD


def test_perfectly_separable_scores():
    m = _values(ood_metrics(torch.arange(11.0, 21.0), torch.arange(1.0, 11.0)))
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}


def test_reversed_scores():
    m = _values(ood_metrics(torch.arange(1.0, 11.0), torch.arange(11.0, 21.0)))
    assert m["auroc"] == 0.0
    assert m["fpr95"] == 1.0
    # every OOD score ranks above every in-distribution score: precision 0.5 / 0.5 (in and out sets of 10)
    assert m["aupr_in"] < 0.6 and m["aupr_out"] < 0.6


@pytest.mark.parametrize("offset", [1e4, -1e4, 1e6])
def test_huge_unbounded_scores_do_not_saturate(offset):
    # torchmetrics would apply a sigmoid to these and see only ties (AUROC 0.5); ranks keep the order.
    scores_in = offset + torch.arange(1.0, 11.0, dtype=torch.float64)
    scores_out = offset - torch.arange(0.0, 10.0, dtype=torch.float64)
    m = _values(ood_metrics(scores_in, scores_out))
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}


def test_identical_distributions_give_chance():
    same = torch.randn(500)
    assert float(ood_metrics(same, same.clone())["auroc"]) == 0.5  # every pair tied
    m = _values(ood_metrics(torch.randn(2000), torch.randn(2000)))
    assert abs(m["auroc"] - 0.5) < 0.05
    assert abs(m["fpr95"] - 0.95) < 0.05


@pytest.mark.parametrize("k", [0, 1, 3, 7, 10])
def test_fpr95_exact_on_constructed_case(k):
    # 20 in-distribution scores 1..20: keeping 95% (19 of 20) puts the threshold at score 2.
    scores_in = torch.arange(1.0, 21.0)
    scores_out = torch.tensor([1.5] * (10 - k) + [2.5] * k)
    assert float(fpr_at_tpr(scores_in, scores_out, tpr=0.95)) == pytest.approx(k / 10)
    assert float(ood_metrics(scores_in, scores_out)["fpr95"]) == pytest.approx(k / 10)


def test_fpr_ties_at_threshold_count_as_false_positives():
    scores_in = torch.arange(1.0, 21.0)
    assert float(fpr_at_tpr(scores_in, torch.full((10,), 2.0))) == 1.0
    assert float(fpr_at_tpr(scores_in, torch.full((10,), 1.999))) == 0.0
    # tpr=1 keeps every in-distribution input: threshold = min score
    assert float(fpr_at_tpr(scores_in, torch.tensor([0.5, 1.0, 1.5]), tpr=1.0)) == pytest.approx(2 / 3)


def test_fpr_matches_torchmetrics_specificity_at_sensitivity():
    scores_in, scores_out = torch.randn(300) + 1.0, torch.randn(170)
    preds = torch.sigmoid(torch.cat([scores_in, scores_out]))  # small scores: the sigmoid is harmless here
    target = torch.cat([torch.ones(300), torch.zeros(170)]).long()
    specificity, _ = binary_specificity_at_sensitivity(preds, target, min_sensitivity=0.95)
    torch.testing.assert_close(fpr_at_tpr(scores_in, scores_out), 1 - specificity)


def test_auroc_and_aupr_match_sklearn_with_ties():
    scores_in = torch.randint(0, 8, (200,)).double() * 100.0  # many ties, far outside [0, 1]
    scores_out = torch.randint(-3, 5, (150,)).double() * 100.0
    scores = torch.cat([scores_in, scores_out]).numpy()
    labels = [1] * 200 + [0] * 150
    m = _values(ood_metrics(scores_in, scores_out))
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert m["aupr_in"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert m["aupr_out"] == pytest.approx(average_precision_score([1 - t for t in labels], -scores), abs=1e-6)


def test_ood_metric_in_pieces_equals_functional():
    scores_in, scores_out = torch.randn(90) * 50 + 20, torch.randn(60) * 50
    metric = OODMetrics()
    metric.update(scores_in[:30], is_in=True)
    metric.update(scores_out[:25], is_in=torch.zeros(25, dtype=torch.bool))
    mixed = torch.cat([scores_in[30:], scores_out[25:]])
    metric.update(mixed, is_in=torch.cat([torch.ones(60), torch.zeros(35)]).long())
    expected = ood_metrics(scores_in, scores_out)
    result = metric.compute()
    assert result.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(result[key], expected[key])

    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_ood_metric_merge_state_like_ddp():
    # merge_state applies each state's dist_reduce_fx, as the DDP sync does
    scores_in, scores_out = torch.randn(40) + 1, torch.randn(30)
    rank0, rank1 = OODMetrics(), OODMetrics()
    rank0.update(scores_in[:25], True)
    rank0.update(scores_out[:5], False)
    rank1.update(scores_in[25:], True)
    rank1.update(scores_out[5:], False)
    rank0.merge_state(rank1)
    for key, value in ood_metrics(scores_in, scores_out).items():
        torch.testing.assert_close(rank0.compute()[key], value)


def test_ood_metric_sync_from_a_rank_without_data():
    # torchmetrics sends an empty tensor of the metric's dtype for a rank with no data; all_gather needs one dtype
    scores_in, scores_out = torch.randn(20) + 1, torch.randn(10)
    full = OODMetrics()
    full.update(scores_in, True)
    full.update(scores_out, False)
    sent = iter([dim_zero_cat(full.scores), dim_zero_cat(full.is_in)])

    def fake_all_gather(tensor: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        other = next(sent)
        assert tensor.dtype == other.dtype
        return [other, tensor]

    empty = OODMetrics(dist_sync_fn=fake_all_gather, distributed_available_fn=lambda: True)
    with pytest.warns(UserWarning, match="before the ``update``"):
        result = empty.compute()
    for key, value in ood_metrics(scores_in, scores_out).items():
        torch.testing.assert_close(result[key], value)


def test_ood_metric_float64_states_keep_close_scores_apart():
    metric = OODMetrics().set_dtype(torch.float64)
    metric.update(torch.tensor([1e8 + 1, 1e8 + 2], dtype=torch.float64), True)
    metric.update(torch.tensor([1e8], dtype=torch.float64), False)
    assert float(metric.compute()["auroc"]) == 1.0


def test_ood_errors():
    good = torch.randn(5)
    with pytest.raises(ValueError, match="empty"):
        ood_metrics(torch.tensor([]), good)
    with pytest.raises(ValueError, match="empty"):
        fpr_at_tpr(good, torch.tensor([]))
    with pytest.raises(ValueError, match="shape"):
        ood_metrics(torch.randn(5, 2), good)
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics(good, torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr(good, good, tpr=0.0)
    metric = OODMetrics()
    metric.update(good, is_in=True)
    with pytest.raises(ValueError, match="no out-of-distribution"):
        metric.compute()
    with pytest.raises(ValueError, match="0/1"):
        metric.update(good, is_in=torch.full((5,), 2))
    with pytest.raises(ValueError, match="shape"):
        metric.update(good, is_in=torch.ones(4))
    # infinite scores are ordered, so allowed
    m = _values(ood_metrics(torch.tensor([float("inf"), 1.0]), torch.tensor([-float("inf"), 0.0])))
    assert m["auroc"] == 1.0


# --------------------------------------------------------------------------------------------------- calibration


def _confident_but_wrong() -> tuple[torch.Tensor, torch.Tensor]:
    # two samples at confidence 0.9, both wrong; two at 0.7, both right
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.7, 0.3], [0.7, 0.3]])
    y = torch.tensor([1, 1, 0, 0])
    return probs, y


def test_ece_mce_brier_by_hand():
    probs, y = _confident_but_wrong()
    # ECE = 1/2 * |0 - 0.9| + 1/2 * |1 - 0.7| = 0.6; MCE = 0.9
    assert float(expected_calibration_error(probs, y)) == pytest.approx(0.6)
    assert float(max_calibration_error(probs, y)) == pytest.approx(0.9)
    # Brier: wrong rows (0.9^2 + 0.9^2) = 1.62, right rows (0.3^2 + 0.3^2) = 0.18 -> mean 0.9
    assert float(brier_score(probs, y)) == pytest.approx(0.9)
    conf, acc, counts = reliability_bins(probs, y, n_bins=4)
    assert counts.tolist() == [0, 0, 2, 2]
    torch.testing.assert_close(acc, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(conf, torch.tensor([0.0, 0.0, 0.7, 0.9]))


def test_nll_by_hand():
    logits = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    expected = (torch.log(torch.tensor(2.0)) + F.softplus(torch.tensor(-10.0))) / 2
    torch.testing.assert_close(negative_log_likelihood(logits, torch.tensor([0, 0])), expected)


@pytest.mark.parametrize("n_bins", [5, 15, 20])
def test_ece_equals_torchmetrics(n_bins):
    probs = torch.softmax(3 * torch.randn(2000, 7), dim=1)
    y = torch.randint(0, 7, (2000,))
    assert float(probs.max()) < 1.0  # torchmetrics puts confidence exactly 1.0 in an extra bin
    ece = expected_calibration_error(probs, y, n_bins)
    mce = max_calibration_error(probs, y, n_bins)
    torch.testing.assert_close(ece, multiclass_calibration_error(probs, y, 7, n_bins=n_bins, norm="l1"))
    torch.testing.assert_close(mce, multiclass_calibration_error(probs, y, 7, n_bins=n_bins, norm="max"))


def test_confidence_one_goes_to_last_bin():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    _, _, counts = reliability_bins(probs, torch.tensor([0, 0, 0]), n_bins=4)
    assert counts.tolist() == [0, 0, 1, 2]


def test_perfectly_calibrated_has_small_ece():
    logits = 2.0 * torch.randn(20000, 10)
    y = torch.distributions.Categorical(logits=logits).sample()
    assert float(expected_calibration_error(logits.softmax(1), y)) < 0.02


def test_calibration_metrics_in_pieces_equal_functional():
    logits = 3.0 * torch.randn(500, 6)
    y = torch.randint(0, 6, (500,))
    metric, diagram = CalibrationMetrics(n_bins=10), ReliabilityDiagram(n_bins=10, from_logits=True)
    for chunk in torch.split(torch.arange(500), 123):
        metric.update(logits[chunk], y[chunk])
        diagram.update(logits[chunk], y[chunk])
    probs = logits.softmax(1)
    result = metric.compute()
    assert set(result) == {"acc", "nll", "brier", "ece", "mce"}
    assert all(v.dim() == 0 for v in result.values())
    torch.testing.assert_close(result["acc"], (logits.argmax(1) == y).float().mean())
    torch.testing.assert_close(result["nll"], negative_log_likelihood(logits, y))
    torch.testing.assert_close(result["brier"], brier_score(probs, y))
    torch.testing.assert_close(result["ece"], expected_calibration_error(probs, y, 10))
    torch.testing.assert_close(result["mce"], max_calibration_error(probs, y, 10))

    bins = diagram.compute()
    conf, acc, counts = reliability_bins(probs, y, 10)
    torch.testing.assert_close(bins["bin_confidence"], conf)
    torch.testing.assert_close(bins["bin_accuracy"], acc)
    assert torch.equal(bins["bin_counts"], counts)
    torch.testing.assert_close(bins["ece"], result["ece"])


def test_calibration_metric_merge_state_like_ddp():
    logits, y = torch.randn(64, 4), torch.randint(0, 4, (64,))
    rank0, rank1, whole = CalibrationMetrics(), CalibrationMetrics(), CalibrationMetrics()
    rank0.update(logits[:40], y[:40])
    rank1.update(logits[40:], y[40:])
    whole.update(logits, y)
    rank0.merge_state(rank1)
    for key, value in whole.compute().items():
        torch.testing.assert_close(rank0.compute()[key], value)


def test_calibration_errors():
    probs, y = _confident_but_wrong()
    with pytest.raises(ValueError, match="sum to 1"):
        brier_score(probs * 0.5, y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(torch.randn(4, 2) * 5, y)
    with pytest.raises(ValueError, match="labels"):
        reliability_bins(probs, y[:3])
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(probs, y, n_bins=0)
    with pytest.raises(ValueError, match="labels must lie"):
        negative_log_likelihood(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="before any update"):
        ReliabilityDiagram().compute()


# ----------------------------------------------------------------------------------------------------- temperature


def test_fit_temperature_recovers_overconfidence():
    base = 1.5 * torch.randn(3000, 10)  # < 32768 elements: no intra-op threads to contend for
    y = torch.distributions.Categorical(logits=base).sample()  # base logits are calibrated by construction
    over = 3.0 * base
    temperature = fit_temperature(over, y)
    assert temperature == pytest.approx(3.0, rel=0.1)
    ece_before = expected_calibration_error(over.softmax(1), y)
    ece_after = expected_calibration_error((over / temperature).softmax(1), y)
    assert float(ece_after) < float(ece_before)
    assert float(ece_after) < 0.03


def test_fit_temperature_calibrated_and_inside_inference_mode():
    base = torch.randn(2000, 5)
    y = torch.distributions.Categorical(logits=base).sample()
    with torch.inference_mode():
        temperature = fit_temperature(base, y)
    assert temperature == pytest.approx(1.0, rel=0.1)


def test_fit_temperature_errors():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        fit_temperature(torch.randn(10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(torch.randn(10, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long))
