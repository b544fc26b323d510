import pytest
import torch

from jemkit.energy import energy_matrix, joint_energy, log_px, log_py_given_x, marginal_energy


def test_softmax_is_ratio_of_boltzmann_factors():
    logits = torch.randn(5, 4)
    for temperature in (0.5, 1.0, 3.0):
        e_xy = energy_matrix(logits, temperature)
        e_x = marginal_energy(logits, temperature)
        # p(y|x) = exp(-E(x,y)) / sum_y exp(-E(x,y)) and at T=1 sum_y exp(-E(x,y)) = exp(-E(x))
        ratio = torch.exp(-e_xy) / torch.exp(-e_x / temperature)[:, None]
        torch.testing.assert_close(ratio, torch.softmax(logits / temperature, 1))
        torch.testing.assert_close(log_py_given_x(logits, temperature).exp(), torch.softmax(logits / temperature, 1))


def test_temperature_one_recovers_classifier():
    logits = torch.randn(6, 3)
    torch.testing.assert_close(
        torch.exp(-energy_matrix(logits)) / torch.exp(-marginal_energy(logits))[:, None], logits.softmax(1)
    )
    torch.testing.assert_close(log_px(logits), torch.logsumexp(logits, 1))


def test_joint_energy_picks_label():
    logits = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = torch.tensor([2, 0])
    torch.testing.assert_close(joint_energy(logits, y), torch.tensor([-3.0, -4.0]))
    torch.testing.assert_close(joint_energy(logits, y, temperature=2.0), torch.tensor([-1.5, -2.0]))


def test_marginal_energy_stable_for_large_logits():
    logits = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, -1e4]])
    e = marginal_energy(logits)
    assert torch.isfinite(e).all()
    torch.testing.assert_close(e[0], -(torch.tensor(1e4) + torch.log1p(torch.exp(torch.tensor(-1.0)))))
    torch.testing.assert_close(e[1], torch.tensor(1e4 - torch.log(torch.tensor(3.0)).item()))
    assert torch.isfinite(log_py_given_x(logits)).all()


def test_marginal_energy_is_soft_minimum_of_joint_energies():
    logits = torch.randn(8, 5) * 3
    e_x = marginal_energy(logits)
    assert (e_x <= energy_matrix(logits).min(1).values + 1e-6).all()
    # low temperature -> hard minimum
    torch.testing.assert_close(
        marginal_energy(logits, 1e-3), energy_matrix(logits, 1.0).min(1).values, atol=1e-2, rtol=0
    )


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        marginal_energy(torch.randn(2, 3), bad)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"shape \[B, C\]"):
        marginal_energy(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="labels of shape"):
        joint_energy(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="Tensor of logits"):
        marginal_energy((torch.randn(2, 3),))
