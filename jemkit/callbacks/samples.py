"""Save pictures of a JEM's samples during training, so that you can watch the generative side learn."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor
from torchvision.io import ImageReadMode, read_image
from typing_extensions import override

from jemkit.batches import unpack_batch
from jemkit.callbacks._logging import log_to_tensorboard, run_dir
from jemkit.checks import check_integer
from jemkit.pictures import save_sample_pictures

__all__ = ["SampleGrid"]


class SampleGrid(Callback):
    """Every ``every_n_epochs`` training epochs, draw samples from the JEM and save them as PNG pictures.

    Two pictures per drawing, and a last pair (``*_final.png``) when training ends: ``buffer`` (chains continued from
    the replay buffer, what training sees) and ``class`` (class-conditional chains started from the initial
    distribution and run for ``fresh_steps`` steps). Their form fits the inputs (:mod:`jemkit.pictures`):
    image grids, the energy landscape of 2-D points, line plots of 1-D signals and per-feature histograms of tabular
    rows, the last two against training data kept when training starts. Inputs of any other shape get one warning
    and no pictures. Files go to ``<log_dir>/samples/``; TensorBoard loggers also receive them as images. Only rank
    zero draws and writes, and it waits on no other rank.

    Args:
        every_n_epochs: draw after every this many training epochs.
        num_samples: samples in the buffer grid.
        per_class: samples per row of the class grid (0 disables the class grid).
        fresh_steps: steps of the JEM's own sampler for the class chains, which start from its replay buffer's
            initial distribution (default: the JEM's policy for fresh chains, 5x the sampler's steps).
        value_range: data range mapped to black..white (and the plotted square for 2-D data); default: the JEM's
            input domain.
        dirname: folder under the log directory.

    Example::

        >>> trainer = pl.Trainer(callbacks=[SampleGrid(every_n_epochs=5)])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        per_class: int = 8,
        fresh_steps: int | None = None,
        value_range: tuple[float, float] | None = None,
        dirname: str = "samples",
    ) -> None:
        check_integer("every_n_epochs", every_n_epochs)
        check_integer("num_samples", num_samples)
        check_integer("per_class", per_class, minimum=0)
        if fresh_steps is not None:
            check_integer("fresh_steps", fresh_steps, minimum=0)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.per_class = per_class
        self.fresh_steps = fresh_steps
        self.value_range = value_range
        self.dirname = dirname
        self.last_paths: dict[str, Path] = {}
        self.data: Tensor | None = None  # real inputs drawn beside signal and tabular samples
        self._warned = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = trainer.train_dataloader
        loader = loaders["data"] if isinstance(loaders, dict) and "data" in loaders else loaders
        try:
            self.data = unpack_batch(next(iter(loader)))[0][: self.num_samples].detach().cpu()
        except (StopIteration, TypeError, KeyError):
            self.data = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw_and_save(trainer, pl_module, run_dir(trainer), f"epoch={trainer.current_epoch:04d}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw_and_save(trainer, pl_module, run_dir(trainer), "final")

    @rank_zero_only
    def _draw_and_save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log_dir: Path, suffix: str) -> None:
        buffer = getattr(pl_module, "buffer", None)
        if buffer is None or not buffer.is_initialized:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.last_paths = save_sample_pictures(
                pl_module,
                log_dir / self.dirname,
                self.num_samples,
                self.per_class,
                self.fresh_steps,
                self.value_range,
                suffix,
                self.data,
            )
        if caught and not self._warned:  # said once per run, not every epoch
            self._warned = True
            rank_zero_warn(f"SampleGrid: {caught[0].message}")
        for name, path in self.last_paths.items():
            log_to_tensorboard(trainer, f"samples/{name}", image=read_image(str(path), ImageReadMode.RGB))
