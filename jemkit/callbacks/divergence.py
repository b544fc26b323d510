"""Guard a JEM run against divergence: stop with a clear message, or roll back to the last good state and go on.

JEM training is known to blow up (energies run to +-1e8, samples leave the data range); the reference code simply
kills the run. This callback watches the JEM's own per-step quantities (non-finite losses or energies, the energy
gap between data and samples, energy magnitudes, sample norms). The JEM checks them in its training step, with one
host sync and, under DDP, one agreement between ranks, and skips the optimiser step of a diverged batch, so a broken
update is never applied and no broken checkpoint is written.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from jemkit.module import DivergenceError

__all__ = ["DivergenceGuard"]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class DivergenceGuard(Callback):
    """Stop or roll back a diverging JEM run.

    Watched per step: non-finite loss/energies (always), ``|E_sample - E_data| > max_energy_gap``,
    ``|mean E| > max_abs_energy`` (data or samples), and mean sample L2 norm ``> sample_norm_factor * sqrt(D)``
    (``D`` input dimensions: data in ``[-1, 1]`` never exceeds ``sqrt(D)``).

    Actions:
        - ``"raise"``: stop with :class:`~jemkit.DivergenceError` naming the quantity and the step.
        - ``"rollback"``: restore the weights, optimiser and scheduler state of the last snapshot (taken every
          ``snapshot_every_n_steps`` healthy steps, kept in host memory), re-initialise the replay buffer (its shard,
          under DDP), multiply
          every learning rate by ``lr_factor``, log ``train/rollbacks``, and go on; after ``max_rollbacks``
          rollbacks, raise.

    Args:
        action: ``"raise"`` or ``"rollback"``.
        max_energy_gap: limit on ``|E_sample - E_data|`` (batch means).
        max_abs_energy: limit on ``|E_data|`` and ``|E_sample|`` (batch means).
        sample_norm_factor: limit on the mean sample norm, in units of ``sqrt(D)``.
        max_rollbacks: rollbacks allowed before giving up.
        lr_factor: learning-rate multiplier applied at each rollback.
        snapshot_every_n_steps: healthy steps between snapshots.

    Example::

        >>> trainer = pl.Trainer(callbacks=[DivergenceGuard(action="rollback", max_rollbacks=3)])
    """

    def __init__(
        self,
        action: Literal["raise", "rollback"] = "raise",
        max_energy_gap: float = 1e3,
        max_abs_energy: float = 1e4,
        sample_norm_factor: float = 10.0,
        max_rollbacks: int = 3,
        lr_factor: float = 0.5,
        snapshot_every_n_steps: int = 100,
    ) -> None:
        if action not in ("raise", "rollback"):
            raise ValueError(f"action must be 'raise' or 'rollback', got {action!r}")
        for name, value in [
            ("max_energy_gap", max_energy_gap),
            ("max_abs_energy", max_abs_energy),
            ("sample_norm_factor", sample_norm_factor),
        ]:
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor!r}")
        if max_rollbacks < 0 or snapshot_every_n_steps < 1:
            raise ValueError(
                "need max_rollbacks >= 0 and snapshot_every_n_steps >= 1, "
                f"got {max_rollbacks} and {snapshot_every_n_steps}"
            )
        self.action = action
        self.max_energy_gap = max_energy_gap
        self.max_abs_energy = max_abs_energy
        self.sample_norm_factor = sample_norm_factor
        self.max_rollbacks = max_rollbacks
        self.lr_factor = lr_factor
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.rollbacks = 0
        self.events: list[dict[str, Any]] = []
        self._snapshot: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action)

    def _configure(self, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "divergence_limits"):
            raise TypeError(f"DivergenceGuard works with a jemkit JEM, got {type(pl_module).__name__}")
        pl_module.check_finite = True
        pl_module.on_divergence = "raise" if self.action == "raise" else "skip"
        limits = {
            "energy_gap": self.max_energy_gap,
            "energy_data": self.max_abs_energy,
            "energy_sample": self.max_abs_energy,
        }
        shape = pl_module.buffer.input_shape or getattr(pl_module, "_input_shape", None)
        if shape is not None:
            limits["sample_norm"] = self.sample_norm_factor * math.sqrt(math.prod(shape))
        pl_module.divergence_limits = limits

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snapshot = {
            # the replay buffer is re-initialised on rollback, so it is not copied (under DDP it is this rank's shard)
            "model": _to_cpu({k: v for k, v in pl_module.state_dict().items() if not k.startswith("buffer.")}),
            "optimizers": [_to_cpu(opt.state_dict()) for opt in trainer.optimizers],
            "schedulers": [_to_cpu(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs],
            "step": trainer.global_step,
        }

    def _rollback(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks or self._snapshot is None:
            raise DivergenceError(f"{reason}; gave up after {self.rollbacks - 1} rollback(s)")
        snapshot = self._snapshot
        pl_module.load_state_dict(snapshot["model"], strict=False)
        for opt, state in zip(trainer.optimizers, snapshot["optimizers"], strict=True):
            opt.load_state_dict(state)
        for cfg, state in zip(trainer.lr_scheduler_configs, snapshot["schedulers"], strict=True):
            cfg.scheduler.load_state_dict(state)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] *= self.lr_factor**self.rollbacks
        pl_module.buffer.reset()
        event = {
            "step": trainer.global_step,
            "restored_step": snapshot["step"],
            "reason": reason,
            "lr": [g["lr"] for opt in trainer.optimizers for g in opt.param_groups],
        }
        self.events.append(event)
        rank_zero_warn(
            f"DivergenceGuard: {reason}. Rolled back to the state of step {snapshot['step']}, re-initialised the "
            f"replay buffer, learning rate now {event['lr']} (rollback {self.rollbacks}/{self.max_rollbacks})."
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._configure(pl_module)
        if self.action == "rollback":
            self._take_snapshot(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if "sample_norm" not in pl_module.divergence_limits and pl_module.buffer.is_initialized:
            self._configure(pl_module)  # the input shape is known once the first batch was seen

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        reason = pl_module.divergence_reason
        if reason is not None:
            pl_module.divergence_reason = None
            self._rollback(trainer, pl_module, reason)
        elif self.action == "rollback" and trainer.global_step % self.snapshot_every_n_steps == 0:
            self._take_snapshot(trainer, pl_module)
        pl_module.log("train/rollbacks", float(self.rollbacks), on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "events": self.events}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollbacks = state_dict.get("rollbacks", 0)
        self.events = list(state_dict.get("events", []))
