"""Test-time adaptation: only the normalisation layers' affine parameters move, reset restores them bit for bit,
Tent lowers the entropy and the energy adaptation the energy gap of a shifted batch, and both run inside Lightning's
test and predict loops (inference mode on or off)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jemkit import JEM, SGLD, InputDomain, ReplayBuffer
from jemkit.adapt import EnergyAdaptation, Tent, make_adapter, norm_parameters
from jemkit.models import MLP, SmallCNN
from tests.helpers import TinyMLP, loader, trainer


def _bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=3, in_channels=1, width=4, norm="batch")
    with torch.no_grad():  # running statistics that differ from any batch's, so that using them would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def _batch(n: int = 16, seed: int = 1, shift: float = 0.0) -> torch.Tensor:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return (x * 0.3 + shift).clamp(-1, 1)  # low contrast, moved: a shifted batch


def _quick_energy(model: nn.Module, **kwargs) -> EnergyAdaptation:
    return EnergyAdaptation(
        model, sampler=SGLD(n_steps=3, step_size=0.1, noise_std=0.01, clip=(-1, 1)), capacity=64, **kwargs
    )


@pytest.mark.parametrize("method", ["tent", "energy"])
def test_only_the_normalisation_layers_affine_parameters_change(method):
    model = _bn_cnn()
    before = copy.deepcopy(model.state_dict())
    adapter = (
        make_adapter(method, model, lr=1e-2, steps=2) if method == "tent" else _quick_energy(model, lr=1e-2, steps=2)
    )
    flags = {name: m.training for name, m in model.named_modules()}
    adapter(_batch())
    named = set(norm_parameters(model))
    assert named == {f"features.{i}.1.{p}" for i in range(3) for p in ("weight", "bias")}
    assert set(adapter.parameter_names) == named
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == named  # running statistics and every other weight untouched
    assert all(p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_reset_restores_the_model_bit_for_bit_and_the_clean_figures():
    model = _bn_cnn()
    saved = copy.deepcopy(model.state_dict())
    x_clean, x_shifted = _batch(seed=3), _batch(seed=4, shift=0.4)
    tent = Tent(model, lr=0.05)
    first = tent(x_clean)  # batch statistics, one update
    for _ in range(5):
        tent(x_shifted)
    assert not torch.equal(tent(x_clean), first)
    tent.reset()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x_clean), _bn_cnn()(x_clean))  # the trained model's own figures again
    assert torch.equal(tent(x_clean), first)  # and the adapter starts over exactly (optimiser state forgotten)


def test_episodic_mode_resets_before_every_batch():
    model = _bn_cnn()
    episodic, continual = Tent(model, mode="episodic", lr=0.05), Tent(_bn_cnn(), lr=0.05)
    x = _batch(shift=0.3)
    assert torch.equal(episodic(x), episodic(x))
    assert not torch.equal(continual(x), continual(x))


def test_batch_statistics_follow_tent_and_can_be_turned_off():
    x = _batch(shift=0.5)
    model = _bn_cnn()
    with torch.no_grad():
        running = model(x)
        model.train()
        batch_stats = model(x)
        model.eval()
    plain = Tent(model, lr=1e-12)  # an update too small to matter: the prediction shows the statistics used
    torch.testing.assert_close(plain(x), batch_stats, atol=1e-4, rtol=1e-4)
    kept = Tent(_bn_cnn(), lr=1e-12, batch_statistics=False)
    torch.testing.assert_close(kept(x), running, atol=1e-4, rtol=1e-4)


def _entropy(logits: torch.Tensor) -> float:
    log_p = logits.log_softmax(1)
    return float(-(log_p.exp() * log_p).sum(1).mean())


def test_tent_lowers_the_entropy_of_a_shifted_batch():
    x = _batch(n=32, shift=0.4)
    tent = Tent(_bn_cnn(), lr=0.05)
    entropies = [_entropy(tent(x)) for _ in range(6)]
    assert entropies[-1] < entropies[0] - 0.05


def test_energy_adaptation_lowers_the_energy_gap():
    torch.manual_seed(0)
    x = _batch(n=32, shift=0.4)
    adapter = _quick_energy(_bn_cnn(), lr=0.05)
    negatives = torch.rand(32, 1, 8, 8) * 2 - 1  # fixed, so that the gap is comparable from step to step
    gaps = []
    for _ in range(6):
        with torch.no_grad(), adapter._normalisation():
            gaps.append(float(adapter.energy_gap(x, negatives)))
        adapter(x)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < gaps[0] - 0.005
    assert adapter.buffer.is_initialized and adapter.buffer.samples.shape == (64, 1, 8, 8)
    assert float(adapter.buffer.samples.abs().max()) <= 1.0  # chains stay in the domain's box


def test_a_classifier_without_normalisation_layers_is_refused():
    with pytest.raises(ValueError, match="TinyMLP has no normalisation layer with affine parameters"):
        Tent(TinyMLP(in_features=4))
    with pytest.raises(ValueError, match="has no normalisation layer"):
        EnergyAdaptation(JEM(SmallCNN(num_classes=3, width=4)))
    with pytest.raises(ValueError, match="unknown adaptation method 'bn'"):
        make_adapter("bn", _bn_cnn())
    with pytest.raises(ValueError, match="mode must be one of"):
        Tent(_bn_cnn(), mode="online")


def test_layer_norm_and_group_norm_are_adapted():
    mlp = MLP(num_features=6, num_classes=3, norm="layer")
    tent = Tent(mlp, lr=0.05)
    before = copy.deepcopy(mlp.state_dict())
    tent(torch.randn(8, 6))
    assert {k for k, v in mlp.state_dict().items() if not torch.equal(v, before[k])} == set(norm_parameters(mlp))
    cnn = SmallCNN(num_classes=3, width=4, norm="group")
    assert len(_quick_energy(cnn).parameter_names) == 6


def test_a_jem_is_adapted_through_its_classifier_and_domain():
    jem = JEM(_bn_cnn(), domain=InputDomain(low=-2, high=2), temperature=2.0)
    adapter = _quick_energy(jem)
    assert adapter.chains.domain is jem.domain and adapter.temperature == 2.0
    assert not hasattr(adapter, "domain")  # the JEM's own domain, not registered twice
    x = _batch()
    torch.testing.assert_close(adapter.energy(x), -2.0 * torch.logsumexp(jem(x) / 2.0, dim=1))
    adapter(x)
    assert set(adapter.parameter_names) == set(norm_parameters(jem.classifier))


@pytest.mark.parametrize("inference_mode", [True, False])
def test_trainer_test_and_predict_adapt_on_every_batch(tmp_path, inference_mode):
    x = _batch(n=24, shift=0.3)
    y = torch.randint(0, 3, (24,))
    model = _bn_cnn()
    before = copy.deepcopy(model.state_dict())
    adapter = _quick_energy(model, lr=1e-2)
    run = trainer(tmp_path, inference_mode=inference_mode)
    metrics = run.test(adapter, loader(x, y, batch_size=8), verbose=False)[0]
    assert set(metrics) == {"test/acc", "test/nll", "test/brier", "test/ece", "test/mce"}
    assert not torch.equal(model.features[0][1].weight, before["features.0.1.weight"])
    probs = torch.cat(run.predict(adapter, loader(x, y, batch_size=8)))
    assert probs.shape == (24, 3) and torch.allclose(probs.sum(1), torch.ones(24))


def test_adapts_inside_inference_mode():
    tent = Tent(_bn_cnn(), lr=0.05)
    x = _batch(shift=0.3)
    with torch.inference_mode():
        first = tent(x)
        second = tent(x)
    assert not torch.equal(first, second) and not first.is_inference()


def test_shift_report_leaves_the_adapted_model_as_it_came():
    from torch.utils.data import TensorDataset

    from jemkit.evaluate.shift import shift_report

    model = _bn_cnn()
    saved = copy.deepcopy(model.state_dict())
    data = TensorDataset(_batch(n=20), torch.randint(0, 3, (20,)))
    with_tent = shift_report(model, data, adapt=Tent(model, lr=0.05), shifts=["contrast"], severities=[5])
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    again = shift_report(model, data, adapt=Tent(model, lr=0.05), shifts=["contrast"], severities=[5])
    assert again["results"] == with_tent["results"] and again["clean"] == with_tent["clean"]
    by_name = shift_report(model, data, adapt="tent", shifts=["contrast"], severities=[5])  # Tent's defaults
    built = shift_report(model, data, adapt=Tent(model), shifts=["contrast"], severities=[5])
    assert by_name["adapt"].startswith("Tent(") and by_name["results"] == built["results"]


def test_chains_can_start_from_the_jems_own_buffer_and_persist_across_resets():
    jem = JEM(_bn_cnn(), buffer=ReplayBuffer(capacity=40, input_shape=(1, 8, 8)))
    jem.buffer.samples = torch.linspace(-1, 1, 40).view(40, 1, 1, 1).expand(40, 1, 8, 8).clone()  # recognisable
    adapter = _quick_energy(jem, from_model_buffer=True)
    adapter._prepare_chains(_batch())
    firsts = adapter.buffer.samples[:, 0, 0, 0]
    assert bool(torch.isin(firsts, jem.buffer.samples[:, 0, 0, 0]).all())
    adapter(_batch())
    moved = adapter.buffer.samples.clone()
    adapter.reset()
    assert torch.equal(adapter.buffer.samples, moved)  # TEA's chains live on across resets
    fresh = _quick_energy(_bn_cnn(), persistent_chains=False)
    fresh(_batch())
    start = fresh._saved_chains.clone()
    fresh(_batch())
    fresh.reset()
    assert torch.equal(fresh.buffer.samples, start)
