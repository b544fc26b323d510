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

from jemkit.batches import unpack_batch
from jemkit.checks import check_integer
from jemkit.classifier import sampling_context
from jemkit.metrics.generative import (
    GenerativeMetrics,
    GenerativeOptions,
    build_generative_metrics,
    resolve_feature,
    resolve_judge,
)

__all__ = ["GenerativeMonitor"]


class GenerativeMonitor(Callback):
    """Every ``every_n_epochs`` validation epochs, log ``val/gen/<source>/{fid,is,is_std}`` of the JEM's samples.

    What is measured is a :class:`~jemkit.metrics.generative.GenerativeOptions`, the options of ``jemkit evaluate
    --generative.*``: samples from each of ``options.sources`` (drawn by :meth:`jemkit.JEM.sample`), FID against
    the validation inputs and IS. Real features come from the validation batches as they pass (up to
    ``options.num_samples`` inputs). With ``feature="self"`` FID is measured in the classifier's current penultimate
    layer, so the real features are recomputed at every measurement; the figures track one run's progress and are not
    the papers' Inception FID. Under DDP each rank encodes its share of the validation data and draws
    ``ceil(num_samples / world_size)`` samples per source from its buffer shard; the metrics are torchmetrics states,
    reduced over all ranks in ``compute``, so every rank logs the same values. :attr:`last` keeps them.

    Args:
        options: what to measure (default :class:`~jemkit.metrics.generative.GenerativeOptions`: 500 samples from
            the buffer and from fresh chains, FID in the JEM's own features).
        every_n_epochs: validation epochs between measurements (epoch 0, n, 2n, ...).
        batch_size: samples per sampler call.
        splits: IS splits.

    Example::

        >>> trainer = pl.Trainer(callbacks=[GenerativeMonitor(GenerativeOptions(sources=["buffer"]), every_n_epochs=5)])
    """

    def __init__(
        self,
        options: GenerativeOptions | None = None,
        every_n_epochs: int = 10,
        batch_size: int = 100,
        splits: int = 10,
    ) -> None:
        self.options = options if options is not None else GenerativeOptions()
        self.options.check()
        self.every_n_epochs = check_integer("every_n_epochs", every_n_epochs)
        self.batch_size = check_integer("batch_size", batch_size)
        self.splits = check_integer("splits", splits)
        self.feature = resolve_feature(self.options.feature)
        self._judge: str | nn.Module | None = (
            self.options.judge
        )  # a file is loaded once the JEM (its architecture) is known
        self.last: dict[str, dict[str, float]] = {}
        self._metrics: GenerativeMetrics | None = None
        self._num_real = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sources=tuple(self.options.sources), num_samples=self.options.num_samples)

    def _active(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def _share(self, trainer: pl.Trainer) -> int:
        return math.ceil(self.options.num_samples / trainer.world_size)

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
                if isinstance(self._judge, str):
                    self._judge = resolve_judge(self._judge, pl_module)
                metrics = build_generative_metrics(pl_module, self.feature, None, self.splits, x, self._judge)
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
        share = self._share(trainer)
        with sampling_context(pl_module, "eval"):
            for source in self.options.sources:
                steps = self.options.steps(pl_module, source)
                metrics.reset_fake()
                for start in range(0, share, self.batch_size):
                    n = min(self.batch_size, share - start)
                    metrics.update_fake(pl_module.sample(n, n_steps=steps, source=source))
                values = metrics.compute()  # collective under DDP: every rank calls it
                self.last[source] = {"fid": values["fid"], "is": values["is_mean"], "is_std": values["is_std"]}
        for source, by_name in self.last.items():  # equal on every rank already: sync_dist averages equal numbers
            for name, value in by_name.items():
                pl_module.log(f"val/gen/{source}/{name}", torch.tensor(value), on_epoch=True, sync_dist=True)
