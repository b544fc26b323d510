"""Tests for jemkit.losses: hand-computed values, the NLL/cross-entropy identity, gradient signs, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jemkit.energy import energy_matrix
from jemkit.losses import (
    EBM_LOSSES,
    contrastive_divergence_loss,
    energy_l2_regularization,
    energy_loss,
    get_ebm_loss,
    hinge_loss,
    log_loss,
    lvq2_loss,
    mce_loss,
    nll_loss,
    perceptron_loss,
    square_exponential_loss,
    square_square_loss,
)

# Row 0: E(y) = 1, most offending incorrect E(ȳ) = 0 (class 2), min over all = 0, gap E(y) - E(ȳ) = 1.
# Row 1: E(y) = 4, most offending incorrect E(ȳ) = -1 (class 1), min over all = -1, gap = 5.
ENERGIES = torch.tensor([[1.0, 3.0, 0.0], [2.0, -1.0, 4.0]])
LABELS = torch.tensor([0, 2])


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@pytest.mark.parametrize(
    ("fn", "kwargs", "expected"),
    [
        (energy_loss, {}, (1 + 4) / 2),
        (perceptron_loss, {}, ((1 - 0) + (4 - -1)) / 2),
        (hinge_loss, {}, (2 + 6) / 2),
        (hinge_loss, {"margin": 0.5}, (1.5 + 5.5) / 2),
        (log_loss, {}, (math.log1p(math.e**1) + math.log1p(math.e**5)) / 2),
        (lvq2_loss, {}, (1 + 1) / 2),
        (lvq2_loss, {"saturation": 2.0}, (1 + 2) / 2),
        (mce_loss, {}, (sigmoid(1) + sigmoid(5)) / 2),
        (square_square_loss, {}, ((1 + 1**2) + (16 + 2**2)) / 2),
        (square_square_loss, {"margin": 2.0}, ((1 + 2**2) + (16 + 3**2)) / 2),
        (square_exponential_loss, {"gamma": 0.5}, ((1 + 0.5 * math.exp(0)) + (16 + 0.5 * math.exp(1))) / 2),
        (
            nll_loss,
            {},
            (
                (1 + math.log(math.exp(-1) + math.exp(-3) + math.exp(0)))
                + (4 + math.log(math.exp(-2) + math.exp(1) + math.exp(-4)))
            )
            / 2,
        ),
        (
            nll_loss,
            {"beta": 2.0},
            (
                (1 + 0.5 * math.log(math.exp(-2) + math.exp(-6) + math.exp(0)))
                + (4 + 0.5 * math.log(math.exp(-4) + math.exp(2) + math.exp(-8)))
            )
            / 2,
        ),
    ],
)
def test_hand_computed_values(fn, kwargs, expected):
    loss = fn(ENERGIES, LABELS, **kwargs)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_nll_with_beta_one_is_cross_entropy():
    torch.manual_seed(0)
    logits = 20 * torch.randn(16, 7)  # large logits also check the logsumexp is stable
    y = torch.randint(0, 7, (16,))
    expected = F.cross_entropy(logits, y)
    torch.testing.assert_close(nll_loss(energy_matrix(logits), y), expected)
    torch.testing.assert_close(nll_loss(-logits, y, beta=1.0), expected)


def test_nll_beta_acts_as_inverse_temperature():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    y = torch.tensor([1, 2])
    # (1 / beta) * cross-entropy of beta * logits.
    torch.testing.assert_close(nll_loss(-logits, y, beta=3.0), F.cross_entropy(3.0 * logits, y) / 3.0)


def test_hinge_zero_when_margin_satisfied_positive_otherwise():
    energies = torch.tensor([[0.0, 2.0, 3.0]])  # correct class 0 beats the best wrong one by 2
    y = torch.tensor([0])
    assert hinge_loss(energies, y, margin=1.0).item() == 0.0
    assert hinge_loss(energies, y, margin=2.0).item() == 0.0
    assert hinge_loss(energies, y, margin=3.0).item() == pytest.approx(1.0)
    assert hinge_loss(energies, torch.tensor([2]), margin=1.0).item() == pytest.approx(4.0)


def test_most_offending_answer_ignores_correct_class_even_if_lowest():
    # The correct class has the lowest energy; ȳ must be the best *incorrect* class (energy 5), not class 0.
    energies = torch.tensor([[-10.0, 5.0, 7.0]])
    y = torch.tensor([0])
    assert mce_loss(energies, y).item() == pytest.approx(sigmoid(-15.0))
    assert perceptron_loss(energies, y).item() == 0.0


# E(y) = 2 for class 0; the most offending incorrect answer is class 1 (E = 1); class 2 (E = 3) is neither.
GRAD_ENERGIES = [[2.0, 1.0, 3.0]]
MARGIN_LOSSES = {
    "hinge": {},
    "log": {},
    "lvq2": {"saturation": 2.0},
    "mce": {},
    "square_square": {"margin": 2.0},
    "square_exponential": {},
}


@pytest.mark.parametrize("name", ["energy", "perceptron", "nll", *MARGIN_LOSSES])
def test_gradient_pushes_correct_down_and_offending_up(name):
    energies = torch.tensor(GRAD_ENERGIES, requires_grad=True)
    get_ebm_loss(name, **MARGIN_LOSSES.get(name, {}))(energies, torch.tensor([0])).backward()
    grad = energies.grad[0]
    assert grad[0] > 0  # gradient descent lowers E(x, y)
    if name == "energy":
        assert grad[1] == 0 and grad[2] == 0
    else:
        assert grad[1] < 0  # ... and raises E(x, ȳ)
    if name in MARGIN_LOSSES or name == "perceptron":
        assert grad[2] == 0  # only the most offending incorrect answer is touched
    if name == "nll":
        assert grad[2] < 0  # NLL pulls up every incorrect answer
        assert grad.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_get_ebm_loss_binds_kwargs_and_normalises_names():
    assert get_ebm_loss("nll") is nll_loss
    assert get_ebm_loss("MMI") is nll_loss
    bound = get_ebm_loss("Square-Square", margin=2.0)
    assert bound(ENERGIES, LABELS).item() == pytest.approx(square_square_loss(ENERGIES, LABELS, margin=2.0).item())
    assert set(EBM_LOSSES) >= {"energy", "perceptron", "hinge", "log", "lvq2", "mce", "nll"}


def test_get_ebm_loss_errors():
    with pytest.raises(ValueError, match=r"unknown EBM loss 'focal'; valid names: .*hinge.*nll"):
        get_ebm_loss("focal")
    with pytest.raises(ValueError, match=r"unexpected argument\(s\) beta; it accepts: margin"):
        get_ebm_loss("hinge", beta=2.0)
    with pytest.raises(ValueError, match="it accepts: none"):
        get_ebm_loss("log", margin=1.0)


@pytest.mark.parametrize("name", sorted(EBM_LOSSES))
def test_input_validation(name):
    loss = EBM_LOSSES[name]
    with pytest.raises(ValueError, match=r"expected energies of shape \[B, C\], got shape \(3,\)"):
        loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected labels of shape \[2\], got shape \(3,\)"):
        loss(ENERGIES, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).* got labels in \[0, 3\]"):
        loss(ENERGIES, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"got labels in \[-1, 0\]"):
        loss(ENERGIES, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integer class labels"):
        loss(ENERGIES, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("fn", [hinge_loss, log_loss, lvq2_loss, mce_loss, square_square_loss, square_exponential_loss])
def test_losses_needing_an_incorrect_answer_reject_one_class(fn):
    with pytest.raises(ValueError, match=r"at least 2 classes .*C=1"):
        fn(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))


def test_single_class_is_fine_without_an_incorrect_answer():
    energies, y = torch.tensor([[3.0], [1.0]]), torch.zeros(2, dtype=torch.long)
    assert nll_loss(energies, y).item() == pytest.approx(0.0)
    assert perceptron_loss(energies, y).item() == 0.0
    assert energy_loss(energies, y).item() == pytest.approx(2.0)


def test_hyperparameter_validation():
    with pytest.raises(ValueError, match=r"beta must be > 0, got 0\.0"):
        nll_loss(ENERGIES, LABELS, beta=0.0)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        square_exponential_loss(ENERGIES, LABELS, gamma=-1.0)
    with pytest.raises(ValueError, match="saturation must be > 0"):
        lvq2_loss(ENERGIES, LABELS, saturation=0.0)


def test_contrastive_divergence_value_and_gradient():
    e_data = torch.tensor([1.0, -1.0, 3.0], requires_grad=True)
    e_sample = torch.tensor([2.0, 4.0], requires_grad=True)
    loss = contrastive_divergence_loss(e_data, e_sample)
    assert loss.item() == pytest.approx(1.0 - 3.0)
    loss.backward()
    torch.testing.assert_close(e_data.grad, torch.full((3,), 1 / 3))  # lowers data energies
    torch.testing.assert_close(e_sample.grad, torch.full((2,), -1 / 2))  # raises sample energies


def test_energy_l2_regularization_value():
    e_data = torch.tensor([1.0, -3.0])
    e_sample = torch.tensor([2.0])
    assert energy_l2_regularization(e_data, e_sample).item() == pytest.approx((1 + 9) / 2 + 4)
    assert energy_l2_regularization(torch.zeros(5), torch.zeros(2)).item() == 0.0


@pytest.mark.parametrize("fn", [contrastive_divergence_loss, energy_l2_regularization])
def test_generative_terms_validate_shapes(fn):
    with pytest.raises(ValueError, match=r"expected e_data of shape \[N\], got shape \(2, 3\)"):
        fn(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"expected e_sample of shape \[N\]"):
        fn(torch.zeros(2), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="e_sample is empty"):
        fn(torch.zeros(2), torch.zeros(0))


# ----------------------------------------------------------------------------------------------------------
# the whole objective, on hand-made logits


def _logits(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_jem_objective_is_the_weighted_sum_of_its_closed_form_terms():
    from jemkit.losses import JEMLogits, jem_objective, objective_weights

    data = _logits([2.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    sample = _logits([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])  # E = -T log 3 at T = 1
    sample_y = _logits([1.0, 0.0, 0.0], [0.0, 0.0, 3.0])
    y, y_sample = torch.tensor([0, 1]), torch.tensor([0, 2])
    weights = objective_weights({"ce": 0.5, "px": 2.0, "pxy": 1.5, "energy_l2": 0.25})
    loss, stats = jem_objective(JEMLogits(data, data, sample, sample_y), y, y_sample, weights)
    e_data = -torch.logsumexp(data, 1)
    e_sample = torch.full((2,), -math.log(3.0))
    expected = {
        "ce": F.cross_entropy(data, y),
        "px": e_data.mean() - e_sample.mean(),
        "energy_l2": e_data.square().mean() + e_sample.square().mean(),
        "pxy": -torch.tensor([2.0, 1.0]).mean() - (-torch.tensor([1.0, 3.0])).mean(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(stats[name], value)
    total = 0.5 * expected["ce"] + 2.0 * expected["px"] + 0.25 * expected["energy_l2"] + 1.5 * expected["pxy"]
    torch.testing.assert_close(loss, total)
    torch.testing.assert_close(stats["energy_gap"], -expected["px"])


def test_jem_objective_leaves_out_absent_and_zero_weight_terms_and_uses_margins_on_outliers():
    from jemkit.losses import JEMLogits, jem_objective, objective_weights

    data, outlier = _logits([4.0, 0.0], [0.0, 4.0]), _logits([0.0, 0.0], [0.0, 0.0])
    y = torch.tensor([0, 1])
    ce_only, stats = jem_objective(JEMLogits(data, data), y, weights=objective_weights({"px": 0.0}))
    torch.testing.assert_close(ce_only, F.cross_entropy(data, y))
    assert "px" not in stats and "margin" not in stats
    weights = objective_weights({"px": 0.0, "margin": 1.0})
    loss, stats = jem_objective(JEMLogits(data, data, outlier=outlier), y, weights=weights, margins=(-5.0, 0.0))
    e_in, e_out = -torch.logsumexp(data, 1), -torch.logsumexp(outlier, 1)
    margin = F.relu(e_in + 5.0).square().mean() + F.relu(0.0 - e_out).square().mean()
    torch.testing.assert_close(stats["margin"], margin)
    torch.testing.assert_close(loss, F.cross_entropy(data, y) + margin)


def test_jem_objective_refuses_conditional_samples_without_their_labels_and_bad_weights():
    from jemkit.losses import JEMLogits, jem_objective, objective_weights

    data = _logits([1.0, 0.0])
    with pytest.raises(ValueError, match="need the labels they were drawn for"):
        jem_objective(JEMLogits(data, data, sample_y=data), torch.tensor([0]), weights=objective_weights(None))
    with pytest.raises(ValueError, match=r"unknown objective weight\(s\) \['p_x'\]"):
        objective_weights({"p_x": 1.0})
    with pytest.raises(ValueError, match="weight 'ce' must be a finite number >= 0, got -1"):
        objective_weights({"ce": -1})
