"""Checks of what a user feeds a JEM (jemkit/checks.py): argument checks, and bad inputs named at the first batch."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jemkit import JEM, DivergenceError, ReplayBuffer
from jemkit.checks import check_integer, check_label_count, check_nonnegative, input_scale_hint
from jemkit.data import DigitsDataModule
from jemkit.models import SmallCNN
from jemkit.sampling import PYLD
from tests.helpers import TinyMLP, trainer


def test_check_integer_returns_the_value_and_names_what_it_refuses():
    assert check_integer("steps", 3) == 3 and check_integer("seed", 0, minimum=0) == 0
    for bad in (0, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=rf"steps must be an integer >= 1, got {bad!r}"):
            check_integer("steps", bad)


def test_check_nonnegative_returns_a_float_and_refuses_bools_and_non_finite_values():
    assert check_nonnegative("w", 2) == 2.0 and isinstance(check_nonnegative("w", 2), float)
    for bad in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="w must be a finite number >= 0"):
            check_nonnegative("w", bad)


def test_label_count_names_both_lengths():
    check_label_count(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="a batch holds 4 inputs but 3 labels"):
        check_label_count(torch.zeros(4, 2), torch.zeros(3))


def _digits(scale: float, shift: float = 0.0, upsample: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits' training split with ink in ``[shift, shift + scale]``, optionally enlarged ``upsample`` times."""
    dm = DigitsDataModule(normalization="unit")
    dm.setup("fit")
    x, y = dm.train_dataset.tensors
    x = F.interpolate(x, scale_factor=upsample) if upsample > 1 else x
    return x * scale + shift, y


def test_labels_one_shorter_than_the_inputs_are_named_at_the_first_batch(tmp_path):
    x, y = torch.randn(64, 2), torch.arange(64) % 3

    def drop_last_label(items):  # a collate_fn that loses a label, as a buggy dataset would
        xs, ys = zip(*items, strict=True)
        return torch.stack(xs), torch.stack(ys)[:-1]

    loader = DataLoader(TensorDataset(x, y), batch_size=16, collate_fn=drop_last_label)
    with pytest.raises(ValueError, match="a batch holds 16 inputs but 15 labels"):
        trainer(tmp_path, max_steps=2).fit(JEM(TinyMLP()), loader)


@pytest.mark.slow
def test_raw_0_255_pixels_train_with_a_warning_that_names_the_range_and_the_fix(tmp_path):
    x, y = _digits(255.0)
    jem = JEM(SmallCNN(num_classes=10, in_channels=1, width=8), buffer=ReplayBuffer(capacity=256))
    with pytest.warns(UserWarning, match=r"span \[0, 255\].*x / 127\.5 - 1"):
        trainer(tmp_path, max_steps=3).fit(jem, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    assert torch.isfinite(jem.step_stats["loss"])


@pytest.mark.slow
def test_a_divergence_on_raw_pixels_names_the_inputs_and_the_suggested_scaling_trains(tmp_path):
    """A linear classifier on 32x32 digits in 0..255, sampled by steps that grow with the gradient (JEM++'s clipped
    proximal steps): its untrained energies trip the guard at step 0. The error says why; the fix it gives
    (x / 127.5 - 1) trains without a warning."""

    def linear_jem() -> JEM:
        torch.manual_seed(0)
        classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))
        return JEM(classifier, sampler=PYLD(n_steps=5, step_size=0.2), buffer=ReplayBuffer(capacity=256))

    x, y = _digits(255.0, upsample=4)
    assert input_scale_hint(x) is not None
    with pytest.warns(UserWarning, match="span"), pytest.raises(DivergenceError) as error:
        trainer(tmp_path, max_steps=3).fit(linear_jem(), DataLoader(TensorDataset(x, y), batch_size=64))
    message = str(error.value)
    assert "global step 0" in message and "Likely cause: the training inputs span [0, 255]" in message
    assert "x / 127.5 - 1" in message

    fixed, jem = x / 127.5 - 1, linear_jem()
    assert input_scale_hint(fixed) is None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*span.*")
        trainer(tmp_path, max_steps=10).fit(jem, DataLoader(TensorDataset(fixed, y), batch_size=64, shuffle=True))
    assert torch.isfinite(jem.step_stats["loss"]) and abs(float(jem.step_stats["energy_gap"])) < 1e3


def test_names_and_choices_are_checked_in_one_place():
    from jemkit._config import import_path
    from jemkit.checks import check_choice, check_names

    assert check_names("OOD set(s)", ("uniform",), ["uniform", "interp"]) == ["uniform"]
    assert check_names("OOD set(s)", [], ["uniform"]) == []
    with pytest.raises(ValueError, match=r"unknown OOD set\(s\) \['svhn'\]; expected some of uniform, interp"):
        check_names("OOD set(s)", ["svhn", "uniform"], ["uniform", "interp"])
    with pytest.raises(ValueError, match=r"unknown sample source\(s\) \[\]"):
        check_names("sample source(s)", [], ["buffer"], allow_empty=False)
    assert check_choice("norm", "l2", ("linf", "l2")) == "l2"
    with pytest.raises(ValueError, match="unknown norm 'l1'; expected one of 'linf', 'l2'"):
        check_choice("norm", "l1", ("linf", "l2"))
    assert import_path("jemkit.sampling.SGLD").__name__ == "SGLD"
    with pytest.raises(ValueError, match=r"expected a dotted path module\.attr, got 'SGLD'"):
        import_path("SGLD")
    with pytest.raises(AttributeError):
        import_path("jemkit.sampling.NoSuchSampler")
