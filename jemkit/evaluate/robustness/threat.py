"""The threat model of a robustness evaluation: which attacks see the defence, with how many draws, as a record.

A random defence (a sampler with noise) is attacked with EOT: each attack gradient is the mean over ``eot`` defence
draws, and a prediction is the argmax of the mean logits over ``draws`` defence draws. A control runs the same
attacks with the defence's noise fixed, which tells whether a gain comes from randomness alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from jemkit.checks import check_integer, check_names
from jemkit.evaluate.robustness.config import AttackBox
from jemkit.evaluate.robustness.defense import ADAPTIVE_ATTACKS, Defense, as_defense

__all__ = ["RANDOM_DEFENSE_DRAWS", "RANDOM_DEFENSE_EOT", "AttackProtocol", "resolve_protocol", "threat_model"]

RANDOM_DEFENSE_EOT = 20
"""Default gradient draws per attack step against a random defence (AutoAttack's ``rand`` version uses 20)."""

RANDOM_DEFENSE_DRAWS = 20
"""Default defence draws whose logits are averaged for one prediction under a random defence."""


@dataclass(frozen=True)
class AttackProtocol:
    """How a defence is attacked: the attacks through it, gradient draws per step, defence draws per prediction,
    and whether the fixed-noise control runs."""

    adaptive: tuple[str, ...]
    eot: int
    draws: int
    control: bool


def resolve_protocol(
    defense: Defense | None,
    adaptive: Sequence[str] | None,
    eot: int | None,
    draws: int | None,
    control: bool,
) -> AttackProtocol:
    """The attacks through the defence and the EOT counts: every attack the defence admits by default; 1 draw for
    a deterministic defence, :data:`RANDOM_DEFENSE_EOT`/:data:`RANDOM_DEFENSE_DRAWS` for a random one."""
    if adaptive is not None:
        if isinstance(adaptive, str):
            raise TypeError(f"adaptive must be a list of attack names such as ['bpda'], got the string {adaptive!r}")
        check_names("adaptive attack(s)", adaptive, ADAPTIVE_ATTACKS)
    if eot is not None:
        check_integer("eot", eot)
    if draws is not None:
        check_integer("draws", draws)
    if defense is None:
        return AttackProtocol((), 1, 1, False)
    if adaptive is None:
        adaptive = [a for a in ADAPTIVE_ATTACKS if a != "unrolled" or defense.differentiable is not None]
    elif "unrolled" in adaptive and defense.differentiable is None:
        raise ValueError(f"the defence {defense.name!r} has no differentiable form: adaptive=['bpda'] attacks it")
    adaptive = tuple(a for a in ADAPTIVE_ATTACKS if a in adaptive)  # canonical order, no repeats
    random_eot, random_draws = (RANDOM_DEFENSE_EOT, RANDOM_DEFENSE_DRAWS) if defense.random else (1, 1)
    return AttackProtocol(
        adaptive,
        random_eot if eot is None else eot,
        random_draws if draws is None else draws,
        bool(control) and defense.random,
    )


def _attacker(defense: Defense | None, protocol: AttackProtocol) -> str:
    if defense is None:
        return "white-box: knows the weights"
    if not protocol.adaptive:
        return "white-box on the classifier, blind to the defence (transfer)"
    return "white-box: knows the weights and the defence"


def threat_model(
    defense: Defense | Callable[[Tensor], Tensor] | None,
    clip: Any,
    adaptive: Sequence[str] | None = None,
    eot: int | None = None,
    draws: int | None = None,
    control: bool = True,
) -> dict[str, Any]:
    """What :func:`~jemkit.evaluate.robustness.robust_accuracy` with these arguments measures, as a report records
    it. ``clip`` as there: ``(low, high)``, an :class:`~jemkit.InputDomain` (for a model,
    :func:`~jemkit.evaluate.robustness.accuracy.attack_clip`), or ``None``."""
    defense = as_defense(defense)
    protocol = resolve_protocol(defense, adaptive, eot, draws, control)
    box = AttackBox.of(clip)
    described: dict[str, Any] = {
        "attacker": _attacker(defense, protocol),
        "data_range": box.data_range,
        "box": box.description,
        "units": "eps/std in data units; eps_01/std_01 as fractions of the box's width (inputs rescaled to [0, 1])",
    }
    if defense is None:
        return described | {"setting": "undefended", "defense": None}
    attacks = ["transfer", *protocol.adaptive]
    adaptive_note = "adaptive" if protocol.adaptive else "transfer only (non-adaptive): an upper bound on robustness"
    prediction = (
        "one defence draw" if protocol.draws == 1 else f"argmax of the logits averaged over {protocol.draws} draws"
    )
    return described | {
        "setting": adaptive_note,
        "defense": defense.name,
        "sampler": defense.sampler,
        "random": defense.random,
        "attacks": attacks,
        "defended_accuracy": f"per-example worst case over {', '.join(attacks)}",
        "eot": protocol.eot,
        "draws": protocol.draws,
        "prediction": prediction,
        "fixed_noise_control": protocol.control,
    }
