"""Named settings of published JEM methods, and jemkit's own fine-tuning recipe: ``JEM(model, preset="jempp")``.

A JEM's settings come from three layers, resolved once by :func:`resolve_settings`: what the caller gives (an
argument left at ``None`` is not given; ``weights`` merge key by key), then the preset's, then jemkit's defaults
(:func:`default_settings`). An explicit value always wins, also one equal to a default. The resolved settings are what
the JEM records in its hyper-parameters (``hparams.yaml``, checkpoints), so a run shows exactly what it trained with.
``python -m jemkit.presets`` prints them all.

``jempp`` and ``finetune`` are one weight away from the defaults (``px`` 1.0 and 0.03): they are kept as names because
they carry a purpose (JEM++'s published setting; a classifier that is already trained), not new machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from jemkit._config import is_plain, to_config
from jemkit.checks import check_choice
from jemkit.classifier import has_batchnorm
from jemkit.losses import objective_weights
from jemkit.optim import SAM
from jemkit.sampling import PYLD, SGLD, GaussianInit, ReplayBuffer, UniformInit

__all__ = [
    "PRESETS",
    "SETTINGS",
    "default_restarts",
    "default_settings",
    "preset_config",
    "preset_settings",
    "resolve_settings",
]

SETTINGS = ("sampler", "buffer", "weights", "data_noise", "lr", "lr_warmup_steps", "optimizer")
"""The JEM arguments that presets and jemkit's defaults fill in when the caller leaves them at ``None``."""


def default_settings(classifier: nn.Module | None = None) -> dict[str, Any]:
    """jemkit's defaults, chosen on ``benchmarks/quality.py`` and ``benchmarks/shift.py`` (see
    benchmarks/RESULTS.md): proximal Langevin steps of a fixed size whatever the energy's scale (``PYLD(n_steps=5,
    step_size=0.05, scale="rms")``: JEM++'s clipped steps barely moved the chains of a lightly weighted density, whose
    samples stayed where they restarted), ``log p(x)`` at weight 0.05 with a small energy regulariser, Adam 1e-3,
    and chains restarted from :func:`default_restarts` (they depend on ``classifier``)."""
    return {
        "sampler": PYLD(n_steps=5, step_size=0.05, scale="rms"),
        "buffer": ReplayBuffer(init=default_restarts(classifier)),
        "weights": objective_weights(None),
        "data_noise": 0.03,
        "lr": 1e-3,
        "lr_warmup_steps": 0,
        "optimizer": None,
    }


def default_restarts(classifier: nn.Module | None = None, uniform_fraction: float = 0.2) -> GaussianInit | UniformInit:
    """Where the default replay buffer restarts its chains: 80% from per-class Gaussians of the data (near it, so
    that the chains reach data-like samples in their short lives) and 20% from the whole input box, so that no region
    keeps an untrained energy (without them, inverted clothes were ranked likelier than clothes); from the box only
    for a classifier with BatchNorm (sampled in train mode, each batch of samples normalised by its own statistics).
    With BatchNorm the mixture let the chains settle on low-contrast inputs that one class owns, and inputs that
    lose contrast under distribution shift were then all given that class (digits with BatchNorm, mean accuracy
    under shift 75.7% with the mixture, 89.2% with box restarts: ``benchmarks/RESULTS.md``, "Under distribution
    shift"). The rule looks at the classifier only, not at ``sampling_mode``: box restarts were measured with
    train-mode sampling, the mode ``"auto"`` picks for BatchNorm. ``uniform_fraction``: the share of restarts
    from the box without BatchNorm (the ``rows`` preset: 0.5)."""
    if classifier is not None and not isinstance(classifier, nn.Module):
        raise TypeError(
            f"classifier must be an nn.Module (the built classifier, not its config), got {type(classifier).__name__}"
        )
    if classifier is not None and has_batchnorm(classifier):
        return UniformInit()
    return GaussianInit(uniform_fraction=uniform_fraction)


def _jem(classifier: nn.Module | None = None) -> dict[str, Any]:
    """Grathwohl et al. 2020: SGLD 20 x 1.0 with noise 0.01, 10,000 chains with 5% restarts from U(-1, 1), data noise
    0.03, Adam 1e-4 warmed up over 1,000 steps."""
    return {
        "sampler": SGLD(n_steps=20, step_size=1.0, noise_std=0.01),
        "buffer": ReplayBuffer(capacity=10_000, reinit_prob=0.05, init=UniformInit()),
        "weights": {"px": 1.0, "energy_l2": 0.0},  # the paper's objective: no energy regulariser
        "data_noise": 0.03,
        "lr": 1e-4,
        "lr_warmup_steps": 1000,
    }


def _jempp(classifier: nn.Module | None = None) -> dict[str, Any]:
    """Yang & Ji 2021: proximal SGLD (PYLD) with few steps, chains started from per-class Gaussians fitted to the
    data (informative initialisation), samples kept in the data range, the full log p(x) term. The paper trains a
    WideResNet with SGD at 0.1; with jemkit's Adam, 1e-3 is the rate that keeps the classifier's accuracy."""
    return {
        "sampler": PYLD(n_steps=5, step_size=0.2, eps=1.0),
        "buffer": ReplayBuffer(capacity=10_000, reinit_prob=0.05, init=GaussianInit()),
        "weights": {"px": 1.0, "energy_l2": 0.0},  # the paper's objective: no energy regulariser
        "data_noise": 0.03,
        "lr": 1e-3,
    }


def _sada(classifier: nn.Module | None = None) -> dict[str, Any]:
    """Yang, Su & Ji 2023 (SADA-JEM): sharpness-aware minimisation of the whole JEM loss, few SGLD steps."""
    return {
        "sampler": SGLD(n_steps=5, step_size=1.0, noise_std=0.01, clip=(-1.0, 1.0)),
        "buffer": ReplayBuffer(capacity=10_000, reinit_prob=0.05, init=GaussianInit()),
        "optimizer": partial(SAM, base="adam", rho=0.05, adaptive=False, lr=1e-3),
        "weights": {"px": 1.0, "energy_l2": 0.0},  # the paper's objective: no energy regulariser
        "data_noise": 0.03,
    }


def _finetune(classifier: nn.Module | None = None) -> dict[str, Any]:
    """jemkit's settings for a classifier that is already trained, chosen on ``benchmarks/quality.py --finetune``:
    chains that start from per-class Gaussians of the data, never from uniform noise, short proximal chains, and a
    small generative weight (0.03: 0.1 left the fine-tuned digits CNN under-confident)."""
    return {
        "sampler": PYLD(n_steps=5, step_size=0.2, eps=1.0),
        "buffer": ReplayBuffer(capacity=10_000, reinit_prob=0.05, init=GaussianInit()),
        "weights": {"px": 0.03, "energy_l2": 0.0},  # with the default regulariser it lost calibration (RESULTS.md)
        "data_noise": 0.03,
        "lr": 1e-3,
    }


def _rows(classifier: nn.Module | None = None) -> dict[str, Any]:
    """jemkit 0.3's defaults, kept for tabular rows and 1-D signals, where they measured better than 0.4's
    (``benchmarks/RESULTS.md``, *Current defaults*: wine's ``log p(x)`` 0.972 against noise and 0.900 against
    permuted rows, where 0.4's gives 0.918 and 0.840): JEM++'s clipped proximal steps, half of the restarts uniform
    over the input box (a classifier with BatchNorm restarts from the box only, as with the defaults), ``px`` 0.1."""
    return {
        "sampler": PYLD(n_steps=5, step_size=0.2, eps=1.0),
        "buffer": ReplayBuffer(init=default_restarts(classifier, uniform_fraction=0.5)),
        "weights": {"px": 0.1},
    }


PRESETS: dict[str, Callable[[nn.Module | None], dict[str, Any]]] = {
    "jem": _jem,
    "jempp": _jempp,
    "sada": _sada,
    "finetune": _finetune,
    "rows": _rows,
}
"""Preset name -> a function of the classifier (``None``: not known yet) returning fresh settings (new sampler and
buffer objects on every call)."""


def preset_settings(name: str, classifier: nn.Module | None = None) -> dict[str, Any]:
    """The settings of preset ``name`` for ``classifier`` (fresh objects); ``ValueError`` naming the presets on an
    unknown name."""
    check_choice("preset", name, sorted(PRESETS))
    return PRESETS[name](classifier)


def resolve_settings(preset: str | None, given: dict[str, Any], classifier: nn.Module | None = None) -> dict[str, Any]:
    """Every key of :data:`SETTINGS`: the caller's value where not ``None``, else the preset's, else jemkit's default
    for ``classifier`` (:func:`default_settings`).

    ``weights`` merge key by key (the caller's over the preset's over :data:`~jemkit.losses.DEFAULT_WEIGHTS`). A
    buffer given without restarts (``ReplayBuffer(capacity=5000)``: no ``init``) gets the preset's, else the
    default ones: choosing the buffer's size or storage does not give up the restarts the defaults were chosen with.
    """
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"not settings a preset resolves: {unknown}")
    chosen = preset_settings(preset, classifier) if preset is not None else {}
    defaults = default_settings(classifier)
    resolved = {
        key: given.get(key) if given.get(key) is not None else chosen.get(key, defaults[key]) for key in SETTINGS
    }
    resolved["weights"] = objective_weights(given.get("weights"), chosen.get("weights"))
    buffer = given.get("buffer")
    if buffer is not None and not getattr(buffer, "init_given", True):  # your buffer, our restarts
        buffer.init = chosen.get("buffer", defaults["buffer"]).init
    return resolved


def preset_config(name: str | None, classifier: nn.Module | None = None) -> dict[str, Any]:
    """The settings of preset ``name`` over jemkit's defaults for ``classifier`` (``None``: the defaults alone) as
    plain config (``class_path``/``init_args`` dicts), as YAML would give them."""
    config = {}
    settings = default_settings(classifier) | (preset_settings(name, classifier) if name is not None else {})
    for key, value in settings.items():
        if isinstance(value, partial):
            path = f"{value.func.__module__}.{value.func.__qualname__}"
            value = {"class_path": path, "init_args": dict(value.keywords)}
        elif not is_plain(value):
            value = to_config(value)
        config[key] = value
    return config


def _describe(value: Any) -> str:
    if isinstance(value, partial):
        keywords = ", ".join(f"{k}={v!r}" for k, v in value.keywords.items())
        return f"{value.func.__name__}({keywords})"
    return repr(value)


if __name__ == "__main__":
    for preset in PRESETS:
        print(f"{preset}: {PRESETS[preset].__doc__.split(chr(10))[0]}")
        for key, value in preset_settings(preset).items():
            print(f"    {key} = {_describe(value)}")
