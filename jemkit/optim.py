"""Optimiser helpers for the JEM: its default optimiser and schedule, and per-step learning-rate factors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

__all__ = ["configure_optimizer", "scaled_learning_rates"]


def configure_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    optimizer: OptimizerCallable | None = None,
    lr_scheduler: LRSchedulerCallable | None = None,
) -> Any:
    """What ``configure_optimizers`` returns: ``optimizer(params)`` or Adam at ``lr``, with an optional per-epoch
    scheduler (``ReduceLROnPlateau`` watches ``val/nll``)."""
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    if lr_scheduler is None:
        return opt
    scheduler = lr_scheduler(opt)
    config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = "val/nll"
    return {"optimizer": opt, "lr_scheduler": config}


@contextmanager
def scaled_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Multiply every learning rate by ``factor`` inside the block and restore the scheduled rates afterwards.

    A factor applied per step, rather than written into the optimiser once, composes with every scheduler, also those
    that set the rate outright (``LambdaLR``, ``OneCycleLR``): warm-up and DivergenceGuard's rollbacks use it.
    """
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
            group["lr"] = lr
