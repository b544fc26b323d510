"""Initial distributions for sampler chains: where fresh chains start and where re-initialised buffer slots come from.

JEM starts chains from uniform noise on the data range; later work (JEM++) starts them from a Gaussian fitted to the
data ("informative" initialisation), which shortens the chains needed. Both are tiny objects with one method,
``sample(n, shape, device, dtype, y)``, so the replay buffer does not care which one it holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from jemkit.checks import check_integer

__all__ = ["GaussianInit", "InitialDistribution", "UniformInit"]


class InitialDistribution:
    """Interface: draw ``n`` samples of ``shape`` inside ``[low, high]`` (optionally conditioned on labels ``y [n]``).

    Subclasses implement ``_sample(n, shape, device, dtype, y)``.
    """

    def __init__(self, low: float = -1.0, high: float = 1.0) -> None:
        if not high > low:
            raise ValueError(f"{type(self).__name__} needs low < high, got low={low!r}, high={high!r}")
        self.low = float(low)
        self.high = float(high)

    def sample(
        self,
        n: int,
        shape: Sequence[int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        y: Tensor | None = None,
    ) -> Tensor:
        """``[n, *shape]`` samples on ``device``."""
        return self._sample(n, tuple(int(s) for s in shape), device, dtype, y)

    def _sample(self, n: int, shape: tuple[int, ...], device: Any, dtype: torch.dtype, y: Tensor | None) -> Tensor:
        raise NotImplementedError

    def fit(self, x: Tensor, y: Tensor, num_classes: int) -> InitialDistribution:
        """Learn from training inputs ``x [N, *shape]`` (in the chains' unit coordinates) and labels ``y [N]``; a
        no-op for distributions that do not learn."""
        return self

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has nothing (more) to learn."""
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(low={self.low}, high={self.high})"


class UniformInit(InitialDistribution):
    """Uniform noise on ``[low, high]`` (JEM default: the data range ``[-1, 1]``).

    Args:
        low: lower bound of every input dimension.
        high: upper bound of every input dimension.

    Example::

        >>> UniformInit(-1.0, 1.0).sample(4, (1, 8, 8)).shape
        torch.Size([4, 1, 8, 8])
    """

    def _sample(self, n: int, shape: tuple[int, ...], device: Any, dtype: torch.dtype, y: Tensor | None) -> Tensor:
        u = torch.rand((n, *shape), device=device, dtype=dtype)
        return u * (self.high - self.low) + self.low


class GaussianInit(InitialDistribution):
    """Class-conditional diagonal Gaussian fitted to data (the "informative" initialisation of JEM++).

    Until :meth:`fit` is called it is a standard normal clipped to ``[low, high]``. With labels, each chain starts from
    the Gaussian of its class; without, from the Gaussian of a random class weighted by class frequency.
    ``uniform_fraction`` of the draws come from the uniform distribution on ``[low, high]`` instead: chains that start
    only near the data never visit the rest of the box, whose energy then stays whatever the classifier gives it.

    Args:
        low: samples are clamped into ``[low, high]`` (the data range).
        high: see ``low``.
        fit_batches: training batches a JEM's chains fit it on when training starts (:meth:`Chains.fit
            <jemkit.sampling.Chains.fit>`).
        uniform_fraction: share of draws from ``U(low, high)`` (JEM's restarts) rather than the fitted Gaussians.
    """

    def __init__(
        self, low: float = -1.0, high: float = 1.0, fit_batches: int = 50, uniform_fraction: float = 0.0
    ) -> None:
        super().__init__(low, high)
        check_integer("fit_batches", fit_batches)
        if not 0.0 <= uniform_fraction <= 1.0:
            raise ValueError(f"uniform_fraction must be in [0, 1], got {uniform_fraction!r}")
        self.fit_batches = fit_batches
        self.uniform_fraction = float(uniform_fraction)
        self.means: Tensor | None = None  # [C, *shape]
        self.stds: Tensor | None = None  # [C, *shape]
        self.class_probs: Tensor | None = None  # [C]

    @torch.no_grad()
    def fit(self, x: Tensor, y: Tensor, num_classes: int) -> GaussianInit:
        """Fit per-class means and standard deviations: ``x [N, *shape]``, ``y [N]`` in ``[0, num_classes)``."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
        y = y.long()
        counts = torch.bincount(y, minlength=num_classes).to(x.dtype)
        flat = x.reshape(x.shape[0], -1)
        sums = torch.zeros(num_classes, flat.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, flat)
        sq = torch.zeros_like(sums).index_add_(0, y, flat**2)
        seen = counts > 0
        if not seen.all():  # a class absent from the fitted batches starts its chains from all the data's Gaussian
            missing = torch.nonzero(~seen).flatten().tolist()
            warnings.warn(
                f"GaussianInit: no examples of classes {missing} in the {x.shape[0]} fitted inputs; their chains start "
                "from the Gaussian of all classes (raise fit_batches to see every class)",
                stacklevel=2,
            )
            sums[~seen], sq[~seen], counts_fill = flat.sum(0), (flat**2).sum(0), counts.clone()
            counts_fill[~seen] = x.shape[0]
        else:
            counts_fill = counts
        means = sums / counts_fill[:, None]
        var = (sq / counts_fill[:, None] - means**2).clamp_min(1e-8)
        self.means = means.reshape(num_classes, *x.shape[1:])
        self.stds = var.sqrt().reshape(num_classes, *x.shape[1:])
        self.class_probs = counts / counts.sum()
        return self

    @property
    def is_fitted(self) -> bool:
        return self.means is not None

    def state_dict(self) -> dict[str, Tensor]:
        """The fitted statistics (empty before :meth:`fit`), so that checkpoints carry them."""
        if self.means is None:
            return {}
        return {"means": self.means, "stds": self.stds, "class_probs": self.class_probs}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            self.means, self.stds, self.class_probs = state["means"], state["stds"], state["class_probs"]

    def _sample(self, n: int, shape: tuple[int, ...], device: Any, dtype: torch.dtype, y: Tensor | None) -> Tensor:
        noise = torch.randn((n, *shape), device=device, dtype=dtype)
        if self.means is None:
            return noise.clamp(self.low, self.high)
        if tuple(self.means.shape[1:]) != tuple(shape):
            raise ValueError(
                f"GaussianInit was fitted on shape {tuple(self.means.shape[1:])}, asked for {tuple(shape)}"
            )
        means, stds = self.means.to(device, dtype), self.stds.to(device, dtype)
        if y is None:
            y = torch.multinomial(self.class_probs.to(device), n, replacement=True)
        x = (means[y] + stds[y] * noise).clamp(self.low, self.high)
        if self.uniform_fraction > 0:
            uniform = torch.rand_like(x) * (self.high - self.low) + self.low
            pick = torch.rand(n, device=device) < self.uniform_fraction
            x = torch.where(pick.view(-1, *([1] * (x.dim() - 1))), uniform, x)
        return x

    def __repr__(self) -> str:
        fitted = "fitted" if self.means is not None else "unfitted"
        mix = f", uniform_fraction={self.uniform_fraction}" if self.uniform_fraction else ""
        return f"GaussianInit(low={self.low}, high={self.high}, fit_batches={self.fit_batches}{mix}, {fitted})"
