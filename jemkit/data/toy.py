"""A labelled 2-D mixture of Gaussians whose true density is known, for tests and pictures.

On real images nobody knows ``p(x)``, so whether a sampler or an energy is right can only be judged
indirectly. Here the data come from ``K`` isotropic Gaussians on a circle, one per class, so a trained JEM's
``exp(-E(x))``, its samples and its ``p(y | x)`` can be compared against the exact answer (``means``, ``std``,
``log_prob``) and drawn on a plane in a few seconds of CPU time.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from jemkit.checks import check_integer
from jemkit.data._common import SplitDataModule, check_batch_size, check_split_fractions

__all__ = ["GaussianMixtureDataModule"]


class GaussianMixtureDataModule(SplitDataModule):
    """``num_classes`` equally likely isotropic Gaussians, means evenly spaced on a circle; class = component.

    Component ``k`` has mean ``radius * (cos(2 pi k / K), sin(2 pi k / K))`` and standard deviation ``std`` in
    each coordinate. With the defaults (radius 0.6, std 0.08) all but a negligible fraction of the samples lie
    in ``data_range = (-1, 1)`` per coordinate. Samples are float32 ``[N, 2]``, labels int64, every class gets
    ``num_samples // K`` or one more samples, and the draw and the train/val/test split are fixed by ``seed``.

    Args:
        num_classes: number of mixture components (= classes), >= 2.
        num_samples: total samples over all three splits.
        radius: radius of the circle the means sit on.
        std: standard deviation of every component (per coordinate).
        batch_size: examples per batch in every loader (the train loader drops the last partial batch).
        val_fraction: fraction of the samples held out for validation, in (0, 1).
        test_fraction: fraction of the samples held out for testing, in (0, 1); the fractions must sum to < 1.
        seed: seed of the sampling and of the split.
        num_workers: ``DataLoader`` worker processes.

    Example::

        dm = GaussianMixtureDataModule(num_classes=4, num_samples=1000)
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [128, 2], y: [128]
        true_log_px = dm.log_prob(x)  # exact log-density of the mixture, [128]
    """

    input_shape: ClassVar[tuple[int, ...]] = (2,)
    data_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)

    def __init__(
        self,
        num_classes: int = 8,
        num_samples: int = 4000,
        radius: float = 0.6,
        std: float = 0.08,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_integer("num_classes", num_classes, minimum=2)
        if not radius > 0 or not std > 0:
            raise ValueError(f"radius and std must both be > 0, got radius={radius!r}, std={std!r}")
        check_batch_size(batch_size)
        check_split_fractions(val_fraction, test_fraction)
        n_test = round(num_samples * test_fraction)
        n_val = round(num_samples * val_fraction)
        if min(n_val, n_test, num_samples - n_val - n_test) < 1:
            raise ValueError(
                f"num_samples={num_samples!r} is too small for val_fraction={val_fraction!r} and "
                f"test_fraction={test_fraction!r}: every split needs at least one sample"
            )
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.radius = radius
        self.std = std
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self._split_sizes = [num_samples - n_val - n_test, n_val, n_test]
        angles = 2 * math.pi * torch.arange(num_classes, dtype=torch.float64) / num_classes
        self.means: Tensor = (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``num_samples`` balanced, shuffled pairs: ``x [N, 2]`` float32, ``y [N]`` int64."""
        y = torch.arange(num_samples) % self.num_classes
        y = y[torch.randperm(num_samples, generator=generator)]
        x = self.means[y] + self.std * torch.randn(num_samples, 2, generator=generator)
        return x, y

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)`` of the mixture for points ``[N, 2]`` -> ``[N]``."""
        sq_dist = (x.unsqueeze(1) - self.means.to(x)).pow(2).sum(-1)  # [N, K]
        log_component = -0.5 * sq_dist / self.std**2 - math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(log_component, dim=1) - math.log(self.num_classes)

    def setup(self, stage: str | None = None) -> None:
        """Draw and split the samples once; later calls (any stage) are no-ops."""
        if self.train_dataset is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        x, y = self.sample(self.num_samples, generator)  # already shuffled, so contiguous slices are random
        train, val, test = zip(x.split(self._split_sizes), y.split(self._split_sizes), strict=True)
        self.train_dataset = TensorDataset(*train)
        self.val_dataset = TensorDataset(*val)
        self.test_dataset = TensorDataset(*test)
