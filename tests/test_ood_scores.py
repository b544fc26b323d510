import pytest
import torch
from torch import nn

from jemkit.ood.scores import SCORES, ood_scores


def test_scores_on_a_linear_model_match_closed_forms():
    model = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    s = ood_scores(model, x)
    assert list(s) == list(SCORES)
    logits = model(x)
    torch.testing.assert_close(s["logpx"], torch.logsumexp(logits, 1).detach())
    torch.testing.assert_close(s["msp"], logits.softmax(1).max(1).values.detach())
    torch.testing.assert_close(s["max_logit"], logits.max(1).values.detach())
    # d/dx logsumexp(Wx + b) = W^T softmax(Wx + b)
    grad = logits.softmax(1).detach() @ model.weight.detach()
    torch.testing.assert_close(s["grad_norm"], -grad.norm(dim=1))


def test_scores_work_in_inference_mode_and_leave_parameters_alone():
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.inference_mode():
        s = ood_scores(model, torch.randn(4, 2), scores=["grad_norm", "msp"])
    assert list(s) == ["grad_norm", "msp"] and (s["grad_norm"] <= 0).all()
    assert all(p.grad is None for p in model.parameters())


def test_temperature_and_unknown_score():
    model = nn.Linear(2, 3)
    x = torch.randn(4, 2)
    hot = ood_scores(model, x, ["logpx"], temperature=2.0)["logpx"]
    torch.testing.assert_close(hot, 2.0 * torch.logsumexp(model(x) / 2.0, 1).detach())
    with pytest.raises(ValueError, match=r"unknown OOD score\(s\) \['energy'\]"):
        ood_scores(model, x, ["energy"])


def test_the_fused_score_sums_scores_standardised_on_the_reference():
    from jemkit.ood.scores import FusedScore

    reference = {"logpx": torch.tensor([1.0, 3.0]), "mahalanobis": torch.tensor([-10.0, -30.0, -20.0])}
    fused = FusedScore.fit(reference, parts=("logpx", "mahalanobis"))
    sd_logpx, sd_maha = 2**0.5, 10.0  # sample standard deviations of the reference
    assert set(fused.stats) == {"logpx", "mahalanobis"}
    assert fused.stats["logpx"] == pytest.approx((2.0, sd_logpx))
    assert fused.stats["mahalanobis"] == pytest.approx((-20.0, sd_maha))
    scores = {"logpx": torch.tensor([2.0, 2.0 + sd_logpx]), "mahalanobis": torch.tensor([-20.0, -20.0 - sd_maha])}
    # one sd up in one part, one down in the other
    assert torch.allclose(fused(scores), torch.tensor([0.0, 0.0]), atol=1e-6)
    assert set(fused.add_to(scores)) == {"logpx", "mahalanobis", "fused"}
    constant = FusedScore.fit({"logpx": torch.ones(4)}, parts=("logpx",))
    assert constant.stats["logpx"] == (1.0, 1.0)  # a constant part only shifts the sum
    with pytest.raises(ValueError, match=r"needs the scores \['knn'\]"):
        FusedScore.fit(reference, parts=("logpx", "knn"))
