"""Synthetic 1-D signals as a LightningDataModule: a seeded, offline sequence-classification task for Conv1d models.

Each class is a smooth template (three Gaussian-windowed oscillations, "wave packets"); an example is its class
template shifted in time, scaled, offset and drowned in Gaussian noise. A small Conv1d network (``SignalCNN``) learns it
to about 94-97% test accuracy in a thousand Adam steps. The default shift of up to 15% of the length is too small to
hold a plain MLP back (it scores within about 2 points of the CNN, either way); with ``max_shift=0.3`` the MLP falls
behind, by 1-10 points in our runs. The signals keep raw amplitudes of up to about ``+-6``: they are *not* scaled
into ``[-1, 1]`` and there is no ``data_range``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from jemkit.checks import check_integer, check_nonnegative
from jemkit.data._common import SplitDataModule, check_batch_size, check_split_fractions, stratified_split

__all__ = ["SignalsDataModule"]

_PACKETS = 3  # wave packets per template
# Ranges of a packet's centre and width (fractions of the length), height, frequency (cycles per length) and phase.
_LOW = (0.2, 0.05, 1.0, 3.0, 0.0)
_HIGH = (0.8, 0.12, 2.0, 8.0, 2 * math.pi)
_PEAK = 2.0  # every template's largest absolute value
_SCALES = (0.5, 2.0)  # amplitude scaling of an example, log-uniform
_OFFSETS = (-1.0, 1.0)  # constant offset of an example, uniform
_MAX_SIMILARITY = 0.8  # templates are redrawn until no two correlate more than this, at any shift
_MAX_MISSES = 300  # give up after this many rejected templates in a row


class SignalsDataModule(SplitDataModule):
    """``num_classes`` classes of noisy, shifted, scaled 1-D signals ``[N, 1, length]``, channels first as Conv1d wants.

    Class ``k`` has a fixed template ``templates[k]`` (``length`` samples), the sum of three wave packets
    ``h * exp(-(t - c)^2 / (2 w^2)) * cos(2 pi f (t - c) + phi)`` (``t`` in ``[0, 1)`` along the signal) with centre
    ``c`` in the middle 60% of the signal, width ``w`` of 5-12% of the length, height ``h`` of either sign, frequency
    ``f`` of 3-8 cycles per length and a random phase, scaled so that the template's largest absolute value is 2.
    The templates depend only on ``num_classes``, ``length`` and ``template_seed`` (so every ``seed`` poses the same
    task), and no two of them correlate by more than 0.8 at any whole-sample shift. An example of class ``k`` is::

        x(t) = a * template_k(t - s) + b + noise_std * eps(t)

    with the shift ``s`` uniform in ``[-max_shift, max_shift]`` (times the length in samples; continuous; the packets
    fade out towards the ends, so it acts as a zero-padded shift: nothing wraps around), ``a`` log-uniform in
    ``[0.5, 2]``, ``b`` uniform in ``[-1, 1]`` and ``eps`` standard normal. Values therefore stay within about
    ``[-6, 6]``. Inputs are float32 ``[N, 1, length]``, labels int64 ``[N]``; every class gets
    ``num_samples // num_classes`` examples or one more, and the draw and the stratified train/val/test split are fixed
    by ``seed``.

    Args:
        num_classes: number of classes (templates), >= 2.
        length: samples per signal, >= 8.
        num_samples: total examples over all three splits.
        noise_std: standard deviation of the additive Gaussian noise.
        max_shift: largest time shift, as a fraction of ``length``, in [0, 0.5).
        template_seed: seed of the class templates (the task itself).
        batch_size: examples per batch in every loader (the train loader drops the last partial batch).
        val_fraction: fraction of the examples held out for validation, in (0, 1).
        test_fraction: fraction of the examples held out for testing, in (0, 1); the fractions must sum to < 1.
        seed: seed of the draw of the examples and of the split.
        num_workers: ``DataLoader`` worker processes; 0 loads in the main process, which is fastest here.

    Attributes:
        templates: the clean class templates ``[num_classes, length]``.
        input_shape: ``(1, length)``.
        data_range: ``None``: the signals are unbounded (Gaussian noise); a JEM's ``InputDomain`` fits the box on the
            training data.

    Example::

        dm = SignalsDataModule(batch_size=32)
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [32, 1, 40] float32, y: [32] int64 in 0..9
    """

    data_range: ClassVar[tuple[float, float] | None] = None

    def __init__(
        self,
        num_classes: int = 10,
        length: int = 40,
        num_samples: int = 3000,
        noise_std: float = 0.35,
        max_shift: float = 0.15,
        template_seed: int = 0,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_classes", num_classes, 2),
            ("length", length, 8),
            ("num_samples", num_samples, 1),
        ):
            check_integer(name, value, low)
        check_nonnegative("noise_std", noise_std)
        if not 0 <= max_shift < 0.5:
            raise ValueError(f"max_shift must be a fraction of the length in [0, 0.5), got {max_shift!r}")
        check_batch_size(batch_size)
        check_split_fractions(val_fraction, test_fraction)
        check_integer("num_workers", num_workers, minimum=0)
        n_test = math.ceil(num_samples * test_fraction)
        n_val = math.ceil((num_samples - n_test) * val_fraction / (1.0 - test_fraction))
        if min(n_test, n_val, num_samples - n_test - n_val) < num_classes:
            raise ValueError(
                f"num_samples={num_samples!r} is too small for a stratified split with val_fraction={val_fraction!r} "
                f"and test_fraction={test_fraction!r}: every split needs at least num_classes={num_classes} examples"
            )
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.length = length
        self.input_shape: tuple[int, ...] = (1, length)
        self.num_samples = num_samples
        self.noise_std = noise_std
        self.max_shift = max_shift
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self._packets = self._draw_templates(num_classes, length, template_seed)
        self.templates: Tensor = self._render(self._packets, torch.zeros(num_classes, dtype=torch.float64)).float()
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def _render(self, params: Tensor, shifts: Tensor) -> Tensor:
        """Wave packets ``params [n, packets, 5]`` moved by ``shifts [n]`` (fractions of the length) -> ``[n, length]``.

        A packet's five numbers are its centre and width (fractions of the length), height, frequency (cycles per
        length) and phase: ``height * exp(-(t - centre)^2 / (2 width^2)) * cos(2 pi frequency (t - centre) + phase)``.
        """
        t = (torch.arange(self.length, dtype=torch.float64) + 0.5) / self.length
        centre, width, height, frequency, phase = (p.unsqueeze(-1) for p in params.unbind(-1))  # [n, packets, 1]
        d = t - centre - shifts[:, None, None]  # [n, packets, length]
        packets = height * torch.exp(-0.5 * (d / width) ** 2) * torch.cos(2 * math.pi * frequency * d + phase)
        return packets.sum(1)

    def _draw_templates(self, num_classes: int, length: int, seed: int) -> Tensor:
        """Wave-packet parameters ``[num_classes, packets, 5]``, redrawn until the templates are distinct."""
        generator = torch.Generator().manual_seed(seed)
        shifts = torch.arange(-length + 1, length, dtype=torch.float64) / length
        kept: list[Tensor] = []
        bank = torch.empty(0, length, dtype=torch.float64)  # every kept template at every shift, centred, unit norm
        low, high = torch.tensor(_LOW, dtype=torch.float64), torch.tensor(_HIGH, dtype=torch.float64)
        misses = 0
        while len(kept) < num_classes:
            params = low + (high - low) * torch.rand(_PACKETS, 5, generator=generator, dtype=torch.float64)
            signs = torch.where(torch.rand(_PACKETS, generator=generator) < 0.5, -1.0, 1.0).double()
            params[:, 2] *= signs
            template = self._render(params[None], torch.zeros(1, dtype=torch.float64))[0]
            shifted = self._render(params[None].expand(len(shifts), -1, -1), shifts)
            shifted = shifted - shifted.mean(1, keepdim=True)
            shifted = shifted / shifted.norm(dim=1, keepdim=True).clamp_min(1e-12)
            unit = (template - template.mean()) / (template - template.mean()).norm()
            if len(bank) == 0 or (bank @ unit).max() <= _MAX_SIMILARITY:
                params[:, 2] *= _PEAK / template.abs().max()
                kept.append(params)
                bank = torch.cat([bank, shifted])
                misses = 0
            else:
                misses += 1
                if misses == _MAX_MISSES:
                    raise ValueError(
                        f"could not draw {num_classes} distinct templates of length {length} (found {len(kept)}); use "
                        "fewer classes or a longer length"
                    )
        return torch.stack(kept)

    def sample(
        self, num_samples: int, generator: torch.Generator | None = None, noise_std: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``num_samples`` balanced, shuffled pairs: ``x [N, 1, length]`` float32, ``y [N]`` int64.

        ``noise_std`` overrides the module's (``0`` gives clean, shifted and scaled templates).
        """
        noise_std = self.noise_std if noise_std is None else noise_std
        y = torch.arange(num_samples) % self.num_classes
        y = y[torch.randperm(num_samples, generator=generator)]
        f64 = torch.float64
        shifts = (2 * torch.rand(num_samples, generator=generator, dtype=f64) - 1) * self.max_shift
        clean = self._render(self._packets[y], shifts)
        log_scale = torch.empty(num_samples, 1, dtype=f64).uniform_(*map(math.log, _SCALES), generator=generator)
        offset = torch.empty(num_samples, 1, dtype=f64).uniform_(*_OFFSETS, generator=generator)
        noise = torch.randn(num_samples, self.length, generator=generator, dtype=f64)
        x = log_scale.exp() * clean + offset + noise_std * noise
        return x.float().unsqueeze(1), y

    def setup(self, stage: str | None = None) -> None:
        """Draw and split the examples once; later calls (any stage) are no-ops."""
        if self.train_dataset is not None:
            return
        x, y = self.sample(self.num_samples, torch.Generator().manual_seed(self.seed))
        labels = y.numpy()
        train, val, test = stratified_split(labels, self.val_fraction, self.test_fraction, self.seed)
        self.train_dataset = TensorDataset(x[train], y[train])
        self.val_dataset = TensorDataset(x[val], y[val])
        self.test_dataset = TensorDataset(x[test], y[test])
