"""Adversarial and noise robustness of any classifier, optionally behind a defence attacked through it.

JEM reports that a classifier trained as an energy model is more robust, and more so when an attacked input is
first refined by a few sampler steps on ``E(x)`` (:mod:`.defense`). :func:`robust_accuracy` attacks a defended
classifier three ways and reports, per example, the worst case: **transfer** (the attack against the undefended
classifier, then the defence: an upper bound, kept as a secondary figure), **BPDA** and **unrolled** (through the
defence). The threat model is recorded beside the figures (:mod:`.threat`); attack configs and the box they stay in
are in :mod:`.config`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from jemkit.batches import unpack_batch
from jemkit.checks import check_integer
from jemkit.evaluate.robustness.attacks import Model, autoattack, eval_mode, gaussian_noise_corruption, pgd_attack
from jemkit.evaluate.robustness.config import DEFAULT_ATTACKS, AttackBox, attack_list, attack_row, parse_attack
from jemkit.evaluate.robustness.defense import (
    ADAPTIVE_ATTACKS,
    Defense,
    as_defense,
    attacked_through,
    defended_correct,
    jem_defense,
)
from jemkit.evaluate.robustness.threat import AttackProtocol, resolve_protocol, threat_model
from jemkit.evaluate.tables import text_table
from jemkit.sampling.domain import domain_of

if TYPE_CHECKING:
    from jemkit.module import JEM

__all__ = ["RobustnessOptions", "attack_clip", "format_robustness", "robust_accuracy", "robustness_section"]

_COLUMNS = ("transfer", *ADAPTIVE_ATTACKS)  # the attacks on a defended classifier, worst case over them


@dataclass
class RobustnessOptions:
    """What the robustness section of ``jemkit evaluate`` measures.

    Args:
        attacks: attack configs, one report row each (see :func:`robust_accuracy`); budgets in data units
            (``eps``, ``std``) or as fractions of the input domain's width (``eps_01``, ``std_01``).
        budgets: a standard attack list instead of ``attacks`` (``"cifar"``: L-inf 8/255, L2 0.5 on [0, 1]).
        autoattack: also run AutoAttack (``pip install 'jemkit[attacks]'``) at each PGD budget.
        autoattack_steps: APGD/FAB iterations of AutoAttack.
        defense_steps: steps of the JEM's own sampler on E(x) before classifying (the defence), attacked through
            it; 0: no defence.
        adaptive: attacks through the defence, some of ``bpda``, ``unrolled`` (default: all the defence admits;
            ``[]``: transfer only, an upper bound).
        eot: gradient draws per attack step (default 1, 20 if the defence is random).
        draws: defence draws averaged per prediction (default 1, 20 if the defence is random).
        fixed_noise_control: also attack a random defence with its noise fixed.
    """

    attacks: list[dict[str, Any]] = field(default_factory=lambda: [dict(a) for a in DEFAULT_ATTACKS])
    budgets: str | None = None
    autoattack: bool = False
    autoattack_steps: int = 100
    defense_steps: int = 0
    adaptive: list[str] | None = None
    eot: int | None = None
    draws: int | None = None
    fixed_noise_control: bool = True

    def attack_configs(self) -> list[dict[str, Any]]:
        """The attacks to run, with standard budgets and AutoAttack expanded."""
        return attack_list(self.attacks, self.budgets, self.autoattack, self.autoattack_steps)

    def check(self, clip: Any) -> None:
        """Refuse bad options before any work is done (budgets against the box ``clip``, as in
        :func:`robust_accuracy`: for a model, :func:`attack_clip`)."""
        box = AttackBox.of(clip)
        for config in self.attack_configs():
            parse_attack(config, box)
        check_integer("defense_steps", self.defense_steps, minimum=0)
        resolve_protocol(None, self.adaptive, self.eot, self.draws, self.fixed_noise_control)


# ---------------------------------------------------------------------------------------------------- one batch
def _perturb(
    attack: dict[str, Any], model: Model, x: Tensor, y: Tensor, clip: tuple[float, float] | None, eot: int
) -> Tensor:
    """The attacked (or corrupted) inputs of one config against ``model``, with ``eot`` draws per gradient."""
    kind = attack["kind"]
    if kind == "noise":
        return gaussian_noise_corruption(x, attack["std"], clip=clip)
    if kind == "pgd":
        keys = ("norm", "steps", "step_size", "restarts", "random_start")
        return pgd_attack(model, x, y, attack["eps"], clip=clip, eot=eot, **{k: attack[k] for k in keys})
    if kind == "autoattack":
        if clip is None:
            raise ValueError("AutoAttack needs the data range clip=(low, high), got clip=None")
        version = attack["version"] or ("rand" if eot > 1 else "standard")
        keys = ("norm", "steps", "queries")
        return autoattack(
            model, x, y, attack["eps"], version=version, eot=eot, clip=clip, **{k: attack[k] for k in keys}
        )
    return x


def _defended_columns(
    attack: dict[str, Any],
    model: Model,
    defense: Defense,
    protocol: AttackProtocol,
    batch: tuple[Tensor, Tensor, Tensor],
    clip: tuple[float, float] | None,
) -> dict[str, Tensor]:
    """Per-example correctness under the defence: for the transfer inputs, and for each attack through it."""
    x, y, x_transfer = batch
    correct = {"transfer": defended_correct(model, defense, x_transfer, y, protocol.draws)}
    if attack["kind"] in ("pgd", "autoattack"):
        for how in protocol.adaptive:
            x_adv = _perturb(attack, attacked_through(model, defense, how), x, y, clip, protocol.eot)
            correct[how] = defended_correct(model, defense, x_adv, y, protocol.draws)
    return correct


def _worst_case(correct: dict[str, Tensor]) -> Tensor:
    """An example counts as robust only if it is classified correctly under every attack."""
    return torch.stack(list(correct.values())).all(0)


def _batch_counts(
    attack: dict[str, Any],
    model: Model,
    defense: Defense | None,
    protocol: AttackProtocol,
    x: Tensor,
    y: Tensor,
    clip: tuple[float, float] | None,
) -> dict[str, int]:
    """Correct predictions of one batch under one attack config, per report column."""
    x_att = _perturb(attack, model, x, y, clip, eot=1)
    with torch.no_grad():
        counts = {"accuracy": int((model(x_att).argmax(1) == y).sum())}
    if defense is None:
        return counts
    correct = _defended_columns(attack, model, defense, protocol, (x, y, x_att), clip)
    counts |= {f"{how}_accuracy": int(ok.sum()) for how, ok in correct.items()}
    counts["defended_accuracy"] = int(_worst_case(correct).sum())
    if protocol.control:
        fixed = replace(protocol, eot=1, draws=1)
        control = _defended_columns(attack, model, defense.with_fixed_noise(), fixed, (x, y, x_att), clip)
        counts["fixed_noise_accuracy"] = int(_worst_case(control).sum())
    return counts


# ---------------------------------------------------------------------------------------------------- the loop
def _model_device(model: Model) -> torch.device | None:
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


def _loader_length(loader: Iterable, max_batches: int | None) -> int | None:
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return total


def _in_attack_coordinates(model: Model, defense: Defense | None, box: AttackBox) -> tuple[Model, Defense | None]:
    """The classifier and the defence as functions of attack coordinates (the domain's unit coordinates)."""
    if box.domain is None:
        return model, defense

    def attacked(u: Tensor) -> Tensor:
        return model(box.from_attack(u))

    return attacked, None if defense is None else defense.mapped(box.from_attack, box.to_attack)


def robust_accuracy(
    model: Model,
    loader: Iterable,
    attacks: Sequence[dict[str, Any]],
    defense: Defense | Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    clip: Any = "domain",
    adaptive: Sequence[str] | None = None,
    eot: int | None = None,
    draws: int | None = None,
    control: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy of ``model`` under each attack, and behind ``defense`` under attacks that see the defence.

    One pass over ``loader``: every batch is attacked by every config. Attack configs are dicts with a ``"kind"``:

    - ``{"kind": "clean"}``: the unmodified inputs.
    - ``{"kind": "noise", "std": 0.1}``: :func:`~.attacks.gaussian_noise_corruption`.
    - ``{"kind": "pgd", "eps": 0.03, "norm": "linf", "steps": 10, "restarts": 1}``:
      :func:`~.attacks.pgd_attack`; optional ``step_size`` and ``random_start`` are passed through.
      ``norm``, ``steps`` and ``restarts`` default to ``"linf"``, 10 and 1.
    - ``{"kind": "autoattack", "eps": 0.03, "norm": "linf"}``: :func:`~.attacks.autoattack` (needs
      ``jemkit[attacks]``); ``version`` defaults to ``"standard"``, ``"rand"`` against a random defence; ``steps``
      100 and ``queries`` 5000 as in the paper.

    ``eps`` and ``std`` are in data units; ``eps_01``/``std_01`` give them as fractions of the box's width.

    With a defence, each row reports the transfer attack (computed against the undefended model, then defended),
    each attack through the defence (``adaptive``: BPDA, unrolled) and ``defended_accuracy``, the per-example worst
    case over all of them: the honest figure. Clean and noise rows have nothing to adapt: their defended accuracy is
    the defence applied to those inputs. A random defence (``defense.random``) is attacked with ``eot`` gradient
    draws per step and scored by the argmax of the logits averaged over ``draws`` defence draws; the control
    (``fixed_noise_accuracy``) repeats the attacks with the defence's noise fixed.

    Args:
        model: classifier, inputs ``[B, ...]`` -> logits ``[B, C]``; run in eval mode, every flag restored
            afterwards; only input gradients are taken, so parameters' ``.grad`` is untouched.
        loader: iterable of ``(x, y)`` batches.
        attacks: the attack configs, one result row each, in order.
        defense: a :class:`~.defense.Defense` (for a JEM: :func:`~.defense.jem_defense`), or a plain callable
            ``x -> x'`` (taken as deterministic, attacked by BPDA only), or ``None``.
        device: where to run; default: the device of the model's parameters (else where the batches are).
        progress: show a tqdm progress bar over batches.
        max_batches: evaluate only the first ``max_batches`` batches (``None``: all).
        clip: the box attacks and noise keep the inputs in: ``"domain"`` (default), the model's own input domain
            (:func:`attack_clip`: a JEM's ``jem.domain``, a model without one the unit box); an
            :class:`~jemkit.InputDomain` (attacks run in its unit coordinates, a box per channel or feature);
            ``(low, high)`` in data units; or ``None`` (unbounded, fractional budgets unavailable).
        adaptive: attacks through the defence, some of :data:`~jemkit.evaluate.robustness.defense.ADAPTIVE_ATTACKS`;
            ``None``: all the defence admits (``"unrolled"`` needs ``defense.differentiable``); ``[]``: transfer only.
        eot: gradient draws per attack step through a random defence; default 1 if deterministic, else
            :data:`~jemkit.evaluate.robustness.threat.RANDOM_DEFENSE_EOT`.
        draws: defence draws averaged per prediction; default 1 if deterministic, else
            :data:`~jemkit.evaluate.robustness.threat.RANDOM_DEFENSE_DRAWS`.
        control: also attack a random defence with its noise fixed (``fixed_noise_accuracy``).

    Returns:
        One dict per attack: ``{"attack": "clean" | "noise" | "pgd-linf" | "pgd-l2" | "autoattack-linf" |
        "autoattack-l2", "eps", "eps_01", "steps", "restarts", "std", "std_01", "accuracy", "transfer_accuracy",
        "bpda_accuracy", "unrolled_accuracy", "defended_accuracy", "fixed_noise_accuracy", "n"}``; keys that do not
        apply are ``None``; ``n`` is the number of examples evaluated.

    Example::

        rows = robust_accuracy(
            jem,
            dm.test_dataloader(),
            [{"kind": "clean"}, {"kind": "pgd", "norm": "linf", "eps_01": 8 / 255, "steps": 20}],
            defense=jem_defense(jem, n_steps=10),
        )
    """
    box = AttackBox.of(attack_clip(model) if isinstance(clip, str) and clip == "domain" else clip)
    parsed = [parse_attack(config, box) for config in attacks]
    if not parsed:
        raise ValueError("attacks must hold at least one attack config, got an empty list")
    if max_batches is not None:
        check_integer("max_batches", max_batches)
    defense = as_defense(defense)
    protocol = resolve_protocol(defense, adaptive, eot, draws, control)
    device = torch.device(device) if device is not None else _model_device(model)
    attacked, attacked_defense = _in_attack_coordinates(model, defense, box)

    totals = [dict.fromkeys(_columns(defense, protocol), 0) for _ in parsed]
    n = 0
    with eval_mode(model):
        batches = _loader_length(loader, max_batches)
        bar = tqdm(loader, total=batches, desc="robustness", unit="batch", disable=not progress, leave=False)
        for b, batch in enumerate(bar):
            if max_batches is not None and b >= max_batches:
                break
            x, y = unpack_batch(batch)
            if device is not None:
                x, y = x.to(device), y.to(device)
            u = box.to_attack(x)
            for attack, total in zip(parsed, totals, strict=True):
                counts = _batch_counts(attack, attacked, attacked_defense, protocol, u, y, box.clip)
                for column, count in counts.items():
                    total[column] += count
            n += int(y.shape[0])
        bar.close()
    if n == 0:
        raise ValueError("the loader yielded no examples")
    return [_result(attack, total, n, box) for attack, total in zip(parsed, totals, strict=True)]


def _columns(defense: Defense | None, protocol: AttackProtocol) -> list[str]:
    if defense is None:
        return ["accuracy"]
    control = ["fixed_noise_accuracy"] if protocol.control else []
    adaptive = [f"{a}_accuracy" for a in protocol.adaptive]
    return ["accuracy", "transfer_accuracy", *adaptive, "defended_accuracy", *control]


def _result(attack: dict[str, Any], total: dict[str, int], n: int, box: AttackBox) -> dict[str, Any]:
    """One report row: the attack's settings and each column's accuracy (``None`` where it was not measured)."""
    kind = attack["kind"]
    adaptive_columns = [f"{a}_accuracy" for a in ADAPTIVE_ATTACKS]
    measured = {c: v / n for c, v in total.items() if kind in ("pgd", "autoattack") or c not in adaptive_columns}
    columns = ["accuracy", *(f"{c}_accuracy" for c in _COLUMNS), "defended_accuracy", "fixed_noise_accuracy"]
    return {**attack_row(attack, box), **{c: measured.get(c) for c in columns}, "n": n}


# ---------------------------------------------------------------------------------------------------- the report
def attack_clip(model: Any) -> Any:
    """The box a model is attacked in: its input domain (:func:`~jemkit.sampling.domain.domain_of`)."""
    return domain_of(model)


def robustness_section(jem: JEM, loader: Iterable, options: RobustnessOptions, progress: bool = True) -> dict[str, Any]:
    """The report's robustness section: ``{"defense_steps", "threat_model", "rows"}``, attacks inside the JEM's
    input domain (a plain classifier without one: the box ``[-1, 1]``)."""
    clip = attack_clip(jem)
    defense = jem_defense(jem, options.defense_steps) if options.defense_steps > 0 else None
    protocol = {
        "adaptive": options.adaptive,
        "eot": options.eot,
        "draws": options.draws,
        "control": options.fixed_noise_control,
    }
    threat = threat_model(defense, clip=clip, **protocol)  # checks the options before the long run
    rows = robust_accuracy(
        jem, loader, options.attack_configs(), defense=defense, device=jem.device, progress=progress, clip=clip,
        **protocol,
    )  # fmt: skip
    return {"defense_steps": options.defense_steps, "threat_model": threat, "rows": rows}


def _columns_of(rob: dict[str, Any]) -> list[tuple[str, str]]:
    """``(row key, title)`` of the accuracy columns: undefended, each attack on the defence, their worst case."""
    threat = rob.get("threat_model") or {}
    if not rob.get("defense_steps"):
        return [("accuracy", "accuracy")]
    eot = threat.get("eot", 1)
    titles = {"transfer": "transfer", "bpda": "BPDA" + (f"+EOT{eot}" if eot > 1 else ""), "unrolled": "unrolled"}
    attacks = threat.get("attacks", ["transfer"])
    columns = [("accuracy", "undefended"), *((f"{a}_accuracy", titles.get(a, a)) for a in attacks)]
    columns.append(("defended_accuracy", "defended (worst)" if len(attacks) > 1 else "defended"))
    if threat.get("fixed_noise_control"):
        columns.append(("fixed_noise_accuracy", "noise fixed"))
    return columns


def _notes(rob: dict[str, Any]) -> list[str]:
    """The threat model under the table, in words."""
    threat = rob.get("threat_model")
    if not threat:
        return []
    data_range = threat["data_range"]
    units = f"in data units (range {data_range}) and on [0, 1]" if data_range else "in data units (unbounded data)"
    notes = [f"threat model: {threat['attacker']}; budgets {units}; box: {threat.get('box', '-')}"]
    if threat.get("defense"):
        kind = "random" if threat["random"] else "deterministic"
        notes.append(f"defence: {threat['defense']}, {kind}: {threat['sampler']}")
        notes.append(
            f"defended: {threat['defended_accuracy']}; {threat['eot']} gradient draw(s) per attack step (EOT); "
            f"prediction: {threat['prediction']}"
        )
        if len(threat["attacks"]) == 1:
            notes.append("! transfer attacks only: the defended figures are upper bounds on robustness")
    return notes


def format_robustness(rob: dict[str, Any]) -> list[str]:
    """The robustness table and its threat model, as report lines."""
    columns = _columns_of(rob)
    rows = [
        [
            r["attack"],
            r["eps"] if r.get("eps") is not None else r.get("std"),
            r.get("eps_01") if r.get("eps_01") is not None else r.get("std_01"),
            *(r.get(key) for key, _ in columns),
        ]
        for r in rob["rows"]
    ]
    table = text_table(["attack", "eps/std", "on [0,1]", *(title for _, title in columns)], rows)
    return ["Robustness", table, *_notes(rob), ""]
