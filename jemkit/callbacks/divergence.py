"""Guard a JEM run against divergence: stop with a clear message, skip the broken step, or roll back and go on.

JEM training is known to blow up (energies run to +-1e8, samples leave the data range); the reference code simply
kills the run. The JEM reports its per-step statistics (``JEM.step_stats``: loss terms, energies of data and
samples, sample norms); this callback owns the policy. It judges every step's statistics before the backward pass
(one host sync and, under DDP, one agreement between ranks, so that all ranks act alike) and drops the gradients of a
diverged step before the optimiser sees them, so a broken update is never applied and no broken checkpoint is written.
A JEM adds a ``DivergenceGuard()`` (action ``"raise"``) to any Trainer that has none, much as Lightning's
``EarlyStopping(check_finite=True)`` stops on a non-finite metric.
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

from jemkit.batches import unpack_batch
from jemkit.checks import check_integer, input_scale_hint
from jemkit.divergence import DivergenceError, Guarded, divergence_reasons
from jemkit.optim import scheduled_state_dict

__all__ = ["DivergenceGuard"]

_HINT = (
    "Lower the learning rate or the sampler's step size, add an energy regulariser (weights={'energy_l2': 0.1}), or "
    "add the DivergenceGuard(action='rollback') callback."
)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _bad_input(batch: Any, batch_idx: int) -> list[str]:
    """``["the input batch N contains NaN/inf ..."]`` when a training batch holds non-finite inputs, else ``[]``."""
    try:
        x, _ = unpack_batch(batch)
    except (TypeError, KeyError):
        return []
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return []
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return []
    samples = bad.flatten(1).any(1).nonzero().flatten().tolist()
    kinds = "/".join(k for k, present in (("NaN", x.isnan().any()), ("inf", x.isinf().any())) if bool(present))
    return [
        f"the input batch {batch_idx} contains {kinds} (in samples {samples[:5]}{' ...' if len(samples) > 5 else ''})"
    ]


def _scale_hint(batch: Any, batch_idx: int) -> str | None:
    """When the diverged step's inputs are far from order-1 scale, that first: "Likely cause: the training inputs
    span [0, 255] ... Scale the inputs ..." (see :func:`jemkit.checks.input_scale_hint`)."""
    try:
        x, _ = unpack_batch(batch)
    except (TypeError, KeyError):
        return None
    hint = input_scale_hint(x)
    return None if hint is None else f"Likely cause: {hint}."


def _raise_bad_labels(batch: Any, batch_idx: int, num_classes: int) -> None:
    """A batch with labels outside ``[0, C)`` (the JEM counts them in ``bad_labels``) is the user's data, not a
    divergence: ``ValueError`` naming the batch and the labels, whatever the action."""
    labels = unpack_batch(batch)[1]
    bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
    hint = " (-100 is cross-entropy's ignore_index: jemkit trains on labelled data only)" if -100 in bad else ""
    hint += " (-1: a float label that is not 0/1 or a whole number)" if -1 in bad else ""
    raise ValueError(
        f"training batch {batch_idx} has labels {bad[:10]} outside [0, {num_classes}) for a classifier with "
        f"{num_classes} classes{hint}"
    )


class DivergenceGuard(Callback):
    """Stop, skip or roll back a diverging JEM run.

    Watched per step: non-finite loss terms and energies (always), ``|E_sample - E_data| > max_energy_gap``,
    ``|mean E| > max_abs_energy`` (data or samples), and mean sample L2 norm ``> sample_norm_factor * sqrt(D)``
    (``D`` input dimensions: data in ``[-1, 1]`` never exceeds ``sqrt(D)``).

    Actions:
        - ``"raise"``: stop with :class:`~jemkit.DivergenceError` naming the quantity and the step.
        - ``"skip"``: drop the step's update (weights and optimiser state stay as they were), re-initialise replay
          buffer slots that went non-finite, warn and go on.
        - ``"rollback"``: restore the weights, optimiser and scheduler state of the last snapshot (taken every
          ``snapshot_every_n_steps`` healthy steps, kept in host memory; a snapshot holds only weights that a later
          step has judged healthy, so a spike in the step before it is never restored), re-initialise the replay
          buffer (its shard under DDP), lower the learning rate to ``lr_factor ** rollbacks`` times the scheduled one
          (applied at every optimiser step, so schedulers that set the rate outright keep it lowered), log
          ``train/rollbacks`` and go on; after ``max_rollbacks`` rollbacks, raise.

    Args:
        action: ``"raise"``, ``"skip"`` or ``"rollback"``.
        max_energy_gap: limit on ``|E_sample - E_data|`` (batch means).
        max_abs_energy: limit on ``|E_data|`` and ``|E_sample|`` (batch means).
        sample_norm_factor: limit on the mean sample norm, in units of ``sqrt(D)``.
        max_rollbacks: rollbacks allowed before giving up.
        lr_factor: learning-rate multiplier per rollback.
        snapshot_every_n_steps: healthy steps between snapshots.

    Raises:
        DivergenceError: with ``action="raise"`` on a diverged step, and after ``max_rollbacks`` rollbacks.
        TypeError: when the LightningModule is not a jemkit JEM.

    Example::

        >>> trainer = pl.Trainer(callbacks=[DivergenceGuard(action="rollback", max_rollbacks=3)])
    """

    def __init__(
        self,
        action: Literal["raise", "skip", "rollback"] = "raise",
        max_energy_gap: float = 1e3,
        max_abs_energy: float = 1e4,
        sample_norm_factor: float = 10.0,
        max_rollbacks: int = 3,
        lr_factor: float = 0.5,
        snapshot_every_n_steps: int = 100,
    ) -> None:
        if action not in ("raise", "skip", "rollback"):
            raise ValueError(f"action must be 'raise', 'skip' or 'rollback', got {action!r}")
        for name, value in [
            ("max_energy_gap", max_energy_gap),
            ("max_abs_energy", max_abs_energy),
            ("sample_norm_factor", sample_norm_factor),
        ]:
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor!r}")
        check_integer("max_rollbacks", max_rollbacks, minimum=0)
        check_integer("snapshot_every_n_steps", snapshot_every_n_steps)
        self.action = action
        self.max_energy_gap = max_energy_gap
        self.max_abs_energy = max_abs_energy
        self.sample_norm_factor = sample_norm_factor
        self.max_rollbacks = max_rollbacks
        self.lr_factor = lr_factor
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.rollbacks = 0
        self.skipped_steps = 0
        self.events: list[dict[str, Any]] = []
        self._snapshot: dict[str, Any] | None = None
        self._pending: str | None = None  # why the current step diverged, until its update is dropped
        self._dropped = False  # the pending step's gradients were dropped: act on it at the batch end
        self._batch: tuple[Any, int] = (None, -1)
        self._snapshot_due = False  # take a snapshot once the current weights have passed a step's check

    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action)

    def limits(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Limits on the JEM's step statistics, by name (the sample-norm limit once the input shape is known)."""
        limits = {
            "energy_gap": self.max_energy_gap,
            "energy_data": self.max_abs_energy,
            "energy_sample": self.max_abs_energy,
            "bad_labels": 0.0,  # labels outside [0, C): refused, with their batch named
        }
        shape = pl_module.chains.input_shape
        if shape is not None:
            limits["sample_norm"] = self.sample_norm_factor * math.sqrt(math.prod(shape))
        return limits

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, Guarded):
            raise TypeError(f"DivergenceGuard works with a jemkit JEM, got {type(pl_module).__name__}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.action == "rollback":
            pl_module.lr_scale = self.lr_factor**self.rollbacks  # also after resuming a run that rolled back
            self._take_snapshot(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = (batch, batch_idx)  # looked at only when the step diverges: no cost on healthy steps

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        reasons = divergence_reasons(pl_module.step_stats, self.limits(pl_module))  # the step's one host sync
        if any(reason.startswith("bad_labels") for reason in reasons):
            _raise_bad_labels(*self._batch, pl_module.num_classes)
        if reasons:
            reasons = _bad_input(*self._batch) or reasons  # a NaN in the data is not a divergence of the model
        diverged = bool(reasons)
        if trainer.world_size > 1:  # every rank calls this hook every step: the ranks agree, so all act alike
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if not diverged:
            if self._snapshot_due:  # the weights the last update produced have now been judged: keep them
                self._snapshot_due = False
                self._take_snapshot(trainer, pl_module)
            return
        self._snapshot_due = False
        where = ", ".join(reasons) if reasons else "on another rank"
        reason = f"training diverged at global step {trainer.global_step}: {where}"
        if self.action == "raise":
            if reasons and reasons[0].startswith("the input"):
                raise DivergenceError(f"{reasons[0]} (global step {trainer.global_step}): clean the data")
            raise DivergenceError(f"{reason}. {_scale_hint(*self._batch) or _HINT}")
        self._pending = reason

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._pending is None:
            return
        for group in optimizer.param_groups:  # no update, and Adam's moments stay as they were
            for p in group["params"]:
                p.grad = None
        self._dropped = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._dropped:
            reason, self._pending, self._dropped = self._pending, None, False
            if self.action == "rollback":
                self._rollback(trainer, pl_module, reason)
            else:
                self.skipped_steps += 1
                replaced = pl_module.chains.reinit_nonfinite()
                self.events.append({"step": trainer.global_step, "reason": reason, "action": "skip"})
                rank_zero_warn(
                    f"DivergenceGuard: {reason}. Skipped the update of this step"
                    + (f" and re-initialised {replaced} non-finite replay-buffer slots." if replaced else ".")
                )
        elif self.action == "rollback" and trainer.global_step % self.snapshot_every_n_steps == 0:
            self._snapshot_due = True
        if self.action == "rollback":
            pl_module.log("train/rollbacks", float(self.rollbacks), on_step=True, on_epoch=False)
        elif self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snapshot = {
            # the replay buffer is re-initialised on rollback, so it is not copied (under DDP it is this rank's shard)
            "model": _to_cpu({k: v for k, v in pl_module.state_dict().items() if not k.startswith("buffer.")}),
            "optimizers": [_to_cpu(scheduled_state_dict(opt)) for opt in trainer.optimizers],
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
        # The snapshot holds the scheduled rates; the reduction is a factor of its own, so it never compounds.
        pl_module.lr_scale = self.lr_factor**self.rollbacks
        pl_module.chains.reset()
        event = {
            "step": trainer.global_step,
            "restored_step": snapshot["step"],
            "reason": reason,
            "action": "rollback",
            "lr": [g["lr"] * pl_module.lr_scale for opt in trainer.optimizers for g in opt.param_groups],
        }
        self.events.append(event)
        rank_zero_warn(
            f"DivergenceGuard: {reason}. Rolled back to the state of step {snapshot['step']}, re-initialised the "
            f"replay buffer, learning rate now {event['lr']} (rollback {self.rollbacks}/{self.max_rollbacks})."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "skipped_steps": self.skipped_steps, "events": self.events}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollbacks = state_dict.get("rollbacks", 0)
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.events = list(state_dict.get("events", []))
