"""Distribution shifts of a test set, generated on the fly per data kind, at severities 1 to 5.

Ovadia et al. (2019) asked whether a model's uncertainty can be trusted when the data shifts, and measured accuracy
and ECE per corruption and severity (CIFAR-10-C, ImageNet-C). :func:`corrupt` makes such shifted inputs from clean
ones, for every kind of input jemkit handles; :mod:`jemkit.evaluate.shift` measures a model on them.

Shifts by data kind (:data:`SHIFTS`; parameters per severity in :data:`SEVERITIES`):

- images ``[C, H, W]`` (any number of channels): the noise, blur and digital corruptions of CIFAR-10-C (Hendrycks &
  Dietterich 2019) with its severity parameters, where they exist in ``torchvision.transforms.v2`` taken from there
  (Gaussian noise, Gaussian blur, contrast, pixelate's resizing, JPEG, elastic). They work on ``[0, 1]`` pixels: the
  inputs are mapped there per channel with the input domain's box (:class:`~jemkit.sampling.InputDomain`), so data
  normalised any way (``[-1, 1]``, ImageNet mean/std) is corrupted as the image it encodes, then mapped back.
- signals ``[C, T]``: time shift, amplitude scaling, additive noise, dropped samples and a baseline drift, in units of
  the domain's per-channel statistics (raw amplitudes stay raw).
- tabular rows ``[F]``: feature noise, feature scaling, feature offsets (a recalibrated sensor) and missing values
  imputed with the training mean, in units of each feature's training standard deviation.

Severity 0 is the identity. Randomness comes from a ``torch.Generator`` when one is given, so a shifted set is
reproducible. Shifts that model a systematic change (feature scaling and offsets) draw one change per call, shared by
every row: corrupt a whole set in one call (as :func:`jemkit.evaluate.shift.shift_report` does), not batch by batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from jemkit.checks import check_integer
from jemkit.data.kinds import input_kind
from jemkit.sampling.domain import InputDomain

__all__ = ["SEVERITIES", "SHIFTS", "check_shift", "corrupt", "data_kind"]

SHIFTS: dict[str, tuple[str, ...]] = {
    "image": (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "gaussian_blur",
        "contrast",
        "brightness",
        "pixelate",
        "jpeg",
        "elastic",
    ),
    "signal": ("time_shift", "amplitude_scaling", "additive_noise", "sample_dropout", "baseline_drift"),
    "tabular": ("feature_noise", "feature_scaling", "feature_offset", "missing_values"),
}
"""The shifts of each data kind (``"image"``, ``"signal"``, ``"tabular"``); names are unique across kinds."""

SEVERITIES: dict[str, tuple[float, ...]] = {
    # images, on [0, 1] pixels: CIFAR-10-C's parameters (Hendrycks & Dietterich 2019) unless said otherwise
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),  # photons per unit intensity (Poisson rate)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of values set to 0 or 1
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur std in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the image's mean grey
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side of the coarse image, a fraction of the side
    "jpeg": (80.0, 65.0, 58.0, 50.0, 40.0),  # JPEG quality
    "elastic": (0.01, 0.02, 0.03, 0.04, 0.05),  # ours: RMS displacement, a fraction of the side
    # signals, per channel: in units of the training std unless said otherwise
    "time_shift": (0.05, 0.1, 0.15, 0.2, 0.3),  # shift, a fraction of the length, either direction
    "amplitude_scaling": (1.25, 1.5, 2.0, 2.5, 3.0),  # gain c or 1/c around the example's mean
    "additive_noise": (0.1, 0.2, 0.3, 0.5, 0.8),  # white noise std
    "sample_dropout": (0.05, 0.1, 0.2, 0.3, 0.5),  # fraction of time steps reading the training mean
    "baseline_drift": (0.25, 0.5, 1.0, 1.5, 2.0),  # end-to-end linear drift, either sign
    # tabular rows, per feature: in units of the feature's training std unless said otherwise
    "feature_noise": (0.1, 0.2, 0.3, 0.5, 0.8),  # noise std
    "feature_scaling": (1.25, 1.5, 2.0, 2.5, 3.0),  # gains log-uniform in [1/c, c] around the training mean
    "feature_offset": (0.25, 0.5, 1.0, 1.5, 2.0),  # offsets uniform in [-c, c]
    "missing_values": (0.1, 0.2, 0.3, 0.4, 0.5),  # fraction of values imputed with the training mean
}
"""The parameter of each shift at severities 1 to 5 (severity 0 is the identity)."""

_KIND_OF = {name: kind for kind, names in SHIFTS.items() for name in names}
_ELASTIC_SMOOTHING = 1 / 8  # std of the elastic field's smoothing, a fraction of the image side


def data_kind(shape: Sequence[int]) -> str:
    """``"image"``, ``"signal"`` or ``"tabular"`` for one input's ``shape`` (no batch dimension), as
    :func:`~jemkit.data.kinds.input_kind` tells kinds apart (2-D points count as tabular rows)."""
    kind = input_kind(tuple(shape))
    if kind is None:
        raise ValueError(
            f"no distribution shifts for inputs of shape {tuple(shape)}: expected images [C, H, W], signals [C, T] "
            "or tabular rows [F]"
        )
    return "tabular" if kind == "points" else kind


# ---------------------------------------------------------------------------------------------- randomness
@contextmanager
def _seeded(generator: torch.Generator | None) -> Iterator[None]:
    """Run torchvision's transforms (which draw from the global CPU generator) on a stream fixed by ``generator``,
    leaving the global generator as it was; without a generator, the global stream is used as is."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _rand(shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
    return torch.rand(tuple(shape), generator=generator)


def _randn(shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
    return torch.randn(tuple(shape), generator=generator)


def _signs(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.where(_rand((n,), generator) < 0.5, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------- images, on [0, 1]
def _gaussian_noise(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    with _seeded(g):
        return TF.gaussian_noise(x, sigma=c, clip=True)


def _shot_noise(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    return (torch.poisson(x * c, generator=g) / c).clamp(0, 1)


def _impulse_noise(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    """Salt and pepper: each value independently becomes 0 or 1 (equally likely) with probability ``c``."""
    hit, salt = _rand(x.shape, g) < c, _rand(x.shape, g) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def _gaussian_blur(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    # kernel of +-3 std, at most what reflection padding allows on the image (pad < side)
    limit = 2 * min(x.shape[-2:]) - 1
    kernel = min(2 * math.ceil(3 * c) + 1, limit if limit % 2 else limit - 1)
    return TF.gaussian_blur(x, [kernel, kernel], [c, c])


def _contrast(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    return TF.adjust_contrast(x, c)


def _brightness(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    """ImageNet-C's brightness: the HSV value raised by ``c`` (clipped at 1), hue and saturation kept.

    With hue and saturation fixed, RGB is proportional to the value ``V = max`` over channels, so every channel is
    scaled by ``min(V + c, 1) / V``; black (``V = 0``, no hue) becomes the grey ``c``. ``TF.adjust_brightness``
    multiplies by a constant instead, which leaves black as it is: a dark background (the digits') would not change.
    """
    value = x.amax(dim=-3, keepdim=True)
    raised = (value + c).clamp(max=1.0)
    return torch.where(value > 0, x * raised / value.clamp_min(1e-12), raised.expand_as(x))


def _pixelate(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    height, width = x.shape[-2:]
    small = TF.resize(x, [max(1, int(height * c)), max(1, int(width * c))], antialias=True)
    return TF.resize(small, [height, width], interpolation=T.InterpolationMode.NEAREST).clamp(0, 1)


def _jpeg(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    if x.shape[-3] not in (1, 3):
        raise ValueError(f"JPEG compresses 1- or 3-channel images, got {x.shape[-3]} channels")
    pixels = (x * 255).round().to(torch.uint8)
    return TF.jpeg(pixels, int(c)).float() / 255


def _elastic(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    """ImageNet-C's elastic deformation (without its affine part): pixels moved by a field of ``U(-1, 1)``
    displacements smoothed by a Gaussian of 1/8 of the side, one field per image, scaled so that its RMS is ``c``
    times the side; torchvision's ``elastic`` warps (``ElasticTransform`` draws one field per call, far slower)."""
    n, height, width = x.shape[0], *x.shape[-2:]
    side = min(height, width)
    sigma = _ELASTIC_SMOOTHING * side
    kernel = int(8 * sigma + 1) | 1  # ElasticTransform's kernel, odd, within reflection padding's reach
    kernel = min(kernel, 2 * side - 1 if (2 * side - 1) % 2 else 2 * side - 2)
    field = TF.gaussian_blur(_rand((n, 2, height, width), g) * 2 - 1, [kernel, kernel], [sigma, sigma])
    field = field * (c * side / field.square().mean().sqrt().clamp_min(1e-12))  # RMS displacement c * side pixels
    grid_units = field * torch.tensor([2 / width, 2 / height]).view(1, 2, 1, 1)  # pixels -> grid coordinates
    displacement = grid_units.permute(0, 2, 3, 1)  # [N, H, W, 2] (x, y), as torchvision's ElasticTransform
    warped = [TF.elastic(image, d.unsqueeze(0)) for image, d in zip(x, displacement, strict=True)]
    return torch.stack(warped).clamp(0, 1)


_IMAGE: dict[str, Callable[[Tensor, float, torch.Generator | None], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
    "jpeg": _jpeg,
    "elastic": _elastic,
}


# ---------------------------------------------------------------------------------------------- signals and rows
def _statistics(domain: InputDomain, x: Tensor) -> tuple[Tensor, Tensor]:
    """The training mean and std, broadcastable to one input; before the domain saw data, the box's center and half
    range stand in for them."""
    if domain.mean is not None:
        return domain.mean.to(x), domain.std.to(x)
    center, scale = domain.center_and_scale(x)
    return center.to(x), scale.to(x)


def _time_shift(x: Tensor, c: float, domain: InputDomain, g: torch.Generator | None) -> Tensor:
    """Each signal moved by ``c`` of its length, forwards or backwards; the edge value fills the gap."""
    n, length = x.shape[0], x.shape[-1]
    steps = _signs(n, g) * round(c * length)
    index = (torch.arange(length).unsqueeze(0) - steps.long().unsqueeze(1)).clamp(0, length - 1)
    return x.gather(-1, index.unsqueeze(1).expand(-1, x.shape[1], -1))


def _amplitude_scaling(x: Tensor, c: float, domain: InputDomain, g: torch.Generator | None) -> Tensor:
    """Each signal's deviation from its own mean multiplied by ``c`` or ``1 / c`` (a sensor gain)."""
    gains = torch.exp(_signs(x.shape[0], g) * math.log(c)).view(-1, 1, 1)
    mean = x.mean(dim=-1, keepdim=True)
    return mean + (x - mean) * gains


def _additive_noise(x: Tensor, c: float, domain: InputDomain, g: torch.Generator | None) -> Tensor:
    return x + c * _statistics(domain, x)[1] * _randn(x.shape, g)


def _sample_dropout(x: Tensor, c: float, domain: InputDomain, g: torch.Generator | None) -> Tensor:
    """A fraction ``c`` of the time steps (all channels) read the training mean: a sensor that drops out."""
    dropped = (_rand((x.shape[0], 1, x.shape[-1]), g) < c).expand_as(x)
    return torch.where(dropped, _statistics(domain, x)[0].expand_as(x), x)


def _baseline_drift(x: Tensor, c: float, domain: InputDomain, g: torch.Generator | None) -> Tensor:
    """A linear drift from ``-c / 2`` to ``+c / 2`` training stds over the signal (either sign): baseline wander."""
    ramp = torch.linspace(-0.5, 0.5, x.shape[-1])
    return x + (_signs(x.shape[0], g).view(-1, 1, 1) * c * ramp) * _statistics(domain, x)[1]


def _feature_noise(x: Tensor, c: float, domain: InputDomain, g: torch.Generator | None) -> Tensor:
    return x + c * _statistics(domain, x)[1] * _randn(x.shape, g)


def _feature_scaling(x: Tensor, c: float, domain: InputDomain, g: torch.Generator | None) -> Tensor:
    """Every feature's deviation from its training mean multiplied by a gain log-uniform in ``[1/c, c]``, one per
    feature for the whole call (a change of units or of a sensor's gain)."""
    mean = _statistics(domain, x)[0]
    gains = torch.exp((_rand(x.shape[1:], g) * 2 - 1) * math.log(c))
    return mean + (x - mean) * gains


def _feature_offset(x: Tensor, c: float, domain: InputDomain, g: torch.Generator | None) -> Tensor:
    """Every feature moved by an offset uniform in ``[-c, c]`` training stds, one per feature for the whole call."""
    return x + (_rand(x.shape[1:], g) * 2 - 1) * c * _statistics(domain, x)[1]


def _missing_values(x: Tensor, c: float, domain: InputDomain, g: torch.Generator | None) -> Tensor:
    """A fraction ``c`` of the values missing, imputed with the feature's training mean (the usual fix)."""
    return torch.where(_rand(x.shape, g) < c, _statistics(domain, x)[0].expand_as(x), x)


_DATA: dict[str, Callable[[Tensor, float, InputDomain, torch.Generator | None], Tensor]] = {
    "time_shift": _time_shift,
    "amplitude_scaling": _amplitude_scaling,
    "additive_noise": _additive_noise,
    "sample_dropout": _sample_dropout,
    "baseline_drift": _baseline_drift,
    "feature_noise": _feature_noise,
    "feature_scaling": _feature_scaling,
    "feature_offset": _feature_offset,
    "missing_values": _missing_values,
}


def check_shift(name: str, shape: Sequence[int] | None = None) -> str:
    """The data kind of the shift ``name``; ``ValueError`` for an unknown shift or one of another kind than inputs of
    ``shape``."""
    if name not in _KIND_OF:
        known = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in SHIFTS.items())
        raise ValueError(f"unknown shift {name!r}; known shifts by data kind: {known}")
    if shape is not None and _KIND_OF[name] != data_kind(shape):
        raise ValueError(
            f"the shift {name!r} is for {_KIND_OF[name]} data, but the inputs of shape {tuple(shape)} are "
            f"{data_kind(shape)} data: use one of {', '.join(SHIFTS[data_kind(shape)])}"
        )
    return _KIND_OF[name]


def corrupt(
    x: Tensor,
    name: str,
    severity: int,
    domain: InputDomain | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The inputs ``x [N, *shape]`` under the shift ``name`` at ``severity`` (0: unchanged, 1 to 5: ever stronger).

    Args:
        x: a batch of images ``[N, C, H, W]``, signals ``[N, C, T]`` or rows ``[N, F]``, in the data's own units.
        name: a shift of the inputs' kind (:data:`SHIFTS`).
        severity: 0 (the identity) to 5; the parameters are in :data:`SEVERITIES`.
        domain: where the inputs live (a JEM's ``domain``): images are mapped to ``[0, 1]`` with its box; signal
            and tabular shifts are measured in its training statistics. Default: the unit box ``[-1, 1]``.
        generator: the random stream (CPU); ``None`` draws from torch's global one.

    Returns:
        The shifted inputs, same shape, dtype and device as ``x``. Images stay within the domain's box; signals and
        rows may leave it (that is the shift).

    Example::

        >>> blurred = corrupt(x_test, "gaussian_blur", 3, domain=jem.domain, generator=torch.Generator().manual_seed(0))
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"corrupt expects a batch of inputs [N, *shape], got {getattr(x, 'shape', type(x))}")
    kind = check_shift(name, x.shape[1:])
    check_integer("severity", severity, minimum=0)
    if severity > 5:
        raise ValueError(f"severity must be an integer from 0 to 5, got {severity!r}")
    if severity == 0:
        return x.clone()
    domain = domain if domain is not None else InputDomain()
    c = SEVERITIES[name][severity - 1]
    device, dtype = x.device, x.dtype
    data = x.detach().float().cpu()
    if kind == "image":
        unit01 = ((domain.to_unit(data) + 1) / 2).clamp(0, 1)
        shifted = domain.from_unit(_IMAGE[name](unit01, c, generator) * 2 - 1)
    else:
        shifted = _DATA[name](data, c, domain, generator)  # the domain's statistics are copied to the CPU
    return shifted.to(device=device, dtype=dtype)
