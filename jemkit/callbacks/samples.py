"""Save grids of a JEM's samples during training, so that you can watch the generative side learn."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image
from typing_extensions import override

__all__ = ["SampleGrid", "run_dir"]


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory (the logger's version folder when there is one, else ``default_root_dir``)."""
    return Path(trainer.log_dir if trainer.log_dir is not None else trainer.default_root_dir)


class SampleGrid(Callback):
    """Every ``every_n_epochs`` training epochs, draw samples from the JEM and save them as PNG image grids.

    Two grids per drawing, and a last pair (``*_final.png``) when training ends: ``buffer`` (chains continued from
    the replay buffer, what training sees) and ``class`` (one row per class, class-conditional chains started from
    the initial distribution and run for ``fresh_steps`` steps). Files go to ``<log_dir>/samples/``; TensorBoard
    loggers also receive them as images. Only rank zero draws and writes, and it waits on no other rank.

    Args:
        every_n_epochs: draw after every this many training epochs.
        num_samples: samples in the buffer grid.
        per_class: samples per row of the class grid (0 disables the class grid).
        fresh_steps: SGLD steps for chains started from noise (default: 5x the sampler's steps).
        value_range: data range mapped to black..white.
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
        self.last_paths: list[Path] = []

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw_and_save(trainer, pl_module, f"epoch={trainer.current_epoch:04d}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw_and_save(trainer, pl_module, "final")

    @rank_zero_only
    def _draw_and_save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, suffix: str) -> None:
        if not getattr(pl_module, "buffer", None) or not pl_module.buffer.is_initialized:
            return
        if len(pl_module.buffer.input_shape) != 3:
            return  # not images (e.g. 2-D toy data)
        grids = {"buffer": pl_module.sample(self.num_samples, from_buffer=True)}
        if self.per_class > 0 and pl_module.num_classes:
            labels = torch.arange(pl_module.num_classes, device=pl_module.device).repeat_interleave(self.per_class)
            steps = self.fresh_steps if self.fresh_steps is not None else 5 * pl_module.sampler.n_steps
            grids["class"] = pl_module.sample(len(labels), y=labels, n_steps=steps, from_buffer=False)
        out = run_dir(trainer) / self.dirname
        os.makedirs(out, exist_ok=True)
        self.last_paths = []
        for name, images in grids.items():
            nrow = self.per_class if name == "class" else int(len(images) ** 0.5)
            path = out / f"{name}_{suffix}.png"
            self._save(images, path, nrow, trainer, f"samples/{name}")
            self.last_paths.append(path)

    def _save(self, images: Tensor, path: Path, nrow: int, trainer: pl.Trainer, tag: str) -> None:
        images = images.float().cpu()
        save_image(images, path, nrow=nrow, normalize=True, value_range=self.value_range)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                grid = make_grid(images, nrow=nrow, normalize=True, value_range=self.value_range)
                logger.experiment.add_image(tag, grid, global_step=trainer.global_step)
