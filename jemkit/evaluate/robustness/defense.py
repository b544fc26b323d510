"""Input-purifying defences and the ways an attacker sees them.

A :class:`Defense` refines an input before it is classified. JEM's own (:func:`jem_defense`) runs a few steps of its
sampler on ``E(x)`` from the input (:meth:`jemkit.JEM.purify`). A defence is only as strong as the strongest attack
that sees it, so :func:`attacked_through` gives the defended classifier as an attack differentiates it:

- **BPDA** (Athalye et al. 2018): forward through the defence, identity backward, so a defence that hides its
  gradient (quantisation, saturation, a clamp) cannot mask it;
- **unrolled**: exact gradients through the refinement steps (:func:`jemkit.sampling.unrolled.unrolled_refine`,
  with gradient checkpointing: memory stays flat in the number of steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from jemkit.checks import check_choice, check_integer
from jemkit.evaluate.robustness.attacks import Model
from jemkit.sampling.unrolled import unrolled_refine

if TYPE_CHECKING:
    from jemkit.module import JEM

__all__ = ["ADAPTIVE_ATTACKS", "Defense", "as_defense", "attacked_through", "defended_correct", "jem_defense"]

ADAPTIVE_ATTACKS: tuple[str, ...] = ("bpda", "unrolled")
"""Ways of attacking through a defence: identity backward (BPDA), or exact gradients through it (unrolled)."""

FIXED_NOISE_SEED = 0


def _seeded(fn: Callable[[Tensor], Tensor], seed: int) -> Callable[[Tensor], Tensor]:
    """``fn`` run from the same RNG state on every call (the caller's state restored afterwards)."""

    def call(x: Tensor) -> Tensor:
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return fn(x)

    return call


@dataclass(frozen=True)
class Defense:
    """An input purifier ``x -> x'`` applied before classifying, with what an attacker needs to know of it.

    Attributes:
        purify: the defence as deployed, ``[B, ...] -> [B, ...]``.
        differentiable: the same map with its exact gradient (for a JEM, :func:`unrolled_refine`), or ``None``
            when there is none; the ``"unrolled"`` attack differentiates through it.
        random: whether two calls on one input may differ (sampler noise, Dropout): attacks then use EOT and
            predictions average the logits of several defence draws.
        name: how reports call it, e.g. ``"10 PYLD steps on E(x)"``.
        sampler: the sampler's settings for the report, if the defence is a sampler.
    """

    purify: Callable[[Tensor], Tensor]
    differentiable: Callable[[Tensor], Tensor] | None = None
    random: bool = False
    name: str = "defence"
    sampler: str | None = None

    def with_fixed_noise(self, seed: int = FIXED_NOISE_SEED) -> Defense:
        """The same defence with its randomness frozen (the same noise on every call): the control that shows
        whether a random defence's gain comes from its randomness alone."""
        differentiable = None if self.differentiable is None else _seeded(self.differentiable, seed)
        return replace(self, purify=_seeded(self.purify, seed), differentiable=differentiable, random=False)

    def mapped(self, to_inner: Callable[[Tensor], Tensor], from_inner: Callable[[Tensor], Tensor]) -> Defense:
        """The same defence seen in other coordinates: ``u -> from_inner(purify(to_inner(u)))`` (e.g. the unit
        coordinates of an input domain, in which attacks run)."""

        def purify(u: Tensor) -> Tensor:
            return from_inner(self.purify(to_inner(u)))

        differentiable = None
        if self.differentiable is not None:
            inner = self.differentiable

            def differentiable(u: Tensor) -> Tensor:
                return from_inner(inner(to_inner(u)))

        return replace(self, purify=purify, differentiable=differentiable)


def _sampler_is_random(jem: JEM) -> bool:
    """Whether purification can differ between two calls: sampler noise (MALA always), or Dropout while sampling
    in train mode. A sampler counts as random unless it declares otherwise (:attr:`Sampler.is_random`): EOT costs
    time, not correctness."""
    dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in jem.classifier.modules())
    return jem.sampler.is_random or (jem.chains.sampling_mode == "train" and dropout)


def jem_defense(jem: JEM, n_steps: int, checkpoint: bool = True) -> Defense:
    """JEM's defence, ``n_steps`` of its own sampler on ``E(x)`` from the input, with its exact gradient when the
    sampler has one (:func:`unrolled_refine`; MALA's accept/reject step has none, so only BPDA attacks it)."""
    check_integer("n_steps", n_steps)
    sampler = jem.sampler

    def purify(x: Tensor) -> Tensor:
        return jem.purify(x, n_steps)

    def differentiable(x: Tensor) -> Tensor:
        return unrolled_refine(jem, x, n_steps, checkpoint=checkpoint)

    return Defense(
        purify=purify,
        differentiable=differentiable if sampler.has_pure_step else None,
        random=_sampler_is_random(jem),
        name=f"{n_steps} {type(sampler).__name__} steps on E(x)",
        sampler=repr(sampler),
    )


def as_defense(defense: Defense | Callable[[Tensor], Tensor] | None) -> Defense | None:
    """A plain callable is a deterministic defence without a known gradient (BPDA attacks it)."""
    if defense is None or isinstance(defense, Defense):
        return defense
    if not callable(defense):
        raise TypeError(f"defense must be a Defense, a callable x -> x' or None, got {type(defense).__name__}")
    return Defense(purify=defense)


def attacked_through(model: Model, defense: Defense, how: str) -> Model:
    """The defended classifier as an attack differentiates it: ``"bpda"`` (forward through the defence, identity
    backward) or ``"unrolled"`` (exact gradient; needs ``defense.differentiable``)."""
    if how == "unrolled":
        differentiable = defense.differentiable
        if differentiable is None:
            raise ValueError(f"the defence {defense.name!r} has no differentiable form: attack it with 'bpda'")

        def unrolled(x: Tensor) -> Tensor:
            return model(differentiable(x))

        return unrolled
    check_choice("attack through a defence", how, ADAPTIVE_ATTACKS)

    def bpda(x: Tensor) -> Tensor:
        return model(x + (defense.purify(x.detach()) - x).detach())

    return bpda


def defended_correct(model: Model, defense: Defense, x: Tensor, y: Tensor, draws: int) -> Tensor:
    """Per-example correctness ``[B]`` of the argmax of the defended logits averaged over ``draws`` defence draws."""
    logits: Tensor | float = 0.0
    for _ in range(draws):
        purified = defense.purify(x).detach()
        with torch.no_grad():
            logits = logits + model(purified)
    return torch.as_tensor(logits).argmax(1) == y
