"""Tests of jemkit's MLP, SignalCNN and SmallResNet: shapes, layer variants, input gradients, errors, and brief training
runs on real data (the tabular sets, the synthetic signals, the digits) that must beat chance by a wide margin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jemkit.data import DigitsDataModule, SignalsDataModule, TabularDataModule
from jemkit.models import MLP, SignalCNN, SmallResNet, create_model
from jemkit.models.resnet import BasicBlock

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def layer_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_and_test(model: nn.Module, dm, steps: int, lr: float = 3e-3, binary: bool = False) -> float:
    """Plain supervised training (Adam, batches of 64 drawn with replacement); returns the test accuracy."""
    dm.setup("fit")
    x, y = dm.train_dataset.tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    loss_fn = nn.functional.binary_cross_entropy_with_logits if binary else nn.functional.cross_entropy
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=generator)
        loss = loss_fn(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x_test, y_test = dm.test_dataset.tensors
    with torch.no_grad():
        logits = model(x_test)
    predictions = (logits > 0).float() if binary else logits.argmax(1)
    return (predictions == y_test).float().mean().item()


# ------------------------------------------------------------------------------------------------------------ MLP


@pytest.mark.parametrize(("shape", "num_features"), [((13,), 13), ((1, 8, 8), 64), ((2, 3), 6)])
def test_mlp_output_shape_flattens_extra_dims(shape, num_features):
    model = MLP(num_features, num_classes=5)
    assert model(torch.randn(4, *shape)).shape == (4, 5)
    assert model.num_classes == 5 and model.num_features == num_features


def test_mlp_one_logit_binary_head():
    model = MLP(30, num_classes=1)
    assert model(torch.randn(7, 30)).shape == (7, 1)


def test_mlp_layers_default_norms_dropout_and_depth():
    default = MLP(10, 3)
    assert not any(isinstance(m, (*NORM_TYPES, nn.Dropout)) for m in default.modules())
    assert {m.negative_slope for m in default.modules() if isinstance(m, nn.LeakyReLU)} == {0.2}
    assert [m.out_features for m in default.modules() if isinstance(m, nn.Linear)] == [64, 64, 3]
    assert count_params(default) == 10 * 64 + 64 + 64 * 64 + 64 + 64 * 3 + 3
    assert nn.BatchNorm1d in layer_types(MLP(10, 3, norm="batch"))
    assert nn.LayerNorm in layer_types(MLP(10, 3, norm="layer"))
    assert nn.Dropout in layer_types(MLP(10, 3, dropout=0.2))
    assert nn.SiLU in layer_types(MLP(10, 3, activation="silu"))
    linear = MLP(10, 3, hidden=())  # logistic regression
    assert [type(m) for m in linear.modules() if not isinstance(m, nn.Sequential | MLP)] == [nn.Flatten, nn.Linear]
    assert [m.out_features for m in MLP(10, 3, hidden=[32]).modules() if isinstance(m, nn.Linear)] == [32, 3]


def test_mlp_errors():
    with pytest.raises(ValueError, match="num_features must be an integer >= 1, got 0"):
        MLP(0, 3)
    with pytest.raises(ValueError, match="every hidden width must be an integer >= 1, got 0"):
        MLP(4, 3, hidden=(16, 0))
    with pytest.raises(ValueError, match=r"unknown norm 'group'; expected one of None, 'batch', 'layer'"):
        MLP(4, 3, norm="group")
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'; expected one of 'leaky_relu', 'silu', 'relu'"):
        MLP(4, 3, activation="gelu")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        MLP(4, 3, dropout=1.0)
    with pytest.raises(ValueError, match=r"MLP expects inputs \[B, 13\] .* got shape \(2, 12\)"):
        MLP(13, 3)(torch.randn(2, 12))


# ------------------------------------------------------------------------------------------------------ SignalCNN


@pytest.mark.parametrize(("in_channels", "length"), [(1, 40), (1, 1), (1, 7), (3, 100)])
def test_signal_cnn_output_shape(in_channels, length):
    model = SignalCNN(num_classes=6, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, length)).shape == (2, 6)
    assert SignalCNN(num_classes=1)(torch.randn(3, 1, 40)).shape == (3, 1)


def test_signal_cnn_layers():
    default = SignalCNN()
    assert not any(isinstance(m, NORM_TYPES) for m in default.modules())
    convs = [m for m in default.modules() if isinstance(m, nn.Conv1d)]
    assert [c.out_channels for c in convs] == [32, 64, 128] and [c.stride[0] for c in convs] == [1, 2, 2]
    assert all(c.kernel_size == (5,) for c in convs) and SignalCNN(kernel_size=7).features[0][0].kernel_size == (7,)
    assert count_params(default) < 60_000
    batch, group = layer_types(SignalCNN(norm="batch")), layer_types(SignalCNN(norm="group"))
    assert nn.BatchNorm1d in batch and nn.BatchNorm2d not in batch and nn.GroupNorm not in batch
    assert nn.GroupNorm in group and nn.BatchNorm1d not in group
    assert nn.ReLU in layer_types(SignalCNN(activation="relu"))


def test_signal_cnn_errors():
    with pytest.raises(ValueError, match=r"kernel_size must be odd .* got 4"):
        SignalCNN(kernel_size=4)
    with pytest.raises(ValueError, match=r"unknown norm 'layer'; expected one of None, 'batch', 'group'"):
        SignalCNN(norm="layer")
    with pytest.raises(ValueError, match="width must be an integer >= 1, got 0"):
        SignalCNN(width=0)
    with pytest.raises(ValueError, match=r"SignalCNN expects inputs \[B, 1, L\], got shape \(2, 40\)"):
        SignalCNN()(torch.randn(2, 40))
    with pytest.raises(ValueError, match=r"SignalCNN expects inputs \[B, 2, L\], got shape \(2, 1, 40\)"):
        SignalCNN(in_channels=2)(torch.randn(2, 1, 40))


# ---------------------------------------------------------------------------------------------------- SmallResNet


@pytest.mark.parametrize(("in_channels", "size"), [(1, 8), (1, 28), (3, 32), (1, 1), (1, 7)])
def test_small_resnet_output_shape(in_channels, size):
    model = SmallResNet(num_classes=4, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 4)


def test_small_resnet_blocks_and_projection_shortcuts():
    model = SmallResNet()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 2
    assert isinstance(blocks[0].shortcut, nn.Identity)  # 16 -> 16 channels at 8x8: identity
    assert isinstance(blocks[1].shortcut[0], nn.Conv2d) and blocks[1].shortcut[0].stride == (2, 2)  # 16 -> 32, /2
    deep = SmallResNet(width=8, blocks=(2, 2, 1))
    blocks = [m for m in deep.modules() if isinstance(m, BasicBlock)]
    assert [isinstance(b.shortcut, nn.Identity) for b in blocks] == [True, True, False, True, False]
    assert [b.conv2.out_channels for b in blocks] == [8, 8, 16, 16, 32]
    assert deep(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert count_params(model) < 30_000


def test_small_resnet_layer_variants():
    assert not any(isinstance(m, NORM_TYPES) for m in SmallResNet().modules())
    assert {m.negative_slope for m in SmallResNet().modules() if isinstance(m, nn.LeakyReLU)} == {0.2}
    batch, group = layer_types(SmallResNet(norm="batch")), layer_types(SmallResNet(norm="group"))
    assert nn.BatchNorm2d in batch and nn.GroupNorm not in batch
    assert nn.GroupNorm in group and nn.BatchNorm2d not in group
    assert nn.SiLU in layer_types(SmallResNet(activation="silu"))


def test_small_resnet_errors():
    with pytest.raises(ValueError, match=r"blocks must list the number of blocks of at least one stage, got \(\)"):
        SmallResNet(blocks=())
    with pytest.raises(ValueError, match="every entry of blocks must be an integer >= 1, got 0"):
        SmallResNet(blocks=(1, 0))
    with pytest.raises(ValueError, match=r"unknown norm 'layer'; expected one of None, 'batch', 'group'"):
        SmallResNet(norm="layer")


# ----------------------------------------------------------------------------------------------------- all three


FACTORIES = [
    (lambda **kw: MLP(64, 10, **kw), (4, 1, 8, 8), [None, "batch", "layer"]),
    (lambda **kw: SignalCNN(10, **kw), (4, 1, 40), [None, "batch", "group"]),
    (lambda **kw: SmallResNet(10, **kw), (4, 1, 8, 8), [None, "batch", "group"]),
]


@pytest.mark.parametrize(("factory", "shape", "norms"), FACTORIES, ids=["mlp", "signal_cnn", "small_resnet"])
def test_input_gradients_are_finite(factory, shape, norms):
    for norm in norms:
        model = factory(norm=norm)
        x = torch.randn(shape, requires_grad=True)
        model(x).logsumexp(dim=1).sum().backward()  # the gradient SGLD follows
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_create_model_knows_the_new_models():
    assert isinstance(create_model("mlp", num_features=4, num_classes=2), MLP)
    assert isinstance(create_model("signal-cnn", num_classes=3), SignalCNN)
    assert isinstance(create_model("Small_ResNet", num_classes=3), SmallResNet)


# ---------------------------------------------------------------------------------------------- brief training
# Thresholds sit well below what was measured (3 seeds, one CPU thread): they catch a broken model or data module,
# not a slightly unlucky run.


@pytest.mark.slow
def test_mlp_learns_wine():
    dm = TabularDataModule.from_sklearn("wine")
    assert train_and_test(MLP(13, dm.num_classes), dm, steps=150) > 0.9  # measured 0.96-1.0


@pytest.mark.slow
def test_mlp_binary_head_learns_breast_cancer_from_float_labels():
    dm = TabularDataModule.from_sklearn("breast_cancer", label_dtype="float")
    assert train_and_test(MLP(30, num_classes=1), dm, steps=150, binary=True) > 0.9  # measured 0.95-1.0


@pytest.mark.slow
def test_signal_cnn_learns_the_signals():
    assert train_and_test(SignalCNN(10), SignalsDataModule(), steps=300) > 0.75  # measured 0.92-0.93 (chance 0.1)


@pytest.mark.slow
def test_small_resnet_learns_the_digits():
    assert train_and_test(SmallResNet(10), DigitsDataModule(), steps=300) > 0.85  # measured 0.94-0.97
