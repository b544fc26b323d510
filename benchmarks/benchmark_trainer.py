"""What the benchmark scripts share: a quiet Lightning ``Trainer`` and a callback that times a window of steps.

``benchmarks/`` is not a package: each script puts this folder on ``sys.path`` and imports this file by name.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


def quiet_trainer(max_steps: int, **overrides: Any) -> pl.Trainer:
    """A CPU ``Trainer`` for ``max_steps`` that writes nothing (no logger, checkpoint, progress bar or model summary)
    and runs no validation, so that a run's time is its training steps; ``overrides`` replace or add options."""
    options: dict[str, Any] = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**(options | overrides))


class StepWindow(pl.Callback):
    """Seconds from the start of step ``warmup`` to the start of step ``warmup + steps`` (whole loop iterations);
    :meth:`on_window_start` and :meth:`on_window_end` are called at the two edges (profilers hook in there)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.started, self.seconds = warmup, steps, 0.0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, _: int) -> None:
        i = trainer.global_step  # batch indices restart every epoch
        if i == self.warmup:
            self.on_window_start()
            self.started = time.perf_counter()
        elif i == self.warmup + self.steps:
            self.seconds = time.perf_counter() - self.started
            self.on_window_end()

    def on_window_start(self) -> None:
        """Called just before the window's clock starts."""

    def on_window_end(self) -> None:
        """Called just after the window's clock stops."""
