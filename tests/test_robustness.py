from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jemkit.data import DigitsDataModule
from jemkit.evaluate.robustness import gaussian_noise_corruption, pgd_attack, robust_accuracy


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
    x_adv = pgd_attack(model, x, y, eps=eps, norm=norm, steps=10)
    assert _accuracy(model, x_adv, y) < clean / 2


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_adversarial_examples_stay_in_the_ball_and_the_data_range(digits, norm, eps):
    model, test = digits
    x, y = test.tensors
    x_adv = pgd_attack(model, x, y, eps=eps, norm=norm, steps=5, step_size=eps, restarts=2)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= -1.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()
    assert (size > 0.5 * eps).float().mean() > 0.5, "most examples should use a good part of the budget"


def test_eps_zero_changes_nothing(digits):
    model, test = digits
    x, y = test.tensors
    assert torch.equal(pgd_attack(model, x, y, eps=0.0), x)
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
        x_adv = pgd_attack(model, x, y, eps=0.1, norm="linf", steps=3, restarts=restarts)
        with torch.no_grad():
            fooled[restarts] = model(x_adv).argmax(1) != y
    # the first restart replays the single-restart run, later ones only replace examples that were not yet fooled
    assert (fooled[3] | ~fooled[1]).all()
    assert fooled[3].sum() >= fooled[1].sum() > 0


def test_any_callable_can_be_attacked(digits):
    model, test = digits
    x, y = test.tensors[0][:64], test.tensors[1][:64].int()
    torch.manual_seed(5)
    from_module = pgd_attack(model, x, y, eps=0.2, norm="l2", steps=3)
    torch.manual_seed(5)
    from_function = pgd_attack(lambda t: model(t), x, y, eps=0.2, norm="l2", steps=3)
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
    pgd_attack(model, x, y, eps=0.1, steps=2, restarts=2)
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
    assert rows[2] | {"accuracy": None, "defended_accuracy": None} == {
        "attack": "pgd-linf",
        "eps": 0.3,
        "steps": 5,
        "restarts": 1,
        "std": None,
        "accuracy": None,
        "defended_accuracy": None,
        "n": len(test),
    }
    assert rows[1]["std"] == 0.2 and rows[1]["eps"] is None
    for row in rows:
        assert row["n"] == len(test) == 270
        assert row["defended_accuracy"] == row["accuracy"]
    assert rows[2]["accuracy"] < rows[0]["accuracy"] / 2

    undefended = robust_accuracy(model, loader, attacks[:1], progress=False, max_batches=2)
    assert undefended[0]["defended_accuracy"] is None and undefended[0]["n"] == 128


def test_a_defense_is_applied_to_the_attacked_inputs(digits):
    model, test = digits
    x, y = test.tensors
    seen: list[torch.Tensor] = []

    def defense(x_attacked: torch.Tensor) -> torch.Tensor:
        seen.append(x_attacked)
        return x  # an oracle that restores the clean batch (the loader yields the whole split at once)

    rows = robust_accuracy(model, [(x, y)], [{"kind": "pgd", "eps": 0.3}], defense=defense, progress=False)
    assert len(seen) == 1 and not torch.equal(seen[0], x)
    assert rows[0]["defended_accuracy"] == pytest.approx(_accuracy(model, x, y))
    assert rows[0]["accuracy"] < rows[0]["defended_accuracy"] / 2


def test_gaussian_noise_corruption():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert torch.equal(gaussian_noise_corruption(x, 0.0), x)
    noisy = gaussian_noise_corruption(x, 0.5, generator=torch.Generator().manual_seed(1))
    assert noisy.shape == x.shape and noisy.min() >= -1 and noisy.max() <= 1 and not torch.equal(noisy, x)
    assert torch.equal(noisy, gaussian_noise_corruption(x, 0.5, generator=torch.Generator().manual_seed(1)))
    unclipped = gaussian_noise_corruption(torch.zeros(20000), 0.5, clip=None)
    assert 0.48 < float(unclipped.std()) < 0.52


def test_argument_errors(digits):
    model, test = digits
    x, y = test.tensors[0][:4], test.tensors[1][:4]
    with pytest.raises(ValueError, match="unknown norm 'l1'; expected one of linf, l2"):
        pgd_attack(model, x, y, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -0\.1"):
        pgd_attack(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        pgd_attack(model, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="restarts must be an integer >= 1"):
        pgd_attack(model, x, y, eps=0.1, restarts=0)
    with pytest.raises(ValueError, match="step_size must be None or a finite number > 0"):
        pgd_attack(model, x, y, eps=0.1, step_size=0.0)
    with pytest.raises(ValueError, match="clip must be None or"):
        pgd_attack(model, x, y, eps=0.1, clip=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"expected labels of shape \[4\]"):
        pgd_attack(model, x, y[:3], eps=0.1)
    with pytest.raises(ValueError, match="std must be a finite number >= 0, got -1"):
        gaussian_noise_corruption(x, -1)

    def run(*attacks):
        return robust_accuracy(model, [(x, y)], list(attacks), progress=False)

    with pytest.raises(ValueError, match=r"unknown attack kind 'fgsm'.*expected one of clean, noise, pgd"):
        run({"kind": "fgsm", "eps": 0.1})
    with pytest.raises(ValueError, match=r"a 'pgd' attack needs \['eps'\]"):
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
