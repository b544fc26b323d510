"""A plain-PyTorch port of the reference JEM training iteration (Grathwohl et al. 2020, ``train_wrn_ebm.py``).

Why it exists: it is the baseline ``bench_step.py`` times jemkit against, so it keeps the reference loop's costs on
purpose rather than jemkit's design choices:

- the replay buffer is a host (CPU) tensor: every step gathers start points with CPU indexing, mixes in fresh
  uniform noise on ``[-1, 1]`` (probability ``reinit_prob`` per chain) on the CPU, copies them to the device, and
  copies the refined samples back;
- SGLD runs ``n_steps`` of ``x <- x + step_size * d/dx logsumexp f(x) + noise * N(0, I)`` in float32, one
  ``torch.autograd.grad(..., [x], retain_graph=True)`` per step, with the classifier in eval mode while sampling and
  back in train mode afterwards (as the original's ``sample_q``; identical for classifiers without BatchNorm/Dropout);
- the loss takes three separate forwards: the data batch and the samples for ``log p(x)``, the labelled batch for
  cross-entropy: ``loss = CE + E(x_data).mean() - E(x_sample).mean()`` with ``E(x) = -logsumexp f(x)``;
- Adam (betas 0.9, 0.999), ``zero_grad / backward / step``, and the original's divergence check ``|loss| > 1e8``
  (one host synchronisation per step).

The original adds the data noise (``sigma = 0.03``) in its data transform, separately for the unlabelled and the
labelled loader; ``step`` adds it to its two copies of the batch on the device.

Mixed precision (not in the original): with ``amp_dtype`` every forward, SGLD's included, runs under
``torch.autocast(device_type, dtype=amp_dtype)``; the chains, the logits' reductions and the loss stay float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReferenceJEM"]


class ReferenceJEM:
    """One reference JEM training iteration per :meth:`step` (defaults are the JEM paper's).

    Args:
        model: classifier ``[B, *shape] -> logits [B, C]``, already on its device (the step runs there).
        buffer_size: replay buffer capacity (JEM: 10,000).
        n_steps: SGLD steps per iteration (JEM: 20).
        step_size: SGLD gradient multiplier (JEM: 1.0).
        noise: SGLD noise standard deviation (JEM: 0.01).
        lr: Adam learning rate (JEM: 1e-4).
        reinit_prob: probability of restarting a chain from uniform noise (JEM: 0.05).
        data_noise: std of the Gaussian noise added to the inputs (JEM: 0.03).
        amp_dtype: autocast dtype of the forwards (e.g. ``torch.bfloat16``), ``None`` for float32.
        input_shape: shape of one input; the buffer is filled on the first step when ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 10_000,
        n_steps: int = 20,
        step_size: float = 1.0,
        noise: float = 0.01,
        lr: float = 1e-4,
        reinit_prob: float = 0.05,
        data_noise: float = 0.03,
        amp_dtype: torch.dtype | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.buffer_size = buffer_size
        self.n_steps, self.step_size, self.noise = n_steps, step_size, noise
        self.reinit_prob, self.data_noise = reinit_prob, data_noise
        self.amp_dtype = amp_dtype
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
        self.buffer: Tensor | None = None  # [buffer_size, *input_shape], float32, always on the host
        if input_shape is not None:
            self.buffer = self._init_random(buffer_size, tuple(input_shape))

    @staticmethod
    def _init_random(n: int, shape: tuple[int, ...]) -> Tensor:
        return torch.empty(n, *shape).uniform_(-1, 1)  # on the host, as the original's init_random

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def logits(self, x: Tensor) -> Tensor:
        """``f(x)``: float32 logits ``[B, C]``."""
        with self._autocast():
            return self.model(x).float()

    def sample_start(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Start points on the device ``[B, *shape]`` and their host buffer indices ``[B]``."""
        idx = torch.randint(0, self.buffer.shape[0], (batch_size,))
        fresh = self._init_random(batch_size, tuple(self.buffer.shape[1:]))
        reinit = (torch.rand(batch_size) < self.reinit_prob).float().view(-1, *[1] * (self.buffer.dim() - 1))
        start = reinit * fresh + (1 - reinit) * self.buffer[idx]
        return start.to(self.device), idx

    def sgld(self, x0: Tensor) -> Tensor:
        """``n_steps`` of SGLD on ``logsumexp f(x)`` from ``x0`` (classifier in eval mode meanwhile)."""
        self.model.eval()
        x = x0.detach().clone().requires_grad_(True)
        for _ in range(self.n_steps):
            (grad,) = torch.autograd.grad(self.logits(x).logsumexp(1).sum(), [x], retain_graph=True)
            with torch.no_grad():
                x += self.step_size * grad + self.noise * torch.randn_like(x)
        self.model.train()
        return x.detach()

    def sample(self, batch_size: int) -> Tensor:
        """Continue ``batch_size`` chains from the host buffer, write them back, return them on the device."""
        x0, idx = self.sample_start(batch_size)
        x = self.sgld(x0)
        self.buffer[idx] = x.cpu()
        return x

    def loss(self, x_data: Tensor, x_sample: Tensor, x_lab: Tensor, y_lab: Tensor) -> Tensor:
        """``CE(f(x_lab), y_lab) + E(x_data).mean() - E(x_sample).mean()``: three separate forwards."""
        fp = self.logits(x_data).logsumexp(1).mean()
        fq = self.logits(x_sample).logsumexp(1).mean()
        loss = -(fp - fq)
        return loss + F.cross_entropy(self.logits(x_lab), y_lab)

    def step(self, x: Tensor, y: Tensor) -> float:
        """One training iteration on a batch ``x [B, *shape]``, ``y [B]`` on the model's device; returns the loss."""
        if self.buffer is None:
            self.buffer = self._init_random(self.buffer_size, tuple(x.shape[1:]))
        self.model.train()
        x_data = x + self.data_noise * torch.randn_like(x)
        x_lab = x + self.data_noise * torch.randn_like(x)
        x_q = self.sample(x.shape[0])
        loss = self.loss(x_data, x_q, x_lab, y)
        value = loss.item()
        if abs(value) > 1e8:
            raise FloatingPointError(f"the reference JEM diverged: loss {value:.4g}")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return value
