"""Refinement by sampler steps as a differentiable function of its start: the exact gradient of JEM's defence.

JEM's defence refines an input by a few steps of its own sampler on ``E(x)`` before classifying it
(:meth:`jemkit.JEM.purify`). An attack that sees the defence needs the gradient of the refined input with respect to
the start: each step ``u <- update(u, dE/du)`` is kept with the graph of its own energy gradient
(:func:`~jemkit.sampling.langevin.energy_and_grad` with ``create_graph=True``), so a loss after the last step
differentiates back through all of them. With gradient checkpointing each step is recomputed in the backward pass
instead of stored, so memory stays flat in the number of steps (about 1.7x the time); the recomputation replays the
step's noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpointed

from jemkit.checks import check_integer
from jemkit.classifier import sampling_context
from jemkit.sampling.langevin import energy_and_grad

__all__ = ["Refinable", "unrolled_refine"]


class Refinable(Protocol):
    """What unrolled refinement reads of a JEM: its sampler, classifier, chains (sampling mode and input domain),
    its energy and its own (non-differentiable) refinement."""

    sampler: Any
    classifier: nn.Module
    chains: Any

    def energy(self, x: Tensor) -> Tensor: ...

    def purify(self, x: Tensor, n_steps: int) -> Tensor: ...


def unrolled_refine(jem: Refinable, x: Tensor, n_steps: int, checkpoint: bool = True) -> Tensor:
    """``jem.purify(x, n_steps)`` as a differentiable function of ``x``.

    The classifier runs as ``jem.purify`` runs it (the chains' sampling mode, set inside each checkpointed step so
    the recomputation sees the same module), in the chains' unit coordinates when they have an input domain. PYLD's
    clamps of the gradient and of the samples are differentiable almost everywhere (zero gradient where a clamp is
    active: a sample pinned at the box's edge passes no gradient, which BPDA does not suffer). With noise
    (``noise_std > 0``) the refinement is random and an attack needs EOT.

    Without anything to differentiate (``x`` does not require grad, or grad mode is off) this is ``jem.purify``.

    Args:
        jem: a :class:`jemkit.JEM` whose sampler has a pure step ``update(x, grad)`` (SGLD, PYLD; not MALA).
        x: inputs ``[B, ...]`` in data units.
        n_steps: sampler steps, >= 0.
        checkpoint: recompute steps in the backward pass (flat memory) instead of storing them.

    Returns:
        The refined inputs ``[B, ...]``, attached to ``x``'s graph.

    Raises:
        TypeError: the sampler has no pure step (MALA's accept/reject has no gradient: attack it with BPDA).
    """
    check_integer("n_steps", n_steps, minimum=0)
    if jem.sampler.steps_through_first_layer:
        raise TypeError(
            f"unrolled refinement takes one update per step, but {jem.sampler!r} takes YOPO inner steps through the "
            "first layer: the gradient would be of another function; attack this defence with BPDA (adaptive=['bpda'])"
        )
    if not jem.sampler.has_pure_step:
        raise TypeError(
            f"unrolled refinement needs a sampler with a step update(x, grad) (SGLD, PYLD), got {jem.sampler!r}: "
            "attack this defence with BPDA instead (adaptive=['bpda'])"
        )
    update = jem.sampler.update
    if not (torch.is_grad_enabled() and x.requires_grad):
        return jem.purify(x, n_steps)
    domain = getattr(jem.chains, "domain", None)
    step = _step(jem, update, domain.from_unit if domain is not None else None)
    u = domain.to_unit(x) if domain is not None else x
    for _ in range(n_steps):
        u = checkpointed(step, u, use_reentrant=False) if checkpoint else step(u)
    return domain.from_unit(u) if domain is not None else u


def _step(jem: Refinable, update: Callable, from_unit: Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor]:
    """One sampler step in unit coordinates that keeps its graph, with the classifier in its sampling mode."""

    def energy(u: Tensor) -> Tensor:
        return jem.energy(from_unit(u) if from_unit is not None else u)

    def step(u: Tensor) -> Tensor:
        with sampling_context(jem.classifier, jem.chains.sampling_mode):
            _, grad = energy_and_grad(energy, u, create_graph=True)
        return update(u, grad)

    return step
