"""Any classifier: small random-initialised torchvision and timm families wrap, train, sample and evaluate.

They cover the layers people bring: BatchNorm (ResNet, MobileNet, EfficientNet), SiLU/Hardswish and
squeeze-excitation (MobileNet, EfficientNet), LayerNorm (ConvNeXt), attention with LayerNorm and GELU (ViT).
"""

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from jemkit import JEM, PYLD, ReplayBuffer
from tests.helpers import loader, trainer

torchvision = pytest.importorskip("torchvision")


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


FAMILIES = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "convnext_atto": _timm("convnext_atto"),
    "vit_tiny": _timm("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2),
}


def _running_stats(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in model.modules() if isinstance(m, _BatchNorm) for t in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_model_family_wraps_trains_samples_and_evaluates(tmp_path, family):
    torch.manual_seed(0)
    classifier = FAMILIES[family]()
    jem = JEM(classifier, sampler=PYLD(n_steps=2), buffer=ReplayBuffer(capacity=32))
    x, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.arange(8)
    weights_before = [p.detach().clone() for p in classifier.parameters()]
    trainer(tmp_path, max_steps=2).fit(jem, loader(x, y, batch_size=4))
    assert jem.global_step == 2 and jem.buffer.input_shape == (3, 32, 32)
    assert all(torch.isfinite(p).all() for p in classifier.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(weights_before, classifier.parameters(), strict=True)
    )  # it trained

    stats = _running_stats(classifier)
    samples = jem.sample(4)
    assert samples.shape == (4, 3, 32, 32) and torch.isfinite(samples).all()
    assert all(
        torch.equal(a, b) for a, b in zip(stats, _running_stats(classifier), strict=True)
    )  # sampling never moves them

    result = trainer(tmp_path).test(jem, loader(x, y, batch_size=4), verbose=False)[0]
    assert 0.0 <= result["test/acc"] <= 1.0 and result["test/nll"] > 0
    jem.eval()
    torch.testing.assert_close(jem(x[:2]), classifier(x[:2]))  # forward is the classifier's (Dropout off)


def test_weights_loaded_from_a_local_state_dict_file_are_the_ones_wrapped(tmp_path):
    pretrained = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(pretrained.state_dict(), tmp_path / "resnet18.pt")
    classifier = torchvision.models.resnet18(num_classes=10)
    classifier.load_state_dict(torch.load(tmp_path / "resnet18.pt"))  # the README's few lines
    jem = JEM(classifier, preset="finetune").eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(jem(x), pretrained(x))
