"""Optimisation for the JEM: its default optimiser and schedule, per-step learning-rate factors, and SAM."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from jemkit.checks import check_choice

__all__ = ["SAM", "configure_optimizer", "scaled_learning_rates", "scheduled_state_dict"]


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
        group["scheduled_lr"] = group["lr"]  # what a state_dict taken inside the block should record
        group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
            group["lr"] = lr
            group.pop("scheduled_lr", None)


def scheduled_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with the scheduled learning rates, also when taken inside
    :func:`scaled_learning_rates` (mid-step, as DivergenceGuard's snapshots are)."""
    state = optimizer.state_dict()
    _unscale(state)
    return state


def _unscale(state: Any) -> None:
    """Put the scheduled rates back into every ``param_groups`` of a (possibly nested, e.g. SAM's) state dict."""
    if not isinstance(state, dict):
        return
    for group in state.get("param_groups", []):
        if "scheduled_lr" in group:
            group["lr"] = group.pop("scheduled_lr")
    for value in state.values():
        if isinstance(value, dict) and value is not state.get("state"):
            _unscale(value)


_BASES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation (Foret et al. 2021), the optimiser of SADA-JEM (Yang, Su & Ji 2023).

    Each step evaluates the loss twice: at the weights ``w`` for the gradient ``g``, then at the ascent point
    ``w + rho * g / ||g||`` (per-parameter scaled by ``|w|`` when ``adaptive``), whose gradient the base optimiser then
    applies at ``w``. It needs the closure Lightning passes to ``optimizer.step`` in automatic optimisation (as LBFGS
    does); a JEM draws its SGLD samples once per step and reuses them for the second evaluation. Under DDP the
    gradients of both evaluations are averaged across ranks by the backward passes, so every rank perturbs alike.
    Works in 32-bit and bf16-mixed precision; float16 with a gradient scaler is not supported.

    Args:
        params: the parameters (or parameter groups) to optimise.
        base: the base optimiser, ``"sgd"``, ``"adam"`` or ``"adamw"`` (or an optimiser class).
        rho: radius of the ascent step (SAM: 0.05; SADA-JEM: larger, e.g. 2.0 with adaptive).
        adaptive: ASAM's scale-invariant ascent step, ``rho * |w|^2 g / || |w| g ||``.
        lr: learning rate of the base optimiser.
        momentum: SGD momentum (``base="sgd"`` only).
        weight_decay: weight decay of the base optimiser.

    Example (YAML, LightningCLI)::

        optimizer:
          class_path: jemkit.optim.SAM
          init_args: {base: sgd, rho: 0.05, lr: 0.1, momentum: 0.9}
    """

    def __init__(
        self,
        params: Iterable[Any],
        base: str | type[torch.optim.Optimizer] = "sgd",
        rho: float = 0.05,
        adaptive: bool = False,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        if isinstance(base, str):
            check_choice("base optimiser", base.lower(), tuple(_BASES))
            base = _BASES[base.lower()]
        kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
        if momentum:
            if base is not torch.optim.SGD:
                raise ValueError(f"momentum is an SGD setting, got momentum={momentum!r} with {base.__name__}")
            kwargs["momentum"] = momentum
        super().__init__(params, {"rho": rho, "adaptive": adaptive, **kwargs})
        self.base = base(self.param_groups, **kwargs)  # shares the groups: schedulers see one set of rates
        self.defaults.update(self.base.defaults)

    @torch.no_grad()
    def _ascent(self) -> None:
        grads = [
            ((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not grads:
            return
        norm = torch.stack(grads).norm(p=2).clamp_min(1e-12)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = (p.square() if group["adaptive"] else 1.0) * p.grad * (group["rho"] / norm)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One SAM step; ``closure`` re-evaluates the loss with gradients (Lightning passes it)."""
        if closure is None:
            raise ValueError("SAM evaluates the loss twice per step and needs a closure: optimizer.step(closure)")
        with torch.enable_grad():
            loss = closure()
        self._ascent()
        with torch.enable_grad():
            closure()
        for group in self.param_groups:
            for p in group["params"]:
                e_w = self.state[p].pop("e_w", None)
                if e_w is not None:
                    p.sub_(e_w)
        self.base.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"sam": super().state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict["sam"])
        self.base.load_state_dict(state_dict["base"])
        self.base.param_groups = self.param_groups
