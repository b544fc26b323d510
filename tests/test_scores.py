import pytest
import torch
from torch import nn

from jemkit.scores import SCORES, ood_scores


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
