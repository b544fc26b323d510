"""FID and Inception Score of a JEM's samples during validation, so that the generative side can be tracked."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from jemkit.adapters import sampling_context, unpack_batch
from jemkit.evaluate.generative import GenerativeMetrics, build_generative_metrics
from jemkit.evaluate.samples import SOURCES, draw, source_steps

__all__ = ["GenerativeMonitor"]


class GenerativeMonitor(Callback):
    """Every ``every_n_epochs`` validation epochs, log ``val/gen/fid`` and ``val/gen/is`` of the JEM's samples.

    Real features come from the validation batches as they pass (up to ``num_samples`` inputs), samples are drawn
    at the end of the epoch from ``source`` (see :func:`jemkit.evaluate.generative_metrics`). With the default
    ``feature="self"`` FID is measured in the classifier's current penultimate layer, so the real features are
    recomputed at every measurement; the numbers track one run's progress and are not the papers' Inception FID.
    Under DDP each rank encodes its share of the validation data and draws ``ceil(num_samples / world_size)``
    samples from its buffer shard; the metrics are torchmetrics states, reduced over all ranks in ``compute``, so
    every rank logs the same values. Also logs ``val/gen/is_std``; :attr:`last` keeps the values.

    Args:
        every_n_epochs: validation epochs between measurements (epoch 0, n, 2n, ...).
        num_samples: samples drawn, and the cap on real validation inputs, over all ranks.
        source: ``"buffer"`` (stored chains continued, no random restarts) or ``"fresh"`` (new chains).
        feature: FID features: ``"self"``, ``"inception"`` (needs ``jemkit[fid]``) or an ``nn.Module``.
        fresh_steps: sampler steps of fresh chains (default: 5x the sampler's).
        batch_size: samples per sampler call.
        splits: IS splits.

    Example::

        >>> trainer = pl.Trainer(callbacks=[GenerativeMonitor(every_n_epochs=5, num_samples=1000)])
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        num_samples: int = 500,
        source: str = "buffer",
        feature: str | nn.Module = "self",
        fresh_steps: int | None = None,
        batch_size: int = 100,
        splits: int = 10,
    ) -> None:
        if every_n_epochs < 1 or batch_size < 1 or splits < 1:
            raise ValueError(
                f"every_n_epochs, batch_size and splits must be >= 1, got {every_n_epochs}, {batch_size}, {splits}"
            )
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (FID needs two samples), got {num_samples!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if isinstance(feature, str) and feature not in ("self", "inception"):
            raise ValueError(f"feature must be 'self', 'inception' or an nn.Module, got {feature!r}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.source = source
        self.feature = feature
        self.fresh_steps = fresh_steps
        self.batch_size = batch_size
        self.splits = splits
        self.last: dict[str, float] = {}
        self._metrics: GenerativeMetrics | None = None
        self._num_real = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(source=self.source, num_samples=self.num_samples)

    def _active(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def _share(self, trainer: pl.Trainer) -> int:
        return math.ceil(self.num_samples / trainer.world_size)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics, self._num_real = None, 0

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or not self._active(trainer) or self._num_real >= self._share(trainer):
            return
        x = unpack_batch(batch)[0][: self._share(trainer) - self._num_real]
        if self._metrics is None:
            with torch.inference_mode(False):  # metric states outside inference mode stay usable after it
                metrics = build_generative_metrics(pl_module, self.feature, None, self.splits, x)
            self._metrics = metrics.to(pl_module.device)
        self._metrics.update_real(x)
        self._num_real += len(x)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics, self._metrics = self._metrics, None
        if not self._active(trainer) or metrics is None:
            return
        buffer = getattr(pl_module, "buffer", None)
        if buffer is None or not buffer.is_initialized:  # the same on every rank: nothing collective is skipped alone
            rank_zero_warn("GenerativeMonitor: the JEM's replay buffer is not initialised yet; no FID/IS this epoch")
            return
        steps = source_steps(pl_module, self.source, self.fresh_steps)
        share = self._share(trainer)
        with sampling_context(pl_module, "eval"):
            for start in range(0, share, self.batch_size):
                metrics.update_fake(draw(pl_module, self.source, min(self.batch_size, share - start), steps))
            values = metrics.compute()  # collective under DDP: every rank calls it
        self.last = {"fid": values["fid"], "is": values["is_mean"], "is_std": values["is_std"]}
        for name, value in self.last.items():  # equal on every rank already: sync_dist averages equal numbers
            pl_module.log(f"val/gen/{name}", torch.tensor(value), on_epoch=True, sync_dist=True)
