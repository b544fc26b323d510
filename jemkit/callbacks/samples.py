"""Save pictures of a JEM's samples during training, so that you can watch the generative side learn."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torchvision.io import ImageReadMode, read_image
from typing_extensions import override

from jemkit.callbacks._logging import log_to_tensorboard, run_dir
from jemkit.evaluate.samples import save_sample_grids

__all__ = ["SampleGrid"]


class SampleGrid(Callback):
    """Every ``every_n_epochs`` training epochs, draw samples from the JEM and save them as PNG pictures.

    For images, two grids per drawing, and a last pair (``*_final.png``) when training ends: ``buffer`` (chains
    continued from the replay buffer, what training sees) and ``class`` (one row per class, class-conditional chains
    started from the initial distribution and run for ``fresh_steps`` steps). For 2-D data, the energy landscape
    ``exp(-E(x))`` with the samples on top. Files go to ``<log_dir>/samples/``; TensorBoard loggers also receive them
    as images. Only rank zero draws and writes, and it waits on no other rank.

    Args:
        every_n_epochs: draw after every this many training epochs.
        num_samples: samples in the buffer grid.
        per_class: samples per row of the class grid (0 disables the class grid).
        fresh_steps: SGLD steps for chains started from noise (default: 5x the sampler's steps).
        value_range: data range mapped to black..white (and the plotted square for 2-D data).
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
        value_range: tuple[float, float] = (-1.0, 1.0),
        dirname: str = "samples",
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs!r}")
        if num_samples < 1 or per_class < 0:
            raise ValueError(f"need num_samples >= 1 and per_class >= 0, got {num_samples!r} and {per_class!r}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.per_class = per_class
        self.fresh_steps = fresh_steps
        self.value_range = value_range
        self.dirname = dirname
        self.last_paths: dict[str, Path] = {}

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
        self.last_paths = save_sample_grids(
            pl_module,
            log_dir / self.dirname,
            self.num_samples,
            self.per_class,
            self.fresh_steps,
            self.value_range,
            suffix,
        )
        for name, path in self.last_paths.items():
            log_to_tensorboard(trainer, f"samples/{name}", image=read_image(str(path), ImageReadMode.RGB))
