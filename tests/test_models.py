"""Tests for jemkit.models: shapes, WRN-28-10 size, norm/activation variants, input gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jemkit.models import SmallCNN, WideResNet, create_model, wrn28_10

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


def tiny_wrn(**kwargs) -> WideResNet:
    return WideResNet(depth=10, widen_factor=1, **kwargs)


@pytest.mark.parametrize(
    ("in_channels", "size", "num_classes"),
    [(1, 8, 10), (1, 28, 10), (3, 32, 10), (3, 32, 100), (1, 7, 3)],
)
def test_small_cnn_output_shape(in_channels, size, num_classes):
    model = SmallCNN(num_classes=num_classes, in_channels=in_channels)
    logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, num_classes)


def test_small_cnn_is_small():
    assert count_params(SmallCNN(width=32)) < 200_000
    assert count_params(SmallCNN(width=8)) < count_params(SmallCNN(width=32))


@pytest.mark.parametrize(("in_channels", "size"), [(3, 32), (1, 8), (3, 16)])
def test_wide_resnet_output_shape(in_channels, size):
    model = tiny_wrn(num_classes=7, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


def test_wrn28_10_has_about_36_5m_parameters():
    with torch.device("meta"):  # no memory is allocated and nothing is initialised
        model = wrn28_10(num_classes=10)
    assert count_params(model) == pytest.approx(36.5e6, rel=0.01)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 12 + 3  # stem, two per block, one 1x1 shortcut per stage
    assert model.depth == 28 and model.widen_factor == 10


def test_depth_sets_number_of_blocks():
    blocks = [m for m in WideResNet(depth=16, widen_factor=1).modules() if type(m).__name__ == "WideBasicBlock"]
    assert len(blocks) == 3 * 2


@pytest.mark.parametrize("factory", [SmallCNN, tiny_wrn])
def test_default_is_jem_style_no_norm_leaky_relu(factory):
    model = factory()
    assert not any(isinstance(m, NORM_TYPES) for m in model.modules())
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}
    assert not any(isinstance(m, nn.ReLU | nn.SiLU) for m in model.modules())


@pytest.mark.parametrize("factory", [SmallCNN, tiny_wrn])
def test_norm_variants(factory):
    batch = layer_types(factory(norm="batch"))
    group = layer_types(factory(norm="group"))
    assert nn.BatchNorm2d in batch and nn.GroupNorm not in batch
    assert nn.GroupNorm in group and nn.BatchNorm2d not in group


@pytest.mark.parametrize("factory", [SmallCNN, tiny_wrn])
@pytest.mark.parametrize(("activation", "module"), [("silu", nn.SiLU), ("relu", nn.ReLU)])
def test_activation_variants(factory, activation, module):
    types = layer_types(factory(activation=activation))
    assert module in types and nn.LeakyReLU not in types


def test_dropout_only_when_requested():
    assert nn.Dropout not in layer_types(tiny_wrn())
    assert nn.Dropout in layer_types(tiny_wrn(dropout=0.3))


@pytest.mark.parametrize("norm", [None, "batch", "group"])
@pytest.mark.parametrize(
    ("factory", "shape"),
    [(SmallCNN, (4, 1, 8, 8)), (lambda **kw: tiny_wrn(in_channels=3, **kw), (4, 3, 32, 32))],
    ids=["small_cnn", "wrn"],
)
def test_input_gradients_are_finite(factory, shape, norm):
    torch.manual_seed(0)
    model = factory(norm=norm)
    x = torch.randn(shape, requires_grad=True)
    # The gradient SGLD follows: d/dx of log p(x) = logsumexp of the logits.
    model(x).logsumexp(dim=1).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_create_model_by_name():
    assert isinstance(create_model("small_cnn", num_classes=3), SmallCNN)
    wrn = create_model("wrn", depth=10, widen_factor=2, num_classes=5)
    assert isinstance(wrn, WideResNet) and wrn.widen_factor == 2
    assert isinstance(create_model("Wide-ResNet", depth=10, widen_factor=1), WideResNet)
    with torch.device("meta"):
        assert create_model("wrn28_10").depth == 28
    assert create_model("small_cnn", num_classes=4, in_channels=3)(torch.randn(1, 3, 8, 8)).shape == (1, 4)


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'; valid names: .*small_cnn.*wide_resnet.*wrn"):
        create_model("resnet50")


@pytest.mark.parametrize("depth", [27, 8, 0])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match=rf"depth must be 6n \+ 4 .* got {depth}"):
        WideResNet(depth=depth, widen_factor=1)


@pytest.mark.parametrize("factory", [SmallCNN, tiny_wrn])
def test_bad_norm_and_activation(factory):
    with pytest.raises(ValueError, match=r"unknown norm 'layer'; expected one of None, 'batch', 'group'"):
        factory(norm="layer")
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'; expected one of 'leaky_relu', 'silu', 'relu'"):
        factory(activation="gelu")


def test_bad_sizes_and_dropout():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        SmallCNN(num_classes=0)
    with pytest.raises(ValueError, match=r"in_channels must be an integer >= 1, got 2\.5"):
        tiny_wrn(in_channels=2.5)
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        SmallCNN(width=-1)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        tiny_wrn(dropout=1.0)
