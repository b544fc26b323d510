import pytest
import torch
from torch import nn

from jemkit.classifier import has_batchnorm, is_mode_sensitive, sampling_context, select_logits


def test_select_logits_from_tensor_dict_tuple_and_callable():
    logits = torch.randn(2, 3)
    assert select_logits(logits) is logits
    assert select_logits({"logits": logits, "aux": 0}, "logits") is logits
    assert select_logits((logits, torch.zeros(2)), 0) is logits
    assert select_logits({"out": [logits]}, lambda o: o["out"][0]) is logits


def test_select_logits_errors_name_the_fix():
    with pytest.raises(TypeError, match=r"dict with keys \['logits', 'aux'\]: pass output_key"):
        select_logits({"logits": torch.zeros(1, 2), "aux": torch.zeros(1)})
    with pytest.raises(TypeError, match="tuple of 2: pass output_key"):
        select_logits((torch.zeros(1, 2), torch.zeros(1)))
    with pytest.raises(ValueError, match="output_key='missing'"):
        select_logits({"logits": torch.zeros(1, 2)}, "missing")


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3))


def test_mode_detection():
    assert has_batchnorm(_bn_model()) and is_mode_sensitive(_bn_model())
    plain = nn.Sequential(nn.Linear(2, 3), nn.Dropout())
    assert not has_batchnorm(plain) and is_mode_sensitive(plain)
    assert not is_mode_sensitive(nn.Linear(2, 3))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sampling_context_restores_modes_and_running_stats(mode):
    model = _bn_model()
    model.train()
    model[2].eval()  # a user-chosen per-layer mode must survive
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with sampling_context(model, mode):
        assert bn.training == (mode == "train")
        model(torch.randn(16, 2) * 5 + 3)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])


def test_a_bad_sampling_mode_is_refused_once_where_it_is_resolved():
    from jemkit.classifier import resolve_sampling_mode

    with pytest.raises(ValueError, match="sampling_mode must be 'auto', 'eval' or 'train', got 'batch'"):
        resolve_sampling_mode("batch", nn.Linear(1, 1))
