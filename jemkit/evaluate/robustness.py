"""Adversarial and noise robustness of any classifier, optionally behind an input-purifying defence, attacked
through the defence.

JEM reports that a classifier trained as an energy model is more robust, and more so when an attacked input is
first refined by a few sampler steps on ``E(x)`` before it is classified (:meth:`jemkit.JEM.purify`). A defence is
only as strong as the strongest attack that sees it, so :func:`robust_accuracy` attacks a defended classifier three
ways and reports, per example, the worst case:

- **transfer**: PGD (or AutoAttack) against the undefended classifier, then the defence; the non-adaptive setting,
  an upper bound on robustness, kept as a secondary figure;
- **BPDA** (Athalye et al. 2018): the attack runs through the defence, whose backward pass is the identity, so a
  defence that hides its gradient (quantisation, saturation, a clamp) cannot mask it;
- **unrolled**: exact gradients through the K purification steps (:func:`unrolled_purify`, with gradient
  checkpointing: memory stays flat in K).

A random defence (a sampler with noise) is attacked with EOT: each attack gradient is the mean over ``eot`` defence
draws, and a prediction is the argmax of the mean logits over ``draws`` defence draws. A control runs the same
attacks with the defence's noise fixed, which tells whether a gain comes from randomness alone.

Units: ``eps`` and ``std`` are in data units (jemkit's inputs span ``[-1, 1]``, so ``8/255`` on ``[0, 1]`` images is
``eps = 16/255`` here); attack configs may give ``eps_01``/``std_01`` on inputs rescaled to ``[0, 1]`` instead, and
every row reports both. :data:`STANDARD_BUDGETS` holds the usual CIFAR budgets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpointed
from tqdm.auto import tqdm

from jemkit.adapters import sampling_context, unpack_batch
from jemkit.evaluate.attacks import (
    AUTOATTACK_VERSIONS,
    NORMS,
    Model,
    _check_clip,
    _check_count,
    _check_nonnegative,
    _check_norm,
    _eval_mode,
    autoattack,
    pgd_attack,
)

__all__ = [
    "ADAPTIVE_ATTACKS",
    "ATTACK_KINDS",
    "NORMS",
    "RANDOM_DEFENSE_DRAWS",
    "RANDOM_DEFENSE_EOT",
    "STANDARD_BUDGETS",
    "Defense",
    "autoattack",
    "gaussian_noise_corruption",
    "jem_defense",
    "pgd_attack",
    "robust_accuracy",
    "threat_model",
    "unrolled_purify",
]

ATTACK_KINDS: tuple[str, ...] = ("clean", "noise", "pgd", "autoattack")
"""Values of the ``"kind"`` key of an attack config of :func:`robust_accuracy`."""

ADAPTIVE_ATTACKS: tuple[str, ...] = ("bpda", "unrolled")
"""Ways of attacking through a defence: identity backward (BPDA), or exact gradients through it (unrolled)."""

RANDOM_DEFENSE_EOT = 20
"""Default gradient draws per attack step against a random defence (AutoAttack's ``rand`` version uses 20)."""

RANDOM_DEFENSE_DRAWS = 20
"""Default defence draws whose logits are averaged for one prediction under a random defence."""

STANDARD_BUDGETS: dict[str, tuple[dict[str, Any], ...]] = {
    "cifar": (
        {"kind": "clean"},
        {"kind": "pgd", "norm": "linf", "eps_01": 8 / 255, "steps": 10, "restarts": 1},
        {"kind": "pgd", "norm": "l2", "eps_01": 0.5, "steps": 10, "restarts": 1},
    ),
}
"""Attack lists with the field's standard budgets, given on ``[0, 1]`` inputs (L-inf 8/255, L2 0.5 for CIFAR)."""

_REQUIRED = object()
_BUDGET_KEYS = ("eps", "std")  # given in data units, or with the suffix "_01" on inputs rescaled to [0, 1]

_ATTACK_KEYS: dict[str, dict[str, Any]] = {
    # the keys each kind accepts besides "kind", with their defaults
    "clean": {},
    "noise": {"std": _REQUIRED},
    "pgd": {"eps": _REQUIRED, "norm": "linf", "steps": 10, "step_size": None, "restarts": 1, "random_start": True},
    "autoattack": {"eps": _REQUIRED, "norm": "linf", "version": None, "steps": 100, "queries": 5000},
}

_COLUMNS = ("transfer", *ADAPTIVE_ATTACKS)  # the attacks on a defended classifier, worst case over them
_FIXED_NOISE_SEED = 0


# ---------------------------------------------------------------------------------------------------- noise
def gaussian_noise_corruption(
    x: Tensor,
    std: float,
    clip: tuple[float, float] | None = (-1.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """``x + std * N(0, I)`` clamped to ``clip``: a random (not adversarial) corruption of inputs ``[B, ...]``.

    Args:
        x: inputs ``[B, ...]``.
        std: noise standard deviation in data units (jemkit data span ``[-1, 1]``), >= 0; 0 returns ``x``.
        clip: ``(low, high)`` to clamp into, or ``None``.
        generator: optional ``torch.Generator`` on ``x``'s device, for reproducible noise.

    Returns:
        Corrupted inputs shaped like ``x``.
    """
    std = _check_nonnegative("std", std)
    clip = _check_clip(clip)
    if std == 0:
        return x.detach()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = x.detach() + std * noise
    return out if clip is None else out.clamp(*clip)


# ---------------------------------------------------------------------------------------------------- the defence
def _identity(t: Tensor) -> Tensor:
    return t


def _unit_maps(jem: Any) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(to_unit, from_unit)`` of the coordinates the JEM's chains run in: its input domain's, if it has one."""
    domain = getattr(jem.chains, "domain", None)
    return (domain.to_unit, domain.from_unit) if domain is not None else (_identity, _identity)


def _sampler_step(
    classifier: nn.Module, mode: str, energy: Callable[[Tensor], Tensor], update: Callable, u: Tensor
) -> Tensor:
    """One sampler step ``u -> update(u, dE/du)`` that keeps its graph, with the classifier in its sampling mode.

    The mode is set here, inside the checkpointed function, so that the recomputation in the backward pass sees the
    classifier exactly as the forward did."""
    with sampling_context(classifier, mode):
        e = energy(u)
        if e.shape != u.shape[:1]:
            raise ValueError(f"the energy must give one value per sample [{u.shape[0]}], got {tuple(e.shape)}")
        (grad,) = torch.autograd.grad(e.sum(), u, create_graph=True)
    return update(u, grad)


def unrolled_purify(jem: Any, x: Tensor, n_steps: int, checkpoint: bool = True) -> Tensor:
    """``jem.purify(x, n_steps)`` as a differentiable function of ``x``: the defence's exact gradient, for attacks.

    Each sampler step ``x <- update(x, dE/dx)`` keeps the graph of its energy gradient (``create_graph=True``), so
    the gradient of a loss after the defence flows back through all ``n_steps``. With ``checkpoint`` each step is
    recomputed in the backward pass instead of stored, so memory stays flat in ``n_steps`` (about 1.7x the time);
    the recomputation replays the step's noise. The classifier runs as ``jem.purify`` runs it (the chains'
    sampling mode), in the chains' unit coordinates when they have an input domain.

    PYLD's clamps of the gradient and of the samples are differentiable almost everywhere (zero gradient where a
    clamp is active: a sample pinned at the data range's edge passes no gradient, which BPDA does not suffer). With
    noise (``noise_std > 0``) the defence is random and an attack needs EOT.

    Without anything to differentiate (``x`` does not require grad, or grad mode is off) this is ``jem.purify``.

    Args:
        jem: a :class:`jemkit.JEM` (anything with ``purify``, ``energy``, ``classifier`` and ``chains``) whose
            sampler has a pure step ``update(x, grad)`` (SGLD, PYLD; not MALA).
        x: inputs ``[B, ...]`` in data units.
        n_steps: sampler steps, >= 0.
        checkpoint: recompute steps in the backward pass (flat memory) instead of storing them.

    Returns:
        The purified inputs ``[B, ...]``, attached to ``x``'s graph.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an integer >= 0, got {n_steps!r}")
    sampler = jem.sampler
    update = getattr(sampler, "update", None)
    if not callable(update):
        raise TypeError(
            f"unrolled purification needs a sampler with a step update(x, grad) (SGLD, PYLD), got {sampler!r}: "
            "attack this defence with BPDA instead (adaptive=['bpda'])"
        )
    if not (torch.is_grad_enabled() and x.requires_grad):
        return jem.purify(x, n_steps)
    to_unit, from_unit = _unit_maps(jem)
    step = _step_function(jem, from_unit, update)
    u = to_unit(x)
    for _ in range(n_steps):
        u = checkpointed(step, u, use_reentrant=False) if checkpoint else step(u)
    return from_unit(u)


def _step_function(jem: Any, from_unit: Callable[[Tensor], Tensor], update: Callable) -> Callable[[Tensor], Tensor]:
    def energy(u: Tensor) -> Tensor:
        return jem.energy(from_unit(u))

    def step(u: Tensor) -> Tensor:
        return _sampler_step(jem.classifier, jem.chains.sampling_mode, energy, update, u)

    return step


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
        differentiable: the same map with its exact gradient (for a JEM, :func:`unrolled_purify`), or ``None``
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

    def with_fixed_noise(self, seed: int = _FIXED_NOISE_SEED) -> Defense:
        """The same defence with its randomness frozen (the same noise on every call): the control that shows
        whether a random defence's gain comes from its randomness alone."""
        differentiable = None if self.differentiable is None else _seeded(self.differentiable, seed)
        return replace(self, purify=_seeded(self.purify, seed), differentiable=differentiable, random=False)


def _sampler_is_random(jem: Any) -> bool:
    """Whether purification can differ between two calls: sampler noise (MALA always), or Dropout while sampling
    in train mode. Unknown samplers count as random (EOT costs time, not correctness)."""
    sampler = jem.sampler
    noisy = getattr(sampler, "noise_std", None)
    random = not hasattr(sampler, "update") or noisy is None or noisy > 0
    dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in jem.classifier.modules())
    return random or (jem.chains.sampling_mode == "train" and dropout)


def jem_defense(jem: Any, n_steps: int, checkpoint: bool = True) -> Defense:
    """JEM's defence, ``n_steps`` of its own sampler on ``E(x)`` from the input, with its exact gradient when the
    sampler has one (:func:`unrolled_purify`; MALA's accept/reject step has none, so only BPDA attacks it)."""
    _check_count("n_steps", n_steps)
    sampler = jem.sampler

    def purify(x: Tensor) -> Tensor:
        return jem.purify(x, n_steps)

    def differentiable(x: Tensor) -> Tensor:
        return unrolled_purify(jem, x, n_steps, checkpoint=checkpoint)

    return Defense(
        purify=purify,
        differentiable=differentiable if callable(getattr(sampler, "update", None)) else None,
        random=_sampler_is_random(jem),
        name=f"{n_steps} {type(sampler).__name__} steps on E(x)",
        sampler=repr(sampler),
    )


def _as_defense(defense: Defense | Callable[[Tensor], Tensor] | None) -> Defense | None:
    """A plain callable is a deterministic defence without a known gradient (BPDA attacks it)."""
    if defense is None or isinstance(defense, Defense):
        return defense
    if not callable(defense):
        raise TypeError(f"defense must be a Defense, a callable x -> x' or None, got {type(defense).__name__}")
    return Defense(purify=defense)


def _through(model: Model, defense: Defense, how: str) -> Model:
    """The defended classifier as an attack differentiates it: BPDA (forward through the defence, identity
    backward) or unrolled (exact gradient)."""
    if how == "unrolled":
        differentiable = defense.differentiable
        assert differentiable is not None  # checked by _resolve_protocol

        def unrolled(x: Tensor) -> Tensor:
            return model(differentiable(x))

        return unrolled

    def bpda(x: Tensor) -> Tensor:
        return model(x + (defense.purify(x.detach()) - x).detach())

    return bpda


def _defended_correct(model: Model, defense: Defense, x: Tensor, y: Tensor, draws: int) -> Tensor:
    """Per-example correctness ``[B]`` of the argmax of the defended logits averaged over ``draws`` defence draws."""
    logits: Tensor | float = 0.0
    for _ in range(draws):
        purified = defense.purify(x).detach()
        with torch.no_grad():
            logits = logits + model(purified)
    return torch.as_tensor(logits).argmax(1) == y


# ---------------------------------------------------------------------------------------------------- protocol
@dataclass(frozen=True)
class _Protocol:
    adaptive: tuple[str, ...]
    eot: int
    draws: int
    control: bool


def _resolve_protocol(
    defense: Defense | None,
    adaptive: Sequence[str] | None,
    eot: int | None,
    draws: int | None,
    control: bool,
) -> _Protocol:
    """The attacks through the defence and the EOT counts: every attack the defence admits by default; 1 draw for
    a deterministic defence, :data:`RANDOM_DEFENSE_EOT`/:data:`RANDOM_DEFENSE_DRAWS` for a random one."""
    if adaptive is not None:
        if isinstance(adaptive, str):
            raise TypeError(f"adaptive must be a list of attack names such as ['bpda'], got the string {adaptive!r}")
        unknown = [a for a in adaptive if a not in ADAPTIVE_ATTACKS]
        if unknown:
            raise ValueError(f"unknown adaptive attack(s) {unknown}; expected some of {', '.join(ADAPTIVE_ATTACKS)}")
    if eot is not None:
        _check_count("eot", eot)
    if draws is not None:
        _check_count("draws", draws)
    if defense is None:
        return _Protocol((), 1, 1, False)
    if adaptive is None:
        adaptive = [a for a in ADAPTIVE_ATTACKS if a != "unrolled" or defense.differentiable is not None]
    elif "unrolled" in adaptive and defense.differentiable is None:
        raise ValueError(f"the defence {defense.name!r} has no differentiable form: adaptive=['bpda'] attacks it")
    adaptive = tuple(a for a in ADAPTIVE_ATTACKS if a in adaptive)  # canonical order, no repeats
    random_eot, random_draws = (RANDOM_DEFENSE_EOT, RANDOM_DEFENSE_DRAWS) if defense.random else (1, 1)
    return _Protocol(
        adaptive,
        random_eot if eot is None else eot,
        random_draws if draws is None else draws,
        bool(control) and defense.random,
    )


def _attacker(defense: Defense | None, proto: _Protocol) -> str:
    if defense is None:
        return "white-box: knows the weights"
    if not proto.adaptive:
        return "white-box on the classifier, blind to the defence (transfer)"
    return "white-box: knows the weights and the defence"


def threat_model(
    defense: Defense | Callable[[Tensor], Tensor] | None,
    clip: tuple[float, float] | None = (-1.0, 1.0),
    adaptive: Sequence[str] | None = None,
    eot: int | None = None,
    draws: int | None = None,
    control: bool = True,
) -> dict[str, Any]:
    """What :func:`robust_accuracy` with these arguments measures, as a report records it."""
    defense = _as_defense(defense)
    proto = _resolve_protocol(defense, adaptive, eot, draws, control)
    clip = _check_clip(clip)
    described: dict[str, Any] = {
        "attacker": _attacker(defense, proto),
        "data_range": list(clip) if clip is not None else None,
        "units": "eps/std in data units; eps_01/std_01 on inputs rescaled to [0, 1]",
    }
    if defense is None:
        return described | {"setting": "undefended", "defense": None}
    attacks = ["transfer", *proto.adaptive]
    adaptive_note = "adaptive" if proto.adaptive else "transfer only (non-adaptive): an upper bound on robustness"
    prediction = "one defence draw" if proto.draws == 1 else f"argmax of the logits averaged over {proto.draws} draws"
    return described | {
        "setting": adaptive_note,
        "defense": defense.name,
        "sampler": defense.sampler,
        "random": defense.random,
        "attacks": attacks,
        "defended_accuracy": f"per-example worst case over {', '.join(attacks)}",
        "eot": proto.eot,
        "draws": proto.draws,
        "prediction": prediction,
        "fixed_noise_control": proto.control,
    }


# ---------------------------------------------------------------------------------------------------- configs
def _resolve_budget(parsed: dict[str, Any], key: str, clip: tuple[float, float] | None) -> None:
    """Fill ``parsed[key]`` (data units) from ``parsed[key + "_01"]`` (on ``[0, 1]`` inputs) if that was given."""
    unit_key = f"{key}_01"
    if parsed.get(unit_key) is None:
        return
    if parsed[key] is not _REQUIRED:
        raise ValueError(f"give {key} (data units) or {unit_key} (on [0, 1] inputs), not both: got {parsed!r}")
    if clip is None:
        raise ValueError(f"{unit_key} needs the data range: pass clip=(low, high), got clip=None")
    parsed[key] = _check_nonnegative(unit_key, parsed[unit_key]) * (clip[1] - clip[0])


def _parse_attack(config: dict[str, Any], clip: tuple[float, float] | None) -> dict[str, Any]:
    """Validate one attack config and fill in its defaults (budgets in data units)."""
    if not isinstance(config, dict):
        raise TypeError(f"each attack must be a dict such as {{'kind': 'pgd', 'eps': 0.03}}, got {config!r}")
    kind = config.get("kind")
    if kind not in _ATTACK_KEYS:
        raise ValueError(f"unknown attack kind {kind!r} in {config!r}; expected one of {', '.join(ATTACK_KINDS)}")
    allowed = _ATTACK_KEYS[kind]
    accepted = set(allowed) | {f"{k}_01" for k in _BUDGET_KEYS if k in allowed}
    unknown = sorted(set(config) - accepted - {"kind"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for a {kind!r} attack; allowed: {sorted(accepted)}")
    parsed = {"kind": kind, **allowed, **config}
    for key in _BUDGET_KEYS:
        if key in allowed:
            _resolve_budget(parsed, key, clip)
    missing = [key for key, value in parsed.items() if value is _REQUIRED]
    if missing:
        raise ValueError(f"a {kind!r} attack needs {missing} (or {missing[0]}_01 on [0, 1] inputs), got {config!r}")
    _check_attack_values(parsed)
    return parsed


def _check_attack_values(parsed: dict[str, Any]) -> None:
    if parsed["kind"] == "noise":
        _check_nonnegative("std", parsed["std"])
    if parsed["kind"] in ("pgd", "autoattack"):
        _check_norm(parsed["norm"])
        _check_nonnegative("eps", parsed["eps"])
        _check_count("steps", parsed["steps"])
    if parsed["kind"] == "pgd":
        _check_count("restarts", parsed["restarts"])
    if parsed["kind"] == "autoattack":
        _check_count("queries", parsed["queries"])
        if parsed["version"] not in (None, *AUTOATTACK_VERSIONS):
            raise ValueError(
                f"unknown AutoAttack version {parsed['version']!r}; expected None (automatic) or one of "
                f"{', '.join(AUTOATTACK_VERSIONS)}"
            )


def _in_unit_range(value: float | None, clip: tuple[float, float] | None) -> float | None:
    return None if value is None or clip is None else value / (clip[1] - clip[0])


def _row(attack: dict[str, Any], clip: tuple[float, float] | None) -> dict[str, Any]:
    kind = attack["kind"]
    return {
        "attack": f"{kind}-{attack['norm']}" if kind in ("pgd", "autoattack") else kind,
        "eps": attack.get("eps"),
        "eps_01": _in_unit_range(attack.get("eps"), clip),
        "steps": attack.get("steps"),
        "restarts": attack.get("restarts"),
        "std": attack.get("std"),
        "std_01": _in_unit_range(attack.get("std"), clip),
    }


# ---------------------------------------------------------------------------------------------------- evaluation
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
        version = attack["version"] or ("rand" if eot > 1 else "standard")
        keys = ("norm", "steps", "queries")
        if clip is None:
            raise ValueError("AutoAttack needs the data range clip=(low, high), got clip=None")
        return autoattack(
            model, x, y, attack["eps"], version=version, eot=eot, clip=clip, **{k: attack[k] for k in keys}
        )
    return x


def _defended_columns(
    attack: dict[str, Any],
    model: Model,
    defense: Defense,
    proto: _Protocol,
    batch: tuple[Tensor, Tensor, Tensor],
    clip: tuple[float, float] | None,
) -> dict[str, Tensor]:
    """Per-example correctness under the defence: for the transfer inputs, and for each attack through it."""
    x, y, x_transfer = batch
    correct = {"transfer": _defended_correct(model, defense, x_transfer, y, proto.draws)}
    if attack["kind"] in ("pgd", "autoattack"):
        for how in proto.adaptive:
            x_adv = _perturb(attack, _through(model, defense, how), x, y, clip, proto.eot)
            correct[how] = _defended_correct(model, defense, x_adv, y, proto.draws)
    return correct


def _worst_case(correct: dict[str, Tensor]) -> Tensor:
    """An example counts as robust only if it is classified correctly under every attack."""
    return torch.stack(list(correct.values())).all(0)


def _batch_counts(
    attack: dict[str, Any],
    model: Model,
    defense: Defense | None,
    proto: _Protocol,
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
    correct = _defended_columns(attack, model, defense, proto, (x, y, x_att), clip)
    counts |= {f"{how}_accuracy": int(ok.sum()) for how, ok in correct.items()}
    counts["defended_accuracy"] = int(_worst_case(correct).sum())
    if proto.control:
        fixed = replace(proto, eot=1, draws=1)
        control = _defended_columns(attack, model, defense.with_fixed_noise(), fixed, (x, y, x_att), clip)
        counts["fixed_noise_accuracy"] = int(_worst_case(control).sum())
    return counts


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


def robust_accuracy(
    model: Model,
    loader: Iterable,
    attacks: list[dict[str, Any]],
    defense: Defense | Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    clip: tuple[float, float] | None = (-1.0, 1.0),
    adaptive: Sequence[str] | None = None,
    eot: int | None = None,
    draws: int | None = None,
    control: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy of ``model`` under each attack, and behind ``defense`` under attacks that see the defence.

    One pass over ``loader``: every batch is attacked by every config. Attack configs are dicts with a ``"kind"``:

    - ``{"kind": "clean"}``: the unmodified inputs.
    - ``{"kind": "noise", "std": 0.1}``: :func:`gaussian_noise_corruption`.
    - ``{"kind": "pgd", "eps": 0.03, "norm": "linf", "steps": 10, "restarts": 1}``: :func:`pgd_attack`; optional
      ``step_size`` and ``random_start`` are passed through. ``norm``, ``steps`` and ``restarts`` default to
      ``"linf"``, 10 and 1.
    - ``{"kind": "autoattack", "eps": 0.03, "norm": "linf"}``: :func:`~jemkit.evaluate.attacks.autoattack` (needs
      ``jemkit[attacks]``); ``version`` defaults to ``"standard"``, ``"rand"`` against a random defence; ``steps``
      100 and ``queries`` 5000 as in the paper.

    ``eps`` and ``std`` are in data units; ``eps_01``/``std_01`` give them on inputs rescaled to ``[0, 1]``.

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
        defense: a :class:`Defense` (for a JEM: :func:`jem_defense`), or a plain callable ``x -> x'`` (taken as
            deterministic, attacked by BPDA only), or ``None``.
        device: where to run; default: the device of the model's parameters (else where the batches are).
        progress: show a tqdm progress bar over batches.
        max_batches: evaluate only the first ``max_batches`` batches (``None``: all).
        clip: data range that attacks and noise keep the inputs in (and the unit of ``eps_01``).
        adaptive: attacks through the defence, some of :data:`ADAPTIVE_ATTACKS`; ``None``: all the defence admits
            (``"unrolled"`` needs ``defense.differentiable``); ``[]``: transfer only, an upper bound.
        eot: gradient draws per attack step through a random defence; default 1 if deterministic, else
            :data:`RANDOM_DEFENSE_EOT`.
        draws: defence draws averaged per prediction; default 1 if deterministic, else
            :data:`RANDOM_DEFENSE_DRAWS`.
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
    clip = _check_clip(clip)
    parsed = [_parse_attack(config, clip) for config in attacks]
    if not parsed:
        raise ValueError("attacks must hold at least one attack config, got an empty list")
    if max_batches is not None:
        _check_count("max_batches", max_batches)
    defense = _as_defense(defense)
    proto = _resolve_protocol(defense, adaptive, eot, draws, control)
    device = torch.device(device) if device is not None else _model_device(model)

    totals = [dict.fromkeys(_columns(defense, proto), 0) for _ in parsed]
    n = 0
    with _eval_mode(model):
        batches = _loader_length(loader, max_batches)
        bar = tqdm(loader, total=batches, desc="robustness", unit="batch", disable=not progress, leave=False)
        for b, batch in enumerate(bar):
            if max_batches is not None and b >= max_batches:
                break
            x, y = unpack_batch(batch)
            if device is not None:
                x, y = x.to(device), y.to(device)
            for attack, total in zip(parsed, totals, strict=True):
                for column, count in _batch_counts(attack, model, defense, proto, x, y, clip).items():
                    total[column] += count
            n += int(y.shape[0])
        bar.close()
    if n == 0:
        raise ValueError("the loader yielded no examples")
    return [_result(attack, total, n, clip) for attack, total in zip(parsed, totals, strict=True)]


def _columns(defense: Defense | None, proto: _Protocol) -> list[str]:
    if defense is None:
        return ["accuracy"]
    control = ["fixed_noise_accuracy"] if proto.control else []
    return ["accuracy", "transfer_accuracy", *(f"{a}_accuracy" for a in proto.adaptive), "defended_accuracy", *control]


def _result(attack: dict[str, Any], total: dict[str, int], n: int, clip: tuple[float, float] | None) -> dict[str, Any]:
    """One report row: the attack's settings and each column's accuracy (``None`` where it was not measured)."""
    kind = attack["kind"]
    adaptive_columns = [f"{a}_accuracy" for a in ADAPTIVE_ATTACKS]
    measured = {c: v / n for c, v in total.items() if kind in ("pgd", "autoattack") or c not in adaptive_columns}
    columns = ["accuracy", *(f"{c}_accuracy" for c in _COLUMNS), "defended_accuracy", "fixed_noise_accuracy"]
    return {**_row(attack, clip), **{c: measured.get(c) for c in columns}, "n": n}
