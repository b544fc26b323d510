"""jemkit.data.corruptions: shifts per data kind, the identity at severity 0, references (torchvision), the input
domain's box, reproducible randomness, refusals."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from jemkit.data.corruptions import SEVERITIES, SHIFTS, corrupt, data_kind
from jemkit.sampling import InputDomain

SHAPES = {"image": [(1, 8, 8), (3, 32, 32)], "signal": [(2, 40)], "tabular": [(13,)]}


def _inputs(shape, n=6, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", list(SHIFTS))
def test_severity_zero_is_the_identity_and_every_severity_keeps_shape(kind):
    for shape in SHAPES[kind]:
        x = _inputs(shape)
        domain = InputDomain().fit(x)
        for name in SHIFTS[kind]:
            assert torch.equal(corrupt(x, name, 0, domain), x)
            for severity in (1, 5):
                out = corrupt(x, name, severity, domain, _generator())
                assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all(), name
                assert not torch.equal(out, x), f"{name} at severity {severity} changed nothing"


def test_images_stay_in_the_domain_box_and_noise_grows_with_severity():
    x = _inputs((3, 16, 16), n=20)
    domain = InputDomain(low=-1, high=1)
    for name in SHIFTS["image"]:
        out = corrupt(x, name, 5, domain, _generator())
        assert float(out.min()) >= -1 - 1e-5 and float(out.max()) <= 1 + 1e-5, name
    for name in ("gaussian_noise", "impulse_noise", "contrast", "brightness", "elastic"):
        change = [float((corrupt(x, name, s, domain, _generator()) - x).abs().mean()) for s in range(1, 6)]
        assert change == sorted(change), name


def test_corruptions_match_torchvision_on_unit_pixels():
    x01 = torch.rand(4, 3, 16, 16, generator=_generator())
    x = x01 * 2 - 1  # the unit box [-1, 1] is the default domain
    to_data = lambda y: y * 2 - 1  # noqa: E731
    torch.testing.assert_close(corrupt(x, "contrast", 3), to_data(TF.adjust_contrast(x01, 0.4)))
    torch.testing.assert_close(corrupt(x, "gaussian_blur", 5), to_data(TF.gaussian_blur(x01, [7, 7], [1.0, 1.0])))
    jpeg = TF.jpeg((x01 * 255).round().to(torch.uint8), 40).float() / 255
    torch.testing.assert_close(corrupt(x, "jpeg", 5), to_data(jpeg))


def test_brightness_raises_the_hsv_value_and_keeps_hue():
    grey = torch.tensor([0.0, 0.5, 0.9]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    out = (corrupt(grey * 2 - 1, "brightness", 5) + 1) / 2  # c = 0.3
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.3, 0.8, 1.0]))
    colour = torch.tensor([0.2, 0.4, 0.1]).view(1, 3, 1, 1)
    raised = (corrupt(colour * 2 - 1, "brightness", 1) + 1) / 2  # value 0.4 -> 0.45, channels in proportion
    torch.testing.assert_close(raised.flatten(), torch.tensor([0.2, 0.4, 0.1]) * 0.45 / 0.4)


def test_images_normalised_any_way_are_corrupted_as_the_image_they_encode():
    x01 = torch.rand(8, 3, 8, 8, generator=_generator())
    x01[0, :, 0, 0], x01[0, :, 0, 1] = 0.0, 1.0  # every channel spans [0, 1], so the fitted box is the pixels'
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    normalised = (x01 - mean) / std
    domain = InputDomain().fit(normalised)
    for name in ("contrast", "gaussian_blur", "pixelate", "brightness"):
        expected = (((corrupt(x01 * 2 - 1, name, 4) + 1) / 2) - mean) / std
        torch.testing.assert_close(corrupt(normalised, name, 4, domain), expected, atol=1e-5, rtol=1e-5)


def test_a_generator_fixes_the_shifted_set_and_leaves_the_global_stream_alone():
    x = _inputs((1, 8, 8))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    for name in ("gaussian_noise", "elastic", "shot_noise"):
        assert torch.equal(corrupt(x, name, 3, None, _generator(1)), corrupt(x, name, 3, None, _generator(1)))
        assert not torch.equal(corrupt(x, name, 3, None, _generator(1)), corrupt(x, name, 3, None, _generator(2)))
    assert torch.equal(torch.rand(1), expected_next)


def test_signal_shifts():
    x = torch.randn(50, 2, 40, generator=_generator()) * 2 + 3
    domain = InputDomain().fit(x)
    shifted = corrupt(x, "time_shift", 5, domain, _generator())  # 12 steps either way, edges repeated
    for signal, out in zip(x, shifted, strict=True):
        forward = torch.cat([signal[:, :1].expand(-1, 12), signal[:, :-12]], dim=1)
        backward = torch.cat([signal[:, 12:], signal[:, -1:].expand(-1, 12)], dim=1)
        assert torch.equal(out, forward) or torch.equal(out, backward)
    scaled = corrupt(x, "amplitude_scaling", 3, domain, _generator())  # gain 2 or 1/2 around the example's mean
    centred = x - x.mean(-1, keepdim=True)
    ratio = ((scaled - scaled.mean(-1, keepdim=True)) / centred).flatten(1).median(dim=1).values
    expected = torch.where(ratio < 1, 0.5, 2.0)
    assert torch.allclose(ratio, expected) and 0 < int((ratio < 1).sum()) < len(ratio)
    dropped = corrupt(x, "sample_dropout", 5, domain, _generator())
    changed = (dropped != x).any(dim=1)  # whole time steps, every channel at its training mean
    assert 0.4 < float(changed.float().mean()) < 0.6
    assert torch.allclose(dropped.permute(0, 2, 1)[changed], domain.mean.view(1, 2).expand(int(changed.sum()), 2))
    noisy = corrupt(x, "additive_noise", 5, domain, _generator())
    assert float((noisy - x).std() / x.std()) == pytest.approx(0.8, rel=0.1)


def test_tabular_shifts():
    x = torch.randn(400, 5, generator=_generator()) * torch.tensor([1.0, 10.0, 0.1, 3.0, 5.0]) + 7
    domain = InputDomain().fit(x)
    missing = corrupt(x, "missing_values", 2, domain, _generator())  # 20% of the values, the training means
    replaced = missing != x
    assert float(replaced.float().mean()) == pytest.approx(0.2, abs=0.03)
    assert torch.equal(missing[replaced], domain.mean.expand_as(x)[replaced])
    scaled = corrupt(x, "feature_scaling", 5, domain, _generator())  # one gain per feature, in [1/3, 3]
    centred = x - domain.mean
    gains = ((scaled - domain.mean) * centred).sum(0) / centred.square().sum(0)  # least squares, per feature
    torch.testing.assert_close(scaled, domain.mean + centred * gains, atol=1e-4, rtol=1e-4)
    assert bool(((gains >= 1 / 3 - 1e-4) & (gains <= 3 + 1e-4)).all()) and gains.std() > 0
    offsets = corrupt(x, "feature_offset", 3, domain, _generator()) - x  # one offset per feature, within 1 std
    assert torch.allclose(offsets, offsets[:1].expand_as(offsets), atol=1e-4)
    assert bool((offsets[0].abs() <= domain.std + 1e-4).all())


def test_wrong_kinds_names_and_severities_are_refused():
    with pytest.raises(ValueError, match=r"'contrast' is for image data.*tabular data.*feature_noise"):
        corrupt(torch.zeros(2, 5), "contrast", 1)
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        corrupt(torch.zeros(2, 1, 8, 8), "fog", 1)
    with pytest.raises(ValueError, match="severity must be an integer from 0 to 5, got 6"):
        corrupt(torch.zeros(2, 1, 8, 8), "contrast", 6)
    with pytest.raises(ValueError, match="no distribution shifts for inputs of shape"):
        data_kind((1, 2, 3, 4))
    assert data_kind((2,)) == "tabular" and data_kind((1, 30)) == "signal" and data_kind((3, 8, 8)) == "image"
    assert set(SEVERITIES) == {name for names in SHIFTS.values() for name in names}
    assert all(len(v) == 5 for v in SEVERITIES.values())
