"""A line of progress every N steps, for runs whose output goes to a file or a pipe (CI, ``nohup``, ``| tee``).

A progress bar redraws one line in place; written to a file it shows nothing readable until the run ends.
``jemkit fit`` adds :class:`ProgressLines` when its standard error is not a terminal.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from jemkit.checks import check_integer

__all__ = ["ProgressLines"]


class ProgressLines(pl.Callback):
    """Print ``step N/M  epoch E  loss L  T s/step  elapsed`` every ``every_n_steps`` optimiser steps (rank zero).

    Args:
        every_n_steps: optimiser steps between lines.
        stream: where the lines go (default: standard error, where Lightning's own messages go).
    """

    def __init__(self, every_n_steps: int = 100, stream: TextIO | None = None) -> None:
        self.every_n_steps = check_integer("every_n_steps", every_n_steps)
        self.stream = stream
        self._start = 0.0
        self._last = (0, 0.0)  # (step, time) of the previous line

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._last = (trainer.global_step, self._start)

    @override
    @rank_zero_only
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0 or step == self._last[0]:
            return
        now = time.perf_counter()
        per_step = (now - self._last[1]) / (step - self._last[0])
        self._last = (step, now)
        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        loss = trainer.callback_metrics.get("train/loss")  # what the module logged last: no extra host sync
        loss_text = f"  loss {float(loss):.4f}" if loss is not None and math.isfinite(float(loss)) else ""
        elapsed = time.strftime("%H:%M:%S", time.gmtime(now - self._start))
        line = f"step {step}{total}  epoch {trainer.current_epoch}{loss_text}  {per_step:.3f} s/step  {elapsed}"
        print(line, file=self.stream or sys.stderr, flush=True)
