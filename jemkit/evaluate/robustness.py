"""Adversarial and noise robustness of any classifier, optionally behind an input-purifying defence.

JEM reports that a classifier trained as an energy model is more robust, and more so when an attacked input is
first refined by a few SGLD steps on ``E(x)`` before it is classified. This module measures that for *any* model
``inputs [B, ...] -> logits [B, C]``: it implements PGD (L-inf and L2, with random starts and restarts) and
Gaussian noise, and :func:`robust_accuracy` reports the accuracy under each attack with and without a defence. The
defence is just a callable ``x -> x'`` (for a JEM: K SGLD steps), so nothing here knows about energies.

Units: jemkit inputs live in ``[-1, 1]``, so every ``eps`` and ``std`` is in those units, twice the usual ``[0, 1]``
ones: the common L-inf budget ``8/255`` on ``[0, 1]`` images is ``eps = 16/255`` here, and an L2 budget ``0.5``
on ``[0, 1]`` is ``eps = 1.0``.

Threat model: attacks are computed against the *undefended* model and the defence is then applied to the
adversarial inputs. This is the non-adaptive (grey-box) setting; an attacker who differentiates through the
defence (e.g. with BPDA/EOT) can do better, so defended accuracies are upper bounds on true robustness.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from jemkit.adapters import sampling_context, unpack_batch
from jemkit.energy import check_labels

__all__ = ["ATTACK_KINDS", "NORMS", "gaussian_noise_corruption", "pgd_attack", "robust_accuracy"]

Model = Callable[[Tensor], Tensor]
"""A classifier: inputs ``[B, ...]`` -> logits ``[B, C]``."""

NORMS: tuple[str, ...] = ("linf", "l2")
"""Threat models of :func:`pgd_attack`."""

ATTACK_KINDS: tuple[str, ...] = ("clean", "noise", "pgd")
"""Values of the ``"kind"`` key of an attack config of :func:`robust_accuracy`."""

_REQUIRED = object()

_ATTACK_KEYS: dict[str, dict[str, Any]] = {
    # the keys each kind accepts besides "kind", with their defaults
    "clean": {},
    "noise": {"std": _REQUIRED},
    "pgd": {"eps": _REQUIRED, "norm": "linf", "steps": 10, "step_size": None, "restarts": 1, "random_start": True},
}


def _eval_mode(model: Model) -> contextlib.AbstractContextManager:
    """Eval mode for an ``nn.Module`` (each submodule's own flag restored afterwards); nothing for a plain callable."""
    return sampling_context(model, "eval") if isinstance(model, nn.Module) else contextlib.nullcontext()


def _check_nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_clip(clip: tuple[float, float] | None) -> tuple[float, float] | None:
    if clip is None:
        return None
    if len(clip) != 2 or not clip[0] < clip[1]:
        raise ValueError(f"clip must be None or (low, high) with low < high, got {clip!r}")
    return float(clip[0]), float(clip[1])


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm over all non-batch dims, shaped ``[B, 1, ..., 1]`` to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def _random_start(x: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return (torch.rand_like(x) * 2.0 - 1.0) * eps
    # a uniformly random direction with a radius uniform in [0, eps]
    direction = torch.randn_like(x)
    direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
    radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return direction * radius * eps


def _loss_and_grad(model: Model, x: Tensor, y: Tensor, need_grad: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-sample cross-entropy ``[B]``, misclassified flags ``[B]`` and ``d loss / d x`` (None if not needed)."""
    if not need_grad:
        with torch.no_grad():
            logits = model(x)
            return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y, None
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="none")
        # gradients w.r.t. the input only: parameters' .grad is never written
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), logits.detach().argmax(1) != y, grad


def pgd_attack(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    clip: tuple[float, float] | None = (-1.0, 1.0),
    random_start: bool = True,
) -> Tensor:
    """Untargeted projected gradient descent (Madry et al. 2018) maximising the cross-entropy of the true labels.

    L-inf steps follow the gradient's sign and project onto the box ``|x_adv - x| <= eps``; L2 steps follow the
    per-sample normalised gradient and project onto the ball ``||x_adv - x||_2 <= eps`` (norm over all non-batch
    dims). Every iterate is clamped to ``clip``. Per sample, the returned example is the best iterate seen over all
    steps and restarts (the clean input counts too): one that fools the model if any does, else the one with the
    highest loss. So adding restarts never weakens the attack for the same random seed.

    ``nn.Module`` models are run in eval mode during the attack and every submodule's train/eval flag is restored
    afterwards; only input gradients are taken (``torch.autograd.grad``), so parameters' ``.grad`` is untouched.
    Random starts use the global RNG (seed with ``torch.manual_seed``).

    Args:
        model: classifier, inputs ``[B, ...]`` -> logits ``[B, C]``.
        x: clean inputs ``[B, ...]``, in ``clip``.
        y: true labels ``[B]`` (int64).
        eps: attack budget in data units; jemkit data span ``[-1, 1]``, so ``8/255`` on ``[0, 1]`` images is
            ``eps = 16/255`` here. ``eps == 0`` returns ``x`` unchanged.
        norm: ``"linf"`` or ``"l2"``.
        steps: gradient steps per restart, >= 1.
        step_size: step length (L-inf: per coordinate; L2: Euclidean); default ``2.5 * eps / steps`` (Madry et al.).
        restarts: independent runs from random starts, >= 1.
        clip: ``(low, high)`` box the inputs must stay in, or ``None`` for no clamping.
        random_start: start each restart from a uniformly random point of the eps-ball (else from ``x``).

    Returns:
        Adversarial inputs shaped like ``x`` (detached).
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    eps = _check_nonnegative("eps", eps)
    steps = _check_count("steps", steps)
    restarts = _check_count("restarts", restarts)
    clip = _check_clip(clip)
    if step_size is not None and not (isinstance(step_size, (int, float)) and 0 < step_size < math.inf):
        raise ValueError(f"step_size must be None or a finite number > 0, got {step_size!r}")
    check_labels(y, x.shape[0])
    if eps == 0:
        return x.detach()
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    x = x.detach().clone()  # also turns an inference-mode tensor into a normal one
    y = y.to(device=x.device, dtype=torch.long)

    def clamp(t: Tensor) -> Tensor:
        return t if clip is None else t.clamp(*clip)

    with _eval_mode(model):
        best = x.clone()
        best_loss, best_fooled, _ = _loss_and_grad(model, x, y, need_grad=False)
        for _ in range(restarts):
            x_adv = clamp(x + _random_start(x, eps, norm)) if random_start else x.clone()
            for step in range(steps + 1):
                loss, fooled, grad = _loss_and_grad(model, x_adv, y, need_grad=step < steps)
                better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
                mask = better.view(-1, *([1] * (x.dim() - 1)))
                best = torch.where(mask, x_adv, best)
                best_loss = torch.where(better, loss, best_loss)
                best_fooled = best_fooled | fooled
                if grad is None:
                    break  # the last iterate: scored above, no further step
                direction = grad.sign() if norm == "linf" else grad / _per_sample_norm(grad).clamp_min(1e-12)
                x_adv = clamp(x + _project(x_adv + alpha * direction.to(x.dtype) - x, eps, norm))
    return best


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


def _parse_attack(config: dict[str, Any]) -> dict[str, Any]:
    """Validate one attack config and fill in its defaults."""
    if not isinstance(config, dict):
        raise TypeError(f"each attack must be a dict such as {{'kind': 'pgd', 'eps': 0.03}}, got {config!r}")
    kind = config.get("kind")
    if kind not in _ATTACK_KEYS:
        raise ValueError(f"unknown attack kind {kind!r} in {config!r}; expected one of {', '.join(ATTACK_KINDS)}")
    allowed = _ATTACK_KEYS[kind]
    unknown = sorted(set(config) - set(allowed) - {"kind"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for a {kind!r} attack; allowed: {sorted(allowed)}")
    parsed = {"kind": kind, **allowed, **config}
    missing = [key for key, value in parsed.items() if value is _REQUIRED]
    if missing:
        raise ValueError(f"a {kind!r} attack needs {missing}, got {config!r}")
    if kind == "noise":
        _check_nonnegative("std", parsed["std"])
    elif kind == "pgd":
        if parsed["norm"] not in NORMS:
            raise ValueError(f"unknown norm {parsed['norm']!r}; expected one of {', '.join(NORMS)}")
        _check_nonnegative("eps", parsed["eps"])
        _check_count("steps", parsed["steps"])
        _check_count("restarts", parsed["restarts"])
    return parsed


def _row(attack: dict[str, Any]) -> dict[str, Any]:
    kind = attack["kind"]
    return {
        "attack": f"pgd-{attack['norm']}" if kind == "pgd" else kind,
        "eps": attack.get("eps"),
        "steps": attack.get("steps"),
        "restarts": attack.get("restarts"),
        "std": attack.get("std"),
    }


def _model_device(model: Model) -> torch.device | None:
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


def robust_accuracy(
    model: Model,
    loader: Iterable,
    attacks: list[dict[str, Any]],
    defense: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    clip: tuple[float, float] | None = (-1.0, 1.0),
) -> list[dict[str, Any]]:
    """Accuracy of ``model`` under each attack, and with ``defense`` applied to the attacked inputs if given.

    One pass over ``loader``: every batch is attacked by every config. Attack configs are dicts with a ``"kind"``:

    - ``{"kind": "clean"}``: the unmodified inputs.
    - ``{"kind": "noise", "std": 0.1}``: :func:`gaussian_noise_corruption`.
    - ``{"kind": "pgd", "eps": 0.03, "norm": "linf", "steps": 10, "restarts": 1}``: :func:`pgd_attack`; optional
      ``step_size`` and ``random_start`` are passed through. ``norm``, ``steps`` and ``restarts`` default to
      ``"linf"``, 10 and 1.

    ``eps`` and ``std`` are in data units (``[-1, 1]``, so ``8/255`` on ``[0, 1]`` images is ``16/255`` here).

    The attack is computed against the undefended ``model``; ``defense`` (e.g. K SGLD refinement steps of a JEM)
    then maps the attacked inputs ``[B, ...] -> [B, ...]`` before they are classified. This is the non-adaptive
    setting: the attacker does not see the defence.

    Args:
        model: classifier, inputs ``[B, ...]`` -> logits ``[B, C]``; run in eval mode, flags restored afterwards.
        loader: iterable of ``(x, y)`` batches.
        attacks: the attack configs, one result row each, in order.
        defense: optional input purifier ``[B, ...] -> [B, ...]``.
        device: where to run; default: the device of the model's parameters (else where the batches are).
        progress: show a tqdm progress bar over batches.
        max_batches: evaluate only the first ``max_batches`` batches (``None``: all).
        clip: data range that attacks and noise keep the inputs in.

    Returns:
        One dict per attack: ``{"attack": "clean" | "noise" | "pgd-linf" | "pgd-l2", "eps", "steps", "restarts",
        "std", "accuracy", "defended_accuracy", "n"}``; keys that do not apply to an attack, and
        ``defended_accuracy`` without a defence, are ``None``; ``n`` is the number of examples evaluated.

    Example::

        sgld = SGLD(n_steps=10, step_size=1.0, noise_std=0.01)
        energy = lambda x: marginal_energy(model(x))
        rows = robust_accuracy(
            model,
            dm.test_dataloader(),
            [{"kind": "clean"}, {"kind": "pgd", "norm": "linf", "eps": 16 / 255, "steps": 20}],
            defense=lambda x: sgld.sample(energy, x),
        )
    """
    parsed = [_parse_attack(config) for config in attacks]
    if not parsed:
        raise ValueError("attacks must hold at least one attack config, got an empty list")
    if max_batches is not None:
        _check_count("max_batches", max_batches)
    clip = _check_clip(clip)
    device = torch.device(device) if device is not None else _model_device(model)

    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)

    correct = [0] * len(parsed)
    defended = [0] * len(parsed)
    n = 0
    with _eval_mode(model):
        bar = tqdm(loader, total=total, desc="robustness", unit="batch", disable=not progress, leave=False)
        for b, batch in enumerate(bar):
            if max_batches is not None and b >= max_batches:
                break
            x, y = unpack_batch(batch)
            if device is not None:
                x, y = x.to(device), y.to(device)
            for i, attack in enumerate(parsed):
                if attack["kind"] == "pgd":
                    x_att = pgd_attack(
                        model,
                        x,
                        y,
                        attack["eps"],
                        norm=attack["norm"],
                        steps=attack["steps"],
                        step_size=attack["step_size"],
                        restarts=attack["restarts"],
                        clip=clip,
                        random_start=attack["random_start"],
                    )
                elif attack["kind"] == "noise":
                    x_att = gaussian_noise_corruption(x, attack["std"], clip=clip)
                else:
                    x_att = x
                with torch.no_grad():
                    correct[i] += int((model(x_att).argmax(1) == y).sum())
                if defense is not None:
                    x_def = defense(x_att).detach()
                    with torch.no_grad():
                        defended[i] += int((model(x_def).argmax(1) == y).sum())
            n += int(y.shape[0])
        bar.close()
    if n == 0:
        raise ValueError("the loader yielded no examples")
    return [
        {
            **_row(attack),
            "accuracy": correct[i] / n,
            "defended_accuracy": defended[i] / n if defense is not None else None,
            "n": n,
        }
        for i, attack in enumerate(parsed)
    ]
