"""Calibration and accuracy under distribution shift: corruptions per data kind, at severities 1 to 5.

Ovadia et al. (2019) asked whether a model's uncertainty can be trusted when the data shifts, and measured accuracy
and ECE per corruption and severity (CIFAR-10-C, ImageNet-C). This module generates such shifted test sets on the fly
from a clean test split, for every kind of input jemkit handles, and reports accuracy, NLL and ECE on each, before and
after a temperature fitted on clean validation data, optionally with test-time adaptation (:mod:`jemkit.adapt`).

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
every row: corrupt a whole set in one call (as :func:`shift_report` does), not batch by batch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from jemkit.adapters import select_logits, unpack_batch
from jemkit.checks import check_integer
from jemkit.evaluate.calibration import calibration_report
from jemkit.evaluate.plots import save_figure
from jemkit.evaluate.samples import picture_kind
from jemkit.evaluate.tables import text_table
from jemkit.sampling.domain import InputDomain

__all__ = [
    "SEVERITIES",
    "SHIFTS",
    "ShiftOptions",
    "corrupt",
    "data_kind",
    "format_shift",
    "shift_figure",
    "shift_report",
    "shift_section",
]

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
    :func:`~jemkit.evaluate.samples.picture_kind` tells kinds apart (2-D points count as tabular rows)."""
    kind = picture_kind(tuple(shape))
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


def _check_shift(name: str, shape: Sequence[int] | None = None) -> str:
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
    kind = _check_shift(name, x.shape[1:])
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


# ---------------------------------------------------------------------------------------------- the report
_METRICS = ("accuracy", "nll", "brier", "ece", "mce")


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _gather(dataset: Dataset, max_samples: int | None, batch_size: int) -> tuple[Tensor, Tensor]:
    if max_samples is not None and len(dataset) > max_samples:
        dataset = Subset(dataset, range(max_samples))
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = unpack_batch(batch)
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError("shift_report got an empty dataset")
    return torch.cat(xs), torch.cat(ys).long()


@contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _predict(model: nn.Module, adapt: Any, x: Tensor, batch_size: int) -> Tensor:
    """Logits ``[N, C]`` of ``x``: the model as it is, or each batch adapted first (``adapt``, reset before)."""
    device = _model_device(model if adapt is None else adapt)
    logits = []
    if adapt is not None:
        adapt.reset()
        for chunk in x.split(batch_size):
            logits.append(adapt(chunk.to(device)).detach().float().cpu())
        return torch.cat(logits)
    with torch.no_grad(), _evaluation_mode(model):
        for chunk in x.split(batch_size):
            logits.append(select_logits(model(chunk.to(device))).float().cpu())
    return torch.cat(logits)


def _metrics(logits: Tensor, y: Tensor, temperature: float | None, n_bins: int) -> dict[str, float]:
    raw = calibration_report(logits, y, n_bins)
    result = {k: raw[k] for k in _METRICS}
    if temperature is not None:
        scaled = calibration_report(logits / temperature, y, n_bins)
        result |= {f"{k}_scaled": scaled[k] for k in _METRICS if k != "accuracy"}
    return result


def _mean(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(row[k] for row in rows) for k in rows[0]} if rows else {}


def _resolve_adapter(adapt: Any, model: nn.Module, domain: InputDomain | None) -> Any:
    if adapt is None or not isinstance(adapt, str):
        if adapt is not None and not (callable(adapt) and hasattr(adapt, "reset")):
            raise TypeError(
                f"adapt must be None, a method name ('energy', 'tent') or an adapter with reset() such as "
                f"jemkit.adapt.EnergyAdaptation, got {type(adapt).__name__}"
            )
        return adapt
    from jemkit.adapt import make_adapter  # evaluation without adaptation never loads it

    return make_adapter(adapt, model, domain=domain).to(_model_device(model))


def shift_report(
    model: nn.Module,
    dataset: Dataset,
    domain: InputDomain | None = None,
    temperature: float | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    shifts: Sequence[str] | None = None,
    n_bins: int = 15,
    batch_size: int = 128,
    max_samples: int | None = None,
    adapt: Any = None,
    progress: bool = False,
    seed: int = 0,
    corrupted: Mapping[str, Mapping[int, Dataset]] | None = None,
) -> dict[str, Any]:
    """Accuracy, NLL, Brier, ECE and MCE of ``model`` on ``dataset`` (clean) and under every shift and severity.

    Args:
        model: a :class:`jemkit.JEM` or any classifier returning logits (a one-logit binary head is read as two).
        dataset: the clean test split, ``(x, y)`` items; the shifted sets are generated from it (the first
            ``max_samples`` items).
        domain: where the inputs live; default the model's ``domain`` (a JEM's), else the unit box ``[-1, 1]``.
        temperature: a temperature fitted by the caller on clean validation data
            (:func:`jemkit.metrics.fit_temperature`); NLL, Brier, ECE and MCE are then also reported after it
            (``*_scaled``).
        severities: severities to measure, each 1 to 5 (the clean set is always measured, as severity 0).
        shifts: shift names (:data:`SHIFTS`); default all of the data's kind.
        n_bins: equal-width confidence bins of ECE/MCE.
        batch_size: evaluation (and adaptation) batch size.
        max_samples: cap on the number of test items; ``None`` for all.
        adapt: test-time adaptation: ``None``, a method name (``"energy"``, ``"tent"``; built with
            :func:`jemkit.adapt.make_adapter` around ``model`` and ``domain``) or a ready adapter (e.g.
            ``EnergyAdaptation(model)``), which is reset before every set and adapts continually over its batches
            (episodically if built so), as in Tent's and TEA's protocol; the model is restored at the end.
        progress: show a progress bar over the sets.
        seed: seed of the corruptions' random stream: the same seed, the same shifted sets.
        corrupted: ready-made shifted sets ``{shift: {severity: Dataset}}`` (e.g.
            :meth:`jemkit.data.CIFAR10CDataModule.corrupted_sets`) to measure instead of generating them; then
            ``shifts`` and ``severities`` default to what it holds.

    Returns:
        ``{"kind", "shifts", "severities", "num_samples", "temperature", "adapt", "seed", "clean": metrics,
        "results": {shift: {severity: metrics}}, "by_severity": {severity: mean over shifts}, "mean": mean over every
        shift and severity, "mean_severe": mean over severities 3 to 5}``, metrics being ``accuracy, nll, brier, ece,
        mce`` (and ``*_scaled`` with a temperature); severities are string keys (JSON).
    """
    check_integer("batch_size", batch_size)
    check_integer("n_bins", n_bins)
    if max_samples is not None:
        check_integer("max_samples", max_samples)
    if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0 or None, got {temperature!r}")
    domain = domain if domain is not None else getattr(model, "domain", None)
    if domain is not None and not isinstance(domain, InputDomain):
        raise TypeError(f"domain must be an InputDomain or None, got {type(domain).__name__}")
    x, y = _gather(dataset, max_samples, batch_size)
    kind = data_kind(x.shape[1:])
    if corrupted is not None:
        shifts = list(shifts if shifts is not None else corrupted)
        severities = list(severities if severities is not None else sorted({s for v in corrupted.values() for s in v}))
        missing = [(n, s) for n in shifts for s in severities if n not in corrupted or s not in corrupted[n]]
        if missing:
            raise ValueError(f"corrupted holds no set for (shift, severity) {missing[:5]}; it has {sorted(corrupted)}")
    else:
        shifts = list(shifts if shifts is not None else SHIFTS[kind])
        for name in shifts:
            _check_shift(name, x.shape[1:])
    severities = [int(s) for s in severities]
    for s in severities:
        if isinstance(s, bool) or not 1 <= s <= 5:
            raise ValueError(f"severities must be integers from 1 to 5, got {list(severities)}")
    if not shifts or not severities:
        raise ValueError(f"shift_report needs at least one shift and one severity, got {shifts} and {severities}")
    adapter = _resolve_adapter(adapt, model, domain)
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, dict[str, dict[str, float]]] = {}
    jobs = [(name, s) for name in shifts for s in severities]
    try:
        clean = _metrics(_predict(model, adapter, x, batch_size), y, temperature, n_bins)
        for name, s in tqdm(jobs, desc="shifts", disable=not progress, leave=False):
            if corrupted is not None:
                x_shift, y_shift = _gather(corrupted[name][s], max_samples, batch_size)
            else:
                x_shift, y_shift = corrupt(x, name, s, domain, generator), y
            logits = _predict(model, adapter, x_shift, batch_size)
            results.setdefault(name, {})[str(s)] = _metrics(logits, y_shift, temperature, n_bins)
    finally:
        if adapter is not None:
            adapter.reset()  # the model leaves as it came: the adapted parameters restored exactly
    by_severity = {str(s): _mean([results[n][str(s)] for n in shifts]) for s in severities}
    severe = [results[n][str(s)] for n in shifts for s in severities if s >= 3]
    return {
        "kind": kind,
        "shifts": shifts,
        "severities": severities,
        "num_samples": len(x),
        "temperature": temperature,
        "adapt": None if adapter is None else repr(adapter),
        "seed": seed,
        "clean": clean,
        "results": results,
        "by_severity": by_severity,
        "mean": _mean([row for rows in results.values() for row in rows.values()]),
        "mean_severe": _mean(severe),
    }


# ---------------------------------------------------------------------------------------------- rendering
def _cell(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def format_shift(section: dict[str, Any]) -> str:
    """A text rendering of :func:`shift_report`'s result: accuracy per shift and severity, then the summary rows
    (clean, each severity, the means) with NLL and ECE, raw and after the temperature. Figures in percent but NLL."""
    scaled = section.get("temperature") is not None
    severities = [str(s) for s in section["severities"]]
    title = f"Distribution shift ({section['kind']} data, {section['num_samples']} examples per set"
    title += f"; T={section['temperature']:.3f}" if scaled else ""
    title += f"; adaptation: {section['adapt']})" if section.get("adapt") else ")"
    per_shift = [
        [
            name,
            *(_cell(rows[s]["accuracy"]) for s in severities),
            _cell(_mean(list(rows.values()))["accuracy"]),
            _cell(_mean(list(rows.values()))["ece"]),
            *([_cell(_mean(list(rows.values()))["ece_scaled"])] if scaled else []),
        ]
        for name, rows in section["results"].items()
    ]
    header = ["shift", *(f"acc s{s}" for s in severities), "acc mean", "ECE mean", *(["ECE(T) mean"] if scaled else [])]
    summary_rows = [("clean", section["clean"])]
    summary_rows += [(f"severity {s}", section["by_severity"][s]) for s in severities]
    summary_rows += [("mean", section["mean"])]
    if section["mean_severe"]:
        summary_rows += [("mean, severity 3-5", section["mean_severe"])]
    summary = [
        [
            label,
            _cell(m["accuracy"]),
            _cell(m["nll"], percent=False),
            _cell(m["ece"]),
            *([_cell(m["nll_scaled"], percent=False), _cell(m["ece_scaled"])] if scaled else []),
        ]
        for label, m in summary_rows
    ]
    summary_header = ["set", "acc %", "NLL", "ECE %", *(["NLL(T)", "ECE(T) %"] if scaled else [])]
    return "\n".join([title, text_table(header, per_shift), "", text_table(summary_header, summary)])


def shift_figure(section: dict[str, Any]) -> Figure:
    """Accuracy (left) and ECE (right) against severity (0: clean), one thin line per shift and the mean over shifts
    in black; with a temperature, the mean ECE after it dashed. Save it with
    :func:`~jemkit.evaluate.plots.save_figure`."""
    severities = [0, *section["severities"]]
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_ece = fig.subplots(1, 2)
    for name, rows in section["results"].items():
        for ax, key in ((ax_acc, "accuracy"), (ax_ece, "ece")):
            values = [section["clean"][key], *(rows[str(s)][key] for s in section["severities"])]
            ax.plot(severities, [100 * v for v in values], marker="o", markersize=3, linewidth=1, label=name)
    means = [section["clean"], *(section["by_severity"][str(s)] for s in section["severities"])]
    for ax, key in ((ax_acc, "accuracy"), (ax_ece, "ece")):
        ax.plot(severities, [100 * m[key] for m in means], color="black", linewidth=2.5, label="mean")
        ax.set_xlabel("severity (0: clean)")
        ax.set_xticks(severities)
    if section.get("temperature") is not None:
        ax_ece.plot(
            severities,
            [100 * m["ece_scaled"] for m in means],
            color="black",
            linestyle="--",
            linewidth=2,
            label=f"mean after T={section['temperature']:.2f}",
        )
    ax_acc.set_ylabel("accuracy %")
    ax_ece.set_ylabel("ECE %")
    ax_acc.set_title("Accuracy under shift")
    ax_ece.set_title("Calibration under shift")
    ax_ece.legend(fontsize=7, loc="upper left")
    return fig


# ---------------------------------------------------------------------------------------------- options
ADAPT_MODES = ("continual", "episodic")


@dataclass
class ShiftOptions:
    """What the shift section measures (``jemkit evaluate --shift.*``).

    Args:
        shifts: shift names (:data:`SHIFTS`); ``None`` for all of the data's kind.
        severities: severities 1 to 5 to measure (the clean set is always measured).
        adapt: test-time adaptation: ``None``, ``"energy"`` (TEA: the contrastive energy with Langevin negatives)
            or ``"tent"`` (entropy minimisation); both update only the normalisation layers' affine parameters
            (:mod:`jemkit.adapt`).
        adapt_mode: ``"continual"`` (adapt over the batches of a set, reset between sets: Tent's and TEA's protocol)
            or ``"episodic"`` (reset before every batch).
        adapt_steps: optimiser updates per test batch (TEA and Tent: 1).
        adapt_lr: the adaptation's Adam learning rate (TEA and Tent: 1e-3).
        adapt_arguments: further keyword arguments of the adapter, e.g. ``{"sampler": SGLD(40, 0.1, 0.01)}`` for
            the energy adaptation's chains (see :class:`~jemkit.adapt.EnergyAdaptation`).
        seed: seed of the corruptions: the same seed, the same shifted sets.

    Example::

        >>> options = ShiftOptions(severities=[3, 5], adapt="energy")
        >>> section = options.report(jem, datamodule.test_dataset, temperature=1.3)
    """

    shifts: list[str] | None = None
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    adapt: str | None = None
    adapt_mode: str = "continual"
    adapt_steps: int = 1
    adapt_lr: float = 1e-3
    adapt_arguments: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def check(self, input_shape: Sequence[int] | None = None) -> None:
        """Refuse unknown shifts (or shifts of another data kind than ``input_shape``'s), severities outside 1-5 and
        unknown adaptation settings, before any work is done."""
        for name in self.shifts or []:
            _check_shift(name, input_shape)
        if not self.severities or any(isinstance(s, bool) or s not in (1, 2, 3, 4, 5) for s in self.severities):
            raise ValueError(f"severities must be integers from 1 to 5, got {self.severities!r}")
        if self.adapt is not None and self.adapt not in ("energy", "tent"):
            raise ValueError(f"adapt must be None, 'energy' or 'tent', got {self.adapt!r}")
        if self.adapt_mode not in ADAPT_MODES:
            raise ValueError(f"adapt_mode must be one of {ADAPT_MODES}, got {self.adapt_mode!r}")
        check_integer("adapt_steps", self.adapt_steps)
        if isinstance(self.adapt_lr, bool) or not (isinstance(self.adapt_lr, (int, float)) and self.adapt_lr > 0):
            raise ValueError(f"adapt_lr must be a number > 0, got {self.adapt_lr!r}")
        check_integer("seed", self.seed, minimum=0)

    def adapter(self, model: nn.Module, domain: InputDomain | None = None) -> Any:
        """The adapter these options ask for around ``model`` (``None`` without adaptation); a classifier without
        normalisation layers raises ``ValueError`` here."""
        if self.adapt is None:
            return None
        from jemkit.adapt import make_adapter

        options = {"mode": self.adapt_mode, "steps": self.adapt_steps, "lr": self.adapt_lr, **self.adapt_arguments}
        return make_adapter(self.adapt, model, domain=domain, **options).to(_model_device(model))

    def report(
        self,
        model: nn.Module,
        dataset: Dataset,
        domain: InputDomain | None = None,
        temperature: float | None = None,
        n_bins: int = 15,
        batch_size: int = 128,
        max_samples: int | None = 1000,
        progress: bool = False,
    ) -> dict[str, Any]:
        """:func:`shift_report` with these options."""
        self.check()
        domain = domain if domain is not None else getattr(model, "domain", None)
        return shift_report(
            model,
            dataset,
            domain,
            temperature,
            severities=self.severities,
            shifts=self.shifts,
            n_bins=n_bins,
            batch_size=batch_size,
            max_samples=max_samples,
            adapt=self.adapter(model, domain),
            progress=progress,
            seed=self.seed,
        )


def shift_section(
    model: nn.Module,
    test_set: Dataset,
    options: ShiftOptions,
    out: Path,
    temperature: float | None = None,
    n_bins: int = 15,
    max_samples: int | None = 1000,
    batch_size: int = 128,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(section, figures)`` for the evaluation report: :meth:`ShiftOptions.report` on the test split (the
    temperature is the calibration section's), and the figure of accuracy and ECE against severity."""
    section = options.report(model, test_set, None, temperature, n_bins, batch_size, max_samples, progress)
    return section, {"shift": str(save_figure(shift_figure(section), out / "shift.png"))}
