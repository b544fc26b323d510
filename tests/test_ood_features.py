"""jemkit.ood.features: the input of the last linear layer (or a named layer's pooled output) captured by a hook during
an ordinary forward, on torchvision, timm, MLP, Conv1d and tuple-returning classifiers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from jemkit.models import MLP, SignalCNN, SmallCNN
from jemkit.ood.features import FeatureHook, extract_features, last_linear, pool_features, resolve_layer


def _hooked(model: nn.Module, x: torch.Tensor, layer=None) -> tuple[torch.Tensor, torch.Tensor]:
    hook = FeatureHook(model, layer)
    with hook, torch.no_grad():
        logits = model(x)
    return logits, hook.pop()


def test_torchvision_resnet_features_are_the_input_of_fc() -> None:
    model = resnet18(num_classes=10).eval()  # random init: no weights download
    x = torch.randn(3, 3, 32, 32)
    logits, z = _hooked(model, x)
    assert last_linear(model) is model.fc
    assert z.shape == (3, 512) and z.dtype == torch.float32
    torch.testing.assert_close(model.fc(z), logits)


def test_named_layer_output_is_global_average_pooled() -> None:
    model = resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    _, z_default = _hooked(model, x)
    _, z_layer4 = _hooked(model, x, layer="layer4")
    # resnet's avgpool is the mean over positions: layer4's pooled output is fc's input
    torch.testing.assert_close(z_layer4, z_default)
    _, z_layer1 = _hooked(model, x, layer=model.layer1)
    assert z_layer1.shape == (2, 64)


def test_timm_head_found_through_get_classifier() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, z = _hooked(model, x)
    assert last_linear(model) is model.get_classifier()
    torch.testing.assert_close(model.get_classifier()(z), logits)


@pytest.mark.parametrize("num_classes", [3, 1])
def test_mlp_features_are_the_last_hidden_layer(num_classes: int) -> None:
    model = MLP(num_features=13, num_classes=num_classes, hidden=(32, 16)).eval()
    x = torch.randn(5, 13)
    logits, z = _hooked(model, x)
    assert z.shape == (5, 16)
    torch.testing.assert_close(model.head(z), logits)


def test_conv1d_net_features() -> None:
    model = SignalCNN(num_classes=4, in_channels=2, width=8).eval()
    x = torch.randn(4, 2, 50)
    logits, z = _hooked(model, x)
    assert z.shape == (4, 32)
    torch.testing.assert_close(model.head(z), logits)
    _, maps = _hooked(model, x, layer="features.2")  # the last conv block's output [B, 32, L'] averaged over time
    torch.testing.assert_close(maps, z)


class _TupleNet(nn.Module):
    """Returns ``(logits, embedding)``, like classifiers with an auxiliary output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        self.classifier = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.classifier(h), h


def test_tuple_returning_model() -> None:
    model = _TupleNet()
    x = torch.randn(4, 6)
    (_, h), z = _hooked(model, x)
    torch.testing.assert_close(z, h)
    z_all, y_all = extract_features(model, DataLoader(TensorDataset(x, torch.tensor([0, 1, 2, 0])), batch_size=3))
    torch.testing.assert_close(z_all, h.detach())
    assert y_all.tolist() == [0, 1, 2, 0]


class _ConvOnly(nn.Module):
    """Logits from a 1x1 convolution and global pooling: no nn.Linear anywhere (SqueezeNet-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(8, 10, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.classifier(self.body(x))).flatten(1)


def test_model_without_linear_layer_gets_a_clear_error() -> None:
    model = _ConvOnly()
    with pytest.raises(ValueError, match=r"no nn\.Linear layer.*layer='pool'"):
        FeatureHook(model)
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        extract_features(model, [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))])
    assert last_linear(model) is None
    # naming a layer works: the body's feature maps averaged over positions
    _, z = _hooked(model, torch.randn(2, 1, 8, 8), layer="body")
    assert z.shape == (2, 8)


def test_unknown_layer_and_layer_that_never_runs() -> None:
    model = SmallCNN(num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="no submodule 'layer4'"):
        resolve_layer(model, "layer4")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(model, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="layer must be"):
        resolve_layer(model, 3)  # type: ignore[arg-type]
    hook = FeatureHook(model)
    with hook:
        pass
    with pytest.raises(RuntimeError, match="did not run"):
        hook.pop()


def test_hook_is_removed_on_exit_and_keeps_only_the_last_forward() -> None:
    model = SmallCNN(num_classes=10, in_channels=1).eval()
    hook = FeatureHook(model)
    a, b = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 8, 8)
    with hook, torch.no_grad():
        model(a)
        model(b)
        assert hook.pop().shape[0] == 3
    with torch.no_grad():
        model(a)  # outside the context: nothing captured
    with pytest.raises(RuntimeError):
        hook.pop()
    assert not model.head._forward_pre_hooks


def test_undetached_features_keep_the_graph() -> None:
    model = MLP(num_features=4, num_classes=2, hidden=(8,))
    hook = FeatureHook(model, detach=False)
    with hook:
        model(torch.randn(3, 4))
    assert hook.pop().requires_grad


def test_extract_features_eval_mode_restores_flags_and_labels() -> None:
    model = SmallCNN(num_classes=10, in_channels=1, width=16, norm="batch")
    model.train()
    running = model.features[0][1].running_mean.clone()
    x = torch.randn(10, 1, 8, 8)
    y = torch.arange(10).float()  # whole-number float labels (binary BCE heads) come back as int64
    z, labels = extract_features(model, DataLoader(TensorDataset(x, y), batch_size=4), max_samples=7)
    assert z.shape == (7, 64) and z.device.type == "cpu" and z.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == list(range(7))
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(model.features[0][1].running_mean, running)
    model.eval()
    with torch.no_grad():
        expected = _hooked(model, x[:7])[1]
    torch.testing.assert_close(z, expected)


def test_jem_wrapper_reads_the_classifier_head() -> None:
    from jemkit import JEM

    classifier = SmallCNN(num_classes=10, in_channels=1, width=16)
    jem = JEM(classifier)
    assert last_linear(jem) is classifier.head
    _, z = _hooked(jem.eval(), torch.randn(2, 1, 8, 8))
    assert z.shape == (2, 64)


def test_pool_features_shapes() -> None:
    t = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(pool_features(t), t.mean((2, 3)))
    tokens = torch.randn(2, 7, 6)
    torch.testing.assert_close(pool_features(tokens, channels_last=True), tokens.mean(1))
    assert pool_features(torch.randn(4)).shape == (4, 1)
    with pytest.raises(TypeError, match="expected a Tensor"):
        pool_features((t, t))  # type: ignore[arg-type]
