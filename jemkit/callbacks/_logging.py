"""Where the callbacks write: the run's log directory, and the attached TensorBoard loggers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

__all__ = ["log_to_tensorboard", "run_dir"]


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory (the logger's version folder when there is one, else ``default_root_dir``).

    ``trainer.log_dir`` broadcasts from rank zero: call this on every rank, never inside rank-zero-only code.
    """
    return Path(trainer.log_dir if trainer.log_dir is not None else trainer.default_root_dir)


def log_to_tensorboard(trainer: pl.Trainer, tag: str, figure: Any = None, image: Tensor | None = None) -> None:
    """Give a matplotlib ``figure`` (left open) or an image ``[3, H, W]`` to every attached TensorBoard logger.

    Other loggers get nothing: the callbacks also save each picture as a PNG file under the run's log directory.
    """
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        if figure is not None:
            logger.experiment.add_figure(tag, figure, trainer.global_step, close=False)
        if image is not None:
            logger.experiment.add_image(tag, image, global_step=trainer.global_step)
