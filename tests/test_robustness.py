import importlib.util
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jemkit import JEM, MALA, PYLD, SGLD, ReplayBuffer
from jemkit.data import DigitsDataModule
from jemkit.evaluate.calibration import CalibrationOptions
from jemkit.evaluate.command import build_parser
from jemkit.evaluate.report import evaluate, format_report
from jemkit.evaluate.robustness.accuracy import RobustnessOptions, robust_accuracy
from jemkit.evaluate.robustness.attacks import autoattack, gaussian_noise_corruption, pgd_attack
from jemkit.evaluate.robustness.config import attack_list
from jemkit.evaluate.robustness.defense import Defense, jem_defense
from jemkit.evaluate.robustness.threat import threat_model
from jemkit.evaluate.samples import SampleOptions
from jemkit.ood.pipeline import OODOptions
from jemkit.sampling.unrolled import unrolled_refine as unrolled_purify

BOX = (-1.0, 1.0)  # the inputs' range: attack functions assume none
HAS_TORCHATTACKS = importlib.util.find_spec("torchattacks") is not None


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny matrices gain nothing from threads, and on a busy machine thread hand-offs cost seconds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, TensorDataset]:
    """A small MLP trained for 100 full-batch Adam steps on the digits (about 0.2 s), and the test split."""
    torch.manual_seed(0)
    dm = DigitsDataModule()
    dm.setup("fit")
    x, y = dm.train_dataset.tensors
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, dm.test_dataset


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.3), ("l2", 1.5)])
def test_pgd_breaks_an_undefended_classifier(digits, norm, eps):
    model, test = digits
    x, y = test.tensors
    clean = _accuracy(model, x, y)
    assert clean > 0.9
    x_adv = pgd_attack(model, x, y, eps=eps, norm=norm, steps=10, clip=BOX)
    assert _accuracy(model, x_adv, y) < clean / 2


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_adversarial_examples_stay_in_the_ball_and_the_data_range(digits, norm, eps):
    model, test = digits
    x, y = test.tensors
    x_adv = pgd_attack(model, x, y, eps=eps, norm=norm, steps=5, step_size=eps, restarts=2, clip=BOX)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= -1.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()
    assert (size > 0.5 * eps).float().mean() > 0.5, "most examples should use a good part of the budget"


def test_eps_zero_changes_nothing(digits):
    model, test = digits
    x, y = test.tensors
    assert torch.equal(pgd_attack(model, x, y, eps=0.0, clip=BOX), x)
    rows = robust_accuracy(
        model, DataLoader(test, batch_size=100), [{"kind": "clean"}, {"kind": "pgd", "eps": 0}], progress=False
    )
    assert rows[0]["accuracy"] == rows[1]["accuracy"] == pytest.approx(_accuracy(model, x, y))


def test_restarts_never_weaken_the_attack(digits):
    model, test = digits
    x, y = test.tensors
    fooled = {}
    for restarts in (1, 3):
        torch.manual_seed(123)
        x_adv = pgd_attack(model, x, y, eps=0.1, norm="linf", steps=3, restarts=restarts, clip=BOX)
        with torch.no_grad():
            fooled[restarts] = model(x_adv).argmax(1) != y
    # the first restart replays the single-restart run, later ones only replace examples that were not yet fooled
    assert (fooled[3] | ~fooled[1]).all()
    assert fooled[3].sum() >= fooled[1].sum() > 0


def test_any_callable_can_be_attacked(digits):
    model, test = digits
    x, y = test.tensors[0][:64], test.tensors[1][:64].int()
    torch.manual_seed(5)
    from_module = pgd_attack(model, x, y, eps=0.2, norm="l2", steps=3, clip=BOX)
    torch.manual_seed(5)
    from_function = pgd_attack(lambda t: model(t), x, y, eps=0.2, norm="l2", steps=3, clip=BOX)
    assert torch.equal(from_module, from_function)


class _ModeRecorder(nn.Module):
    """A classifier with dropout and batch norm that records its training flag on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.5))
        self.head = nn.Linear(16, 10)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.head(self.net(x))


def test_attack_leaves_parameters_and_modes_alone(digits):
    _, test = digits
    x, y = test.tensors[0][:32], test.tensors[1][:32]
    model = _ModeRecorder()
    model.train()
    model.head.eval()  # a mixed state must come back exactly
    model.head.weight.grad = torch.ones_like(model.head.weight)
    running_mean = model.net[2].running_mean.clone()
    pgd_attack(model, x, y, eps=0.1, steps=2, restarts=2, clip=BOX)
    rows = robust_accuracy(model, [(x, y)], [{"kind": "pgd", "eps": 0.1, "steps": 2}], progress=False)
    assert rows[0]["n"] == 32
    assert model.modes and not any(model.modes), "the model must run in eval mode during attacks and scoring"
    assert model.training and model.net.training and model.net[2].training and not model.head.training
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "head.weight")
    assert torch.equal(model.net[2].running_mean, running_mean)


def test_robust_accuracy_rows_and_identity_defense(digits):
    model, test = digits
    loader = DataLoader(test, batch_size=64)
    attacks = [
        {"kind": "clean"},
        {"kind": "noise", "std": 0.2},
        {"kind": "pgd", "norm": "linf", "eps": 0.3, "steps": 5, "restarts": 1},
        {"kind": "pgd", "norm": "l2", "eps": 1.0, "steps": 5},
    ]
    torch.manual_seed(0)
    rows = robust_accuracy(model, loader, attacks, defense=lambda x: x.clone(), progress=False)
    assert [row["attack"] for row in rows] == ["clean", "noise", "pgd-linf", "pgd-l2"]
    accuracies = ("accuracy", "transfer_accuracy", "bpda_accuracy", "defended_accuracy")
    assert rows[2] | dict.fromkeys(accuracies) == {
        "attack": "pgd-linf",
        "eps": 0.3,
        "eps_01": pytest.approx(0.15),
        "steps": 5,
        "restarts": 1,
        "std": None,
        "std_01": None,
        **dict.fromkeys(accuracies),
        "unrolled_accuracy": None,  # a plain callable has no known gradient: BPDA only
        "fixed_noise_accuracy": None,  # deterministic: no control
        "n": len(test),
    }
    assert rows[1]["std"] == 0.2 and rows[1]["std_01"] == pytest.approx(0.1) and rows[1]["eps"] is None
    for row in rows:
        assert row["n"] == len(test) == 270
        assert row["transfer_accuracy"] == row["accuracy"]  # the identity changes nothing
        assert row["defended_accuracy"] <= row["transfer_accuracy"]
    for row in rows[:2]:  # nothing to adapt to: the defence applied to clean or noisy inputs
        assert row["bpda_accuracy"] is None and row["defended_accuracy"] == row["transfer_accuracy"]
    for row in rows[2:]:  # through the identity, BPDA is PGD on the model itself (another random start)
        assert row["bpda_accuracy"] == pytest.approx(row["accuracy"], abs=0.05)
        assert row["defended_accuracy"] <= min(row["bpda_accuracy"], row["transfer_accuracy"])
    assert rows[2]["accuracy"] < rows[0]["accuracy"] / 2

    undefended = robust_accuracy(model, loader, attacks[:1], progress=False, max_batches=2)
    assert undefended[0]["defended_accuracy"] is None and undefended[0]["transfer_accuracy"] is None
    assert undefended[0]["n"] == 128


def test_a_defense_is_applied_to_the_attacked_inputs(digits):
    model, test = digits
    x, y = test.tensors
    seen: list[torch.Tensor] = []

    def defense(x_attacked: torch.Tensor) -> torch.Tensor:
        seen.append(x_attacked)
        return x  # an oracle that restores the clean batch (the loader yields the whole split at once)

    attacks = [{"kind": "pgd", "eps": 0.3}]
    rows = robust_accuracy(model, [(x, y)], attacks, defense=defense, progress=False, adaptive=[])
    assert len(seen) == 1 and not torch.equal(seen[0], x)
    assert rows[0]["defended_accuracy"] == rows[0]["transfer_accuracy"] == pytest.approx(_accuracy(model, x, y))
    assert rows[0]["accuracy"] < rows[0]["defended_accuracy"] / 2
    # no attack beats an oracle, BPDA neither: its forward pass goes through the defence
    rows = robust_accuracy(model, [(x, y)], attacks, defense=defense, progress=False)
    assert len(seen) > 2 and rows[0]["bpda_accuracy"] == rows[0]["defended_accuracy"] == pytest.approx(
        _accuracy(model, x, y)
    )


def test_gaussian_noise_corruption():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert torch.equal(gaussian_noise_corruption(x, 0.0, clip=BOX), x)
    noisy = gaussian_noise_corruption(x, 0.5, generator=torch.Generator().manual_seed(1), clip=BOX)
    assert noisy.shape == x.shape and noisy.min() >= -1 and noisy.max() <= 1 and not torch.equal(noisy, x)
    assert torch.equal(noisy, gaussian_noise_corruption(x, 0.5, generator=torch.Generator().manual_seed(1), clip=BOX))
    unclipped = gaussian_noise_corruption(torch.zeros(20000), 0.5, clip=None)
    assert 0.48 < float(unclipped.std()) < 0.52


def test_argument_errors(digits):
    model, test = digits
    x, y = test.tensors[0][:4], test.tensors[1][:4]
    with pytest.raises(ValueError, match="unknown norm 'l1'; expected one of 'linf', 'l2'"):
        pgd_attack(model, x, y, eps=0.1, norm="l1", clip=BOX)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -0\.1"):
        pgd_attack(model, x, y, eps=-0.1, clip=BOX)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        pgd_attack(model, x, y, eps=0.1, steps=0, clip=BOX)
    with pytest.raises(ValueError, match="restarts must be an integer >= 1"):
        pgd_attack(model, x, y, eps=0.1, restarts=0, clip=BOX)
    with pytest.raises(ValueError, match="step_size must be None or a finite number > 0"):
        pgd_attack(model, x, y, eps=0.1, step_size=0.0, clip=BOX)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'clip'"):
        pgd_attack(model, x, y, eps=0.1)
    with pytest.raises(ValueError, match="clip must be None or"):
        pgd_attack(model, x, y, eps=0.1, clip=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"expected labels of shape \[4\]"):
        pgd_attack(model, x, y[:3], eps=0.1, clip=BOX)
    with pytest.raises(ValueError, match="std must be a finite number >= 0, got -1"):
        gaussian_noise_corruption(x, -1, clip=BOX)

    def run(*attacks):
        return robust_accuracy(model, [(x, y)], list(attacks), progress=False)

    with pytest.raises(
        ValueError, match=r"unknown attack kind 'fgsm'; expected one of 'clean', 'noise'.*in the attack"
    ):
        run({"kind": "fgsm", "eps": 0.1})
    with pytest.raises(ValueError, match=r"a 'pgd' attack needs \['eps'\] \(or eps_01 on \[0, 1\] inputs\)"):
        run({"kind": "pgd"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['esp'\] for a 'pgd' attack"):
        run({"kind": "pgd", "esp": 0.1})
    with pytest.raises(ValueError, match="std must be a finite number >= 0"):
        run({"kind": "noise", "std": -0.5})
    with pytest.raises(ValueError, match="unknown norm 'l3'"):
        run({"kind": "pgd", "eps": 0.1, "norm": "l3"})
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        run({"kind": "pgd", "eps": 0.1, "steps": 0})
    with pytest.raises(ValueError, match="at least one attack"):
        run()
    with pytest.raises(ValueError, match="max_batches must be an integer >= 1"):
        robust_accuracy(model, [(x, y)], [{"kind": "clean"}], progress=False, max_batches=0)
    with pytest.raises(ValueError, match="no examples"):
        robust_accuracy(model, [], [{"kind": "clean"}], progress=False)


# ---------------------------------------------------------------------------------------------------- through a defence
def _tiny_jem(sampler, in_features: int = 2, num_classes: int = 3, dtype: torch.dtype = torch.float32) -> JEM:
    """An untrained MLP JEM: purification needs an energy, not a good one."""
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Linear(in_features, 16), nn.SiLU(), nn.Linear(16, num_classes))
    jem = JEM(classifier, sampler=sampler, buffer=ReplayBuffer(capacity=8, input_shape=(in_features,)))
    return jem.to(dtype).eval()


def test_unrolled_gradient_matches_finite_differences():
    jem = _tiny_jem(SGLD(n_steps=5, step_size=0.5, noise_std=0.0), dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    for checkpoint in (True, False):
        purify = lambda t, checkpoint=checkpoint: unrolled_purify(jem, t, 4, checkpoint=checkpoint)  # noqa: E731
        assert torch.autograd.gradcheck(purify, (x,), eps=1e-6, atol=1e-7)
    jacobian = torch.autograd.functional.jacobian(lambda t: unrolled_purify(jem, t, 4), x[:1]).reshape(2, 2)
    assert (jacobian - torch.eye(2, dtype=torch.float64)).abs().max() > 1e-3, "the defence is not the identity"


def test_unrolled_purify_is_jem_purify_with_a_gradient():
    jem = _tiny_jem(PYLD(n_steps=5, step_size=0.2, noise_std=0.05))  # clamps, and noise the recomputation must replay
    x = torch.rand(16, 2) * 2 - 1
    weights = torch.randn(16, 2)
    torch.manual_seed(1)
    expected = jem.purify(x, 6)
    grads = []
    for checkpoint in (True, False):
        torch.manual_seed(1)
        x_in = x.clone().requires_grad_(True)
        out = unrolled_purify(jem, x_in, 6, checkpoint=checkpoint)
        assert torch.allclose(out, expected, atol=1e-6)
        grads.append(torch.autograd.grad((out * weights).sum(), x_in)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-6), "the recomputed steps replay the same noise"
    assert not torch.allclose(grads[0], weights, atol=1e-3)
    torch.manual_seed(1)
    assert torch.equal(unrolled_purify(jem, x, 6), expected)  # nothing to differentiate: the defence itself
    x_in = x.clone().requires_grad_(True)
    assert torch.equal(unrolled_purify(jem, x_in, 0), x)


def test_unrolled_purify_runs_the_classifier_as_purify_does():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 3))
    buffer = ReplayBuffer(capacity=8, input_shape=(2,))
    jem = JEM(classifier, sampler=PYLD(step_size=0.3), buffer=buffer, sampling_mode="train").train()
    running_mean = classifier[1].running_mean.clone()
    x = torch.rand(16, 2) * 2 - 1
    expected = jem.purify(x, 5)  # batch statistics, running ones frozen
    grads = []
    for checkpoint in (True, False):  # the recomputation in the backward pass runs in the same mode
        x_in = x.clone().requires_grad_(True)
        out = unrolled_purify(jem, x_in, 5, checkpoint=checkpoint)
        assert torch.allclose(out, expected, atol=1e-6)
        grads.append(torch.autograd.grad(out.sum(), x_in)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.equal(classifier[1].running_mean, running_mean) and classifier[1].track_running_stats
    assert classifier.training


def _saved_numel(jem: JEM, x: torch.Tensor, n_steps: int, checkpoint: bool) -> int:
    """Elements the autograd graph of the unrolled defence keeps for the backward pass."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unrolled_purify(jem, x.clone().requires_grad_(True), n_steps, checkpoint=checkpoint)
    return saved


def test_checkpointing_keeps_only_the_step_inputs():
    jem = _tiny_jem(PYLD(n_steps=5), in_features=64)
    x = torch.rand(32, 64) * 2 - 1
    stored = {k: _saved_numel(jem, x, k, checkpoint=False) for k in (2, 8)}
    kept = {k: _saved_numel(jem, x, k, checkpoint=True) for k in (2, 8)}
    assert stored[8] > 3 * stored[2], "without checkpointing every step's activations are stored"
    assert kept[8] <= 2 * 8 * x.numel(), "with checkpointing, about one input per step"
    assert kept[8] < stored[8] / 4


class _AffineDomain:
    """Unit coordinates u = (x - 0.5) / 2, as an input domain fitted to data in [-1.5, 2.5] gives them."""

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) / 2.0

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        return u * 2.0 + 0.5


def test_unrolled_purify_runs_in_the_chains_unit_coordinates(monkeypatch):
    jem = _tiny_jem(PYLD(n_steps=5, step_size=0.2))
    domain = _AffineDomain()
    monkeypatch.setattr(jem.chains, "domain", domain, raising=False)
    x = torch.rand(8, 2) * 4 - 1.5
    unit_energy = lambda u: jem.energy(domain.from_unit(u))  # noqa: E731
    expected = domain.from_unit(jem.sampler.sample(unit_energy, domain.to_unit(x), n_steps=40))
    out = unrolled_purify(jem, x.clone().requires_grad_(True), 40)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.min() >= -1.5 - 1e-6 and out.max() <= 2.5 + 1e-6, "PYLD's clamp acts on the domain's box"
    assert (out.detach() - x).abs().max() > 0.4


def test_jem_defense_knows_its_sampler():
    deterministic = jem_defense(_tiny_jem(PYLD(noise_std=0.0)), 10)
    assert deterministic.name == "10 PYLD steps on E(x)" and deterministic.sampler.startswith("PYLD(")
    assert not deterministic.random and deterministic.differentiable is not None
    threat = threat_model(deterministic, clip=BOX)
    assert threat["attacks"] == ["transfer", "bpda", "unrolled"] and threat["eot"] == threat["draws"] == 1
    assert not threat["fixed_noise_control"] and threat["setting"] == "adaptive"
    noisy = jem_defense(_tiny_jem(SGLD(noise_std=0.01)), 3)
    threat = threat_model(noisy, eot=5, clip=BOX)
    assert noisy.random and threat["eot"] == 5 and threat["draws"] == 20 and threat["fixed_noise_control"]
    assert threat["prediction"] == "argmax of the logits averaged over 20 draws"
    mala = jem_defense(_tiny_jem(MALA(n_steps=2)), 3)
    assert (
        mala.random and mala.differentiable is None and threat_model(mala, clip=BOX)["attacks"] == ["transfer", "bpda"]
    )
    assert threat_model(deterministic, adaptive=[], clip=BOX)["setting"].startswith("transfer only")
    assert threat_model(None, clip=BOX)["setting"] == "undefended"


class _CentreAndQuantise:
    """A purifier that masks its gradient: centre the digits and keep steps of 1/8 (bit-depth reduction)."""

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round((x - self.mean) * 8) / 8


@pytest.fixture(scope="module")
def masked() -> tuple[nn.Module, TensorDataset, _CentreAndQuantise]:
    """A classifier trained on purified digits (accurate behind the purifier, whose exact gradient is zero), the
    test split and the purifier."""
    dm = DigitsDataModule()
    dm.setup("fit")
    x, y = dm.train_dataset.tensors
    purify = _CentreAndQuantise(x.mean(0, keepdim=True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(purify(x)), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, dm.test_dataset, purify


def test_bpda_beats_a_transfer_attack_that_a_masking_purifier_fools(masked):
    model, test, purify = masked
    defense = Defense(purify=purify, differentiable=purify, name="quantise")
    attacks = [{"kind": "clean"}, {"kind": "pgd", "norm": "linf", "eps": 0.2, "steps": 10}]
    rows = robust_accuracy(model, [test.tensors], attacks, defense=defense, progress=False)
    clean, pgd = rows
    assert clean["defended_accuracy"] > 0.9
    # the exact gradient of rounding is zero: the unrolled attack never leaves its random start
    assert pgd["unrolled_accuracy"] > clean["defended_accuracy"] - 0.05
    # the transfer attack is computed where the defended model never looks (uncentred, unrounded inputs)
    assert pgd["transfer_accuracy"] > 0.6
    # BPDA differentiates the classifier where it is evaluated: far stronger
    assert pgd["bpda_accuracy"] < pgd["transfer_accuracy"] - 0.25
    assert pgd["defended_accuracy"] <= pgd["bpda_accuracy"]


def test_a_jem_defended_classifier_is_attacked_through_its_sampler(digits):
    model, test = digits
    x, y = test.tensors[0][:48], test.tensors[1][:48]
    jem = JEM(model, sampler=PYLD(n_steps=5, step_size=0.2), buffer=ReplayBuffer(capacity=8, input_shape=(1, 8, 8)))
    jem.eval()
    attacks = [{"kind": "clean"}, {"kind": "pgd", "norm": "linf", "eps": 0.3, "steps": 3}]
    rows = robust_accuracy(jem, [(x, y)], attacks, defense=jem_defense(jem, 3), progress=False)
    clean, pgd = rows
    assert clean["transfer_accuracy"] == clean["defended_accuracy"] > 0.85
    assert pgd["accuracy"] < 0.5 and None not in (pgd["bpda_accuracy"], pgd["unrolled_accuracy"])
    assert pgd["defended_accuracy"] <= min(pgd["transfer_accuracy"], pgd["bpda_accuracy"], pgd["unrolled_accuracy"])
    assert pgd["defended_accuracy"] < clean["defended_accuracy"] / 2
    assert all(p.requires_grad and p.grad is None for p in jem.parameters())


def test_a_random_defence_gets_eot_draws_and_a_fixed_noise_control(digits):
    model, test = digits
    x, y = test.tensors[0][:32], test.tensors[1][:32]
    calls = []

    def noisy(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[0])
        return t + 0.05 * torch.randn_like(t)

    defense = Defense(purify=noisy, differentiable=noisy, random=True, name="noise")
    rows = robust_accuracy(
        model, [(x, y)], [{"kind": "pgd", "eps": 0.3, "steps": 2}], defense=defense, eot=3, draws=4, progress=False
    )
    # transfer: 4 draws; per attack through the defence: (clean, start, 2 steps) x 3 EOT draws, 4 to score
    with_control = 4 + 2 * (4 * 3 + 4) + (1 + 2 * (4 + 1))
    assert len(calls) == with_control
    row = rows[0]
    assert row["fixed_noise_accuracy"] is not None
    assert row["defended_accuracy"] <= min(row["transfer_accuracy"], row["bpda_accuracy"], row["unrolled_accuracy"])
    fixed = defense.with_fixed_noise()
    assert torch.equal(fixed.purify(x), fixed.purify(x)) and not torch.equal(noisy(x), noisy(x))


def test_eot_averages_the_model_over_draws(digits):
    model, test = digits
    x, y = test.tensors[0][:32], test.tensors[1][:32]
    calls = []

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return model(t)

    torch.manual_seed(3)
    once = pgd_attack(counted, x, y, eps=0.1, steps=3, eot=1, clip=BOX)
    single = len(calls)
    torch.manual_seed(3)
    thrice = pgd_attack(counted, x, y, eps=0.1, steps=3, eot=3, clip=BOX)
    assert len(calls) - single == 3 * single == 3 * (1 + 3 + 1)
    assert torch.allclose(once, thrice, atol=1e-6), "a deterministic model: the mean of equal gradients"


def test_budgets_in_both_units(digits):
    model, test = digits
    x, y = test.tensors[0][:64], test.tensors[1][:64]
    torch.manual_seed(0)
    in_data_units = robust_accuracy(model, [(x, y)], [{"kind": "pgd", "eps": 0.2, "steps": 3}], progress=False)
    torch.manual_seed(0)
    on_unit_range = robust_accuracy(model, [(x, y)], [{"kind": "pgd", "eps_01": 0.1, "steps": 3}], progress=False)
    assert in_data_units == on_unit_range and on_unit_range[0]["eps"] == 0.2 and on_unit_range[0]["eps_01"] == 0.1
    torch.manual_seed(0)
    on_01_data = robust_accuracy(
        lambda u: model(2 * u - 1),
        [((x + 1) / 2, y)],
        [{"kind": "pgd", "eps_01": 0.1, "steps": 3}],
        clip=(0.0, 1.0),
        progress=False,
    )
    assert on_01_data[0]["eps"] == on_01_data[0]["eps_01"] == 0.1
    assert on_01_data[0]["accuracy"] == pytest.approx(in_data_units[0]["accuracy"], abs=0.05)
    cifar = robust_accuracy(model, [(x, y)], attack_list([], budgets="cifar"), progress=False)
    assert [r["attack"] for r in cifar] == ["clean", "pgd-linf", "pgd-l2"]
    assert [r["eps_01"] for r in cifar[1:]] == pytest.approx([8 / 255, 0.5])
    assert [r["eps"] for r in cifar[1:]] == pytest.approx([16 / 255, 1.0])


def test_command_line_robustness_options():
    attacks = attack_list([{"kind": "clean"}, {"kind": "pgd", "eps": 0.1, "norm": "l2"}], autoattack=True)
    assert attacks[1:] == [
        {"kind": "pgd", "eps": 0.1, "norm": "l2"},
        {"kind": "autoattack", "norm": "l2", "eps": 0.1, "steps": 100},
    ]
    with pytest.raises(ValueError, match="unknown budgets 'imagenet'; expected one of 'cifar'"):
        attack_list([], budgets="imagenet")
    args = "--ckpt x.ckpt --robustness.budgets cifar --robustness.autoattack true --robustness.adaptive [bpda]"
    extra = ["--robustness.eot", "5", "--robustness.draws", "7", "--robustness.defense_steps", "10"]
    parser = build_parser()
    options = parser.instantiate_classes(parser.parse_args([*args.split(), *extra]))["robustness"]
    assert isinstance(options, RobustnessOptions)
    assert (options.budgets, options.autoattack, options.adaptive, options.eot, options.draws) == (
        "cifar",
        True,
        ["bpda"],
        5,
        7,
    )
    assert options.defense_steps == 10 and options.fixed_noise_control is True
    assert [a["kind"] for a in options.attack_configs()] == ["clean", "pgd", "autoattack", "pgd", "autoattack"]


def test_the_report_names_each_attack_and_the_threat_model(digits):
    model, test = digits
    x, y = test.tensors[0][:32], test.tensors[1][:32]
    jem = JEM(model, sampler=PYLD(n_steps=5), buffer=ReplayBuffer(capacity=8, input_shape=(1, 8, 8))).eval()
    defense = jem_defense(jem, 2)
    attacks = [{"kind": "clean"}, {"kind": "pgd", "eps": 0.1, "steps": 2}]
    rows = robust_accuracy(jem, [(x, y)], attacks, defense=defense, progress=False)
    calibration = dict.fromkeys(("accuracy", "nll", "brier", "ece", "mce"), 0.5)
    report = {"data": "Digits", "num_test": 32, "calibration": calibration, "figures": {}}
    report["robustness"] = {"defense_steps": 2, "threat_model": threat_model(defense, clip=BOX), "rows": rows}
    text = format_report(report).split("Robustness\n")[1]
    header = text.splitlines()[0].split()
    assert header[:4] == ["attack", "eps/std", "on", "[0,1]"]
    assert header[4:] == ["undefended", "transfer", "BPDA", "unrolled", "defended", "(worst)"]
    assert "pgd-linf  0.1000   0.0500" in text
    assert "defence: 2 PYLD steps on E(x), deterministic: PYLD(n_steps=5" in text
    assert "per-example worst case over transfer, bpda, unrolled" in text
    report["robustness"]["threat_model"] = threat_model(defense, adaptive=[], clip=BOX)
    assert "! transfer attacks only" in format_report(report)


class _Points:
    """A datamodule of tabular points whose two features have different ranges."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        x = torch.randn(40, 2) * torch.tensor([3.0, 0.5])
        self.test_dataset = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())

    def setup(self, stage: str) -> None:
        pass


def test_the_evaluation_attacks_inside_the_jems_input_domain(tmp_path):
    jem = _tiny_jem(PYLD(n_steps=2))
    data = _Points()
    jem.domain.fit(data.test_dataset.tensors[0])  # a box per feature: [-6.6, 6.1] and [-1.0, 1.1] or so
    kwargs = {"ood": OODOptions(sets=[]), "samples": SampleOptions(per_class=0), "progress": False}
    kwargs["calibration"] = CalibrationOptions(temperature_scaling=False)
    with pytest.raises(ValueError, match=r"eps=5\.0 is in data units, but the input domain.s channels or features"):
        evaluate(jem, data, tmp_path, robustness=RobustnessOptions(attacks=[{"kind": "pgd", "eps": 5.0}]), **kwargs)
    options = RobustnessOptions(attacks=[{"kind": "pgd", "eps_01": 0.1, "steps": 2}], defense_steps=2)
    report = evaluate(jem, data, tmp_path, robustness=options, **kwargs)
    robustness = report["robustness"]
    low, high = jem.domain.bounds()
    assert robustness["threat_model"]["data_range"] == pytest.approx([low, high])
    assert "a range per channel or feature" in robustness["threat_model"]["box"]
    row = robustness["rows"][0]
    assert row["eps_01"] == pytest.approx(0.1) and row["eps"] is None and row["unrolled_accuracy"] is not None
    # attacked inputs stay inside each feature's own box
    x, y = data.test_dataset.tensors
    attacked = []
    model = lambda t: attacked.append(t.detach()) or jem(t)  # noqa: E731
    robust_accuracy(model, [(x, y)], [{"kind": "pgd", "eps_01": 0.5, "steps": 3}], clip=jem.domain, progress=False)
    seen = torch.cat(attacked)
    assert (seen >= jem.domain.low - 1e-5).all() and (seen <= jem.domain.high + 1e-5).all()
    assert (seen[:, 0].max() - seen[:, 0].min()) > 4 * (seen[:, 1].max() - seen[:, 1].min()) / 2


def test_defence_option_errors(digits):
    model, test = digits
    x, y = test.tensors[0][:4], test.tensors[1][:4]

    def run(attacks=None, **kwargs):
        attacks = attacks or [{"kind": "pgd", "eps": 0.1, "steps": 1}]
        return robust_accuracy(model, [(x, y)], attacks, progress=False, **kwargs)

    with pytest.raises(TypeError, match="adaptive must be a list of attack names such as \\['bpda'\\], got the string"):
        run(defense=_identity, adaptive="bpda")
    with pytest.raises(ValueError, match=r"unknown adaptive attack\(s\) \['bdpa'\]; expected some of bpda, unrolled"):
        run(defense=_identity, adaptive=["bdpa"])
    with pytest.raises(ValueError, match="the defence 'defence' has no differentiable form: adaptive=\\['bpda'\\]"):
        run(defense=_identity, adaptive=["unrolled"])
    with pytest.raises(ValueError, match="eot must be an integer >= 1, got 0"):
        run(defense=_identity, eot=0)
    with pytest.raises(ValueError, match="draws must be an integer >= 1, got 0"):
        run(defense=_identity, draws=0)
    with pytest.raises(TypeError, match="defense must be a Defense, a callable x -> x' or None, got int"):
        run(defense=42)
    with pytest.raises(
        ValueError, match="give eps \\(data units\\) or eps_01 \\(a fraction of the box's width\\), not both"
    ):
        run([{"kind": "pgd", "eps": 0.1, "eps_01": 0.05}])
    with pytest.raises(ValueError, match="eps_01 needs the data range: pass clip=\\(low, high\\)"):
        run([{"kind": "pgd", "eps_01": 0.05}], clip=None)
    with pytest.raises(ValueError, match="unknown AutoAttack version 'plus'; expected None \\(automatic\\) or one of"):
        run([{"kind": "autoattack", "eps": 0.1, "version": "plus"}])
    with pytest.raises(ValueError, match="queries must be an integer >= 1, got 0"):
        run([{"kind": "autoattack", "eps": 0.1, "queries": 0}])
    with pytest.raises(ValueError, match="n_steps must be an integer >= 1, got 0"):
        jem_defense(_tiny_jem(PYLD()), 0)
    mala = _tiny_jem(MALA(n_steps=2))
    with pytest.raises(TypeError, match=r"needs a sampler with a step update\(x, grad\) \(SGLD, PYLD\), got MALA"):
        unrolled_purify(mala, torch.zeros(2, 2, requires_grad=True), 2)
    with pytest.raises(ValueError, match="n_steps must be an integer >= 0, got -1"):
        unrolled_purify(_tiny_jem(PYLD()), torch.zeros(2, 2), -1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ---------------------------------------------------------------------------------------------------- AutoAttack
def test_autoattack_says_how_to_install_it(digits, monkeypatch):
    model, test = digits
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install 'jemkit\\[attacks\\]'"):
        autoattack(model, test.tensors[0][:2], test.tensors[1][:2], eps=0.1, clip=BOX)
    with pytest.raises(ValueError, match="AutoAttack needs the data range clip=\\(low, high\\), got None"):
        autoattack(model, test.tensors[0][:2], test.tensors[1][:2], eps=0.1, clip=None)


@pytest.mark.skipif(not HAS_TORCHATTACKS, reason="needs torchattacks: pip install 'jemkit[attacks]'")
def test_autoattack_is_at_least_as_strong_as_pgd_on_any_data_range(digits):
    model, test = digits
    x, y = test.tensors[0][:48], test.tensors[1][:48]
    torch.manual_seed(0)
    x_pgd = pgd_attack(model, x, y, eps=0.1, steps=10, clip=BOX)
    x_aa = autoattack(model, x, y, eps=0.1, steps=10, queries=50, clip=BOX)
    assert x_aa.shape == x.shape and x_aa.min() >= -1 and x_aa.max() <= 1
    assert (x_aa - x).abs().max() <= 0.1 + 1e-5
    assert _accuracy(model, x_aa, y) <= _accuracy(model, x_pgd, y) + 0.03 < _accuracy(model, x, y)
    # torchattacks works on [0, 1]: the same attack on [0, 1] inputs of the same function finds the same examples
    x01 = autoattack(lambda u: model(2 * u - 1), (x + 1) / 2, y, eps=0.05, steps=10, queries=50, clip=(0.0, 1.0))
    assert torch.allclose(2 * x01 - 1, x_aa, atol=1e-5)
    assert all(p.requires_grad and p.grad is None for p in model.parameters()), "FAB's backward must not leak"


@pytest.mark.skipif(not HAS_TORCHATTACKS, reason="needs torchattacks: pip install 'jemkit[attacks]'")
def test_autoattack_through_a_defence_and_on_flat_inputs(masked):
    model, test, purify = masked
    defense = Defense(purify=purify, name="quantise")
    attack = {"kind": "autoattack", "eps": 0.2, "steps": 10, "queries": 30}
    x, y = test.tensors[0][:96], test.tensors[1][:96]
    rows = robust_accuracy(model, [(x, y)], [attack], defense=defense, progress=False)
    assert rows[0]["attack"] == "autoattack-linf" and rows[0]["restarts"] is None
    assert rows[0]["bpda_accuracy"] < rows[0]["transfer_accuracy"] - 0.2
    flat = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 4))
    points = torch.rand(16, 2) * 2 - 1
    labels = flat(points).argmax(1).detach()
    x_adv = autoattack(flat, points, labels, eps=0.5, norm="l2", steps=5, queries=10, clip=BOX)
    assert x_adv.shape == (16, 2) and ((x_adv - points).norm(dim=1) <= 0.5 + 1e-5).all()
    assert _accuracy(flat, x_adv, labels) < 1.0
    with pytest.raises(ValueError, match=r"AutoAttack version 'standard' needs >= 4 classes .*, the model has 3"):
        autoattack(nn.Linear(2, 3), points, labels % 3, eps=0.1, clip=BOX)
    with pytest.raises(ValueError, match=r"AutoAttack version 'rand' needs >= 3 classes .*, the model has 2"):
        autoattack(nn.Linear(2, 2), points, labels % 2, eps=0.1, version="rand", clip=BOX)


def test_a_yopo_sampler_is_attacked_with_bpda_not_unrolled():
    jem = _tiny_jem(PYLD(n_steps=1, inner_steps=3, first_layer=None))
    defense = jem_defense(jem, 2)
    assert defense.differentiable is None and threat_model(defense, clip=BOX)["attacks"] == ["transfer", "bpda"]
    with pytest.raises(TypeError, match=r"YOPO inner steps .* attack this defence with BPDA"):
        unrolled_purify(jem, torch.zeros(2, 2, requires_grad=True), 2)
