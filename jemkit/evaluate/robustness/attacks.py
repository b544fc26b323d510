"""Perturbations of a classifier's inputs ``[B, ...]``: PGD (with EOT), AutoAttack and Gaussian noise.

The attacked callable may be a plain classifier or a classifier behind a defence (see :mod:`.defense`, which builds
those): everything here only needs logits and their input gradient.
A callable that is random (a purifier with noise) is attacked with Expectation over Transformation (Athalye et al.
2018): the gradient of each step is the mean over ``eot`` calls.

PGD is jemkit's own; AutoAttack (Croce & Hein 2020) comes from ``torchattacks``, a maintained implementation
(``pip install 'jemkit[attacks]'``), run with the paper's settings on inputs mapped to the ``[0, 1]`` it assumes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jemkit.checks import check_choice, check_integer, check_nonnegative
from jemkit.classifier import sampling_context
from jemkit.energy import check_labels

__all__ = [
    "AUTOATTACK_VERSIONS",
    "NORMS",
    "autoattack",
    "check_clip",
    "check_lp_norm",
    "eval_mode",
    "gaussian_noise_corruption",
    "pgd_attack",
]

Model = Callable[[Tensor], Tensor]
"""A classifier: inputs ``[B, ...]`` -> logits ``[B, C]``."""

NORMS: tuple[str, ...] = ("linf", "l2")
"""Threat models of :func:`pgd_attack` and :func:`autoattack`."""

AUTOATTACK_VERSIONS: tuple[str, ...] = ("standard", "rand")
"""``"standard"``: APGD-CE, APGD-T, FAB-T, Square; ``"rand"``: APGD-CE and APGD-DLR with EOT, for random models."""


# ---------------------------------------------------------------------------------------------------- checks
def check_clip(clip: tuple[float, float] | None) -> tuple[float, float] | None:
    """``clip`` as ``(low, high)`` floats with ``low < high``, or ``None`` (no clamping)."""
    if clip is None:
        return None
    if len(clip) != 2 or not clip[0] < clip[1]:
        raise ValueError(f"clip must be None or (low, high) with low < high, got {clip!r}")
    return float(clip[0]), float(clip[1])


def check_lp_norm(norm: str) -> str:
    """``norm`` if it is a threat model's norm (:data:`NORMS`), else ``ValueError`` naming them."""
    return check_choice("norm", norm, NORMS)


def eval_mode(model: Model) -> contextlib.AbstractContextManager:
    """Eval mode for an ``nn.Module`` (each submodule's own flag restored afterwards); nothing for a plain callable."""
    return sampling_context(model, "eval") if isinstance(model, nn.Module) else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- noise
def gaussian_noise_corruption(
    x: Tensor,
    std: float,
    *,
    clip: tuple[float, float] | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``x + std * N(0, I)`` clamped to ``clip``: a random (not adversarial) corruption of inputs ``[B, ...]``.

    Args:
        x: inputs ``[B, ...]``.
        std: noise standard deviation in the units of ``x``, >= 0; 0 returns ``x``.
        clip: ``(low, high)`` to clamp into (the data's box: for a JEM ``jem.domain.bounds()``, or attack in its
            unit coordinates, where it is ``(-1, 1)``), or ``None``; required, so that no range is assumed.
        generator: optional ``torch.Generator`` on ``x``'s device, for reproducible noise.

    Returns:
        Corrupted inputs shaped like ``x``.
    """
    std = check_nonnegative("std", std)
    clip = check_clip(clip)
    if std == 0:
        return x.detach()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = x.detach() + std * noise
    return out if clip is None else out.clamp(*clip)


# ---------------------------------------------------------------------------------------------------- PGD
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


def _input_grad(total: Tensor, x: Tensor) -> Tensor:
    """``d total / d x`` for the input only (parameters' ``.grad`` is never written); zero where ``total`` does
    not depend on ``x`` at all (a defence that returns a detached tensor masks its gradient completely)."""
    if not total.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(total, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def _loss_and_grad(
    model: Model, x: Tensor, y: Tensor, need_grad: bool = True, eot: int = 1
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-sample cross-entropy ``[B]``, misclassified flags ``[B]`` and ``d loss / d x`` (None if not needed).

    With ``eot > 1`` the model is called ``eot`` times (a random model draws anew each time): the loss and the
    gradient are means over the calls (EOT), and a sample counts as misclassified when its mean logits are wrong.
    """
    loss_sum: Tensor | float = 0.0
    logits_sum: Tensor | float = 0.0
    grad_sum: Tensor | None = None
    for _ in range(eot):
        if need_grad:
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                logits = model(x_in)
                loss = F.cross_entropy(logits, y, reduction="none")
                grad = _input_grad(loss.sum(), x_in)
            grad_sum = grad if grad_sum is None else grad_sum + grad
        else:
            with torch.no_grad():
                logits = model(x)
                loss = F.cross_entropy(logits, y, reduction="none")
        loss_sum = loss_sum + loss.detach()
        logits_sum = logits_sum + logits.detach()
    fooled = torch.as_tensor(logits_sum).argmax(1) != y
    return torch.as_tensor(loss_sum) / eot, fooled, None if grad_sum is None else grad_sum / eot


def pgd_attack(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    *,
    clip: tuple[float, float] | None,
    random_start: bool = True,
    eot: int = 1,
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
        model: classifier, inputs ``[B, ...]`` -> logits ``[B, C]``; may be random (a defended classifier).
        x: clean inputs ``[B, ...]``, in ``clip``.
        y: true labels ``[B]`` (int64).
        eps: attack budget in the units of ``x`` (on inputs in ``[-1, 1]``, ``8/255`` on ``[0, 1]`` is
            ``eps = 16/255``). ``eps == 0`` returns ``x`` unchanged.
        norm: ``"linf"`` or ``"l2"``.
        steps: gradient steps per restart, >= 1.
        step_size: step length (L-inf: per coordinate; L2: Euclidean); default ``2.5 * eps / steps`` (Madry et al.).
        restarts: independent runs from random starts, >= 1.
        clip: ``(low, high)`` box the inputs must stay in (the data's box; required, so that no range is assumed),
            or ``None`` for no clamping.
        random_start: start each restart from a uniformly random point of the eps-ball (else from ``x``).
        eot: calls of ``model`` per step, whose gradients and logits are averaged (Expectation over
            Transformation, for a random model); 1 for a deterministic one.

    Returns:
        Adversarial inputs shaped like ``x`` (detached).
    """
    check_lp_norm(norm)
    eps = check_nonnegative("eps", eps)
    steps = check_integer("steps", steps)
    restarts = check_integer("restarts", restarts)
    eot = check_integer("eot", eot)
    clip = check_clip(clip)
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

    with eval_mode(model):
        best = x.clone()
        best_loss, best_fooled, _ = _loss_and_grad(model, x, y, need_grad=False, eot=eot)
        for _ in range(restarts):
            x_adv = clamp(x + _random_start(x, eps, norm)) if random_start else x.clone()
            for step in range(steps + 1):
                loss, fooled, grad = _loss_and_grad(model, x_adv, y, need_grad=step < steps, eot=eot)
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


# ---------------------------------------------------------------------------------------------------- AutoAttack
def _torchattacks() -> Any:
    """The optional ``torchattacks`` package, or an error that says how to install it."""
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError("AutoAttack needs the optional package torchattacks: pip install 'jemkit[attacks]'") from err
    return torchattacks


class _InputGradient(torch.autograd.Function):
    """``fn(u)`` whose backward pass reaches ``u`` and nothing else: attack code that calls ``.backward()`` (FAB
    does) can then never write the ``.grad`` of the model's parameters, whatever callable the model is."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, fn: Model) -> Tensor:
        with torch.enable_grad():
            ctx.leaf = u.detach().requires_grad_(True)
            ctx.out = fn(ctx.leaf)
        return ctx.out.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        grad = None
        if ctx.out.requires_grad:  # FAB differentiates the same logits once per class: keep the graph
            (grad,) = torch.autograd.grad(ctx.out, ctx.leaf, grad_out, retain_graph=True, allow_unused=True)
        return (torch.zeros_like(ctx.leaf) if grad is None else grad), None


class _UnitBoxModel(nn.Module):
    """``u in [0, 1]^(1 x 1 x D or C x H x W) -> logits``: what torchattacks expects, in front of a model on
    ``[low, high]`` inputs of any shape. The model is held as a plain attribute, so torchattacks' mode switching
    (``.eval()``/``.train()`` on this wrapper) never reaches it; the empty parameter tells torchattacks the device."""

    def __init__(self, model: Model, low: float, high: float, shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        self.__dict__["model"] = model  # not registered as a submodule
        self.low, self.scale, self.shape = low, high - low, shape
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def forward(self, u: Tensor) -> Tensor:
        if torch.is_grad_enabled() and u.requires_grad:
            return _InputGradient.apply(u, self._logits)
        return self._logits(u)  # a query without gradient (Square, scoring) builds no graph

    def _logits(self, u: Tensor) -> Tensor:
        return self.model((self.low + self.scale * u).reshape(u.shape[0], *self.shape))


def _as_images(x: Tensor) -> Tensor:
    """``[B, ...]`` as ``[B, C, H, W]`` (torchattacks' attacks assume 4-d inputs): flat ones as ``[B, 1, 1, D]``."""
    return x if x.dim() == 4 else x.reshape(x.shape[0], 1, 1, -1)


def _square_applies(shape: tuple[int, ...]) -> bool:
    """torchattacks' Square samples square patches of an image ``[C, H, H]`` with ``H >= 5``."""
    return len(shape) == 3 and shape[1] == shape[2] >= 5


def _autoattack_components(
    ta: Any, model: nn.Module, settings: dict[str, Any], shape: tuple[int, ...], n_classes: int
) -> list[Any]:
    """The attacks of AutoAttack with the paper's settings (torchattacks' own ``AutoAttack`` runs 10 steps)."""
    common = {"norm": {"linf": "Linf", "l2": "L2"}[settings["norm"]], "eps": settings["eps"], "seed": 0}
    steps = settings["steps"]
    if settings["version"] == "rand":
        return [
            ta.APGD(model, steps=steps, loss="ce", eot_iter=settings["eot"], n_restarts=1, **common),
            ta.APGD(model, steps=steps, loss="dlr", eot_iter=settings["eot"], n_restarts=1, **common),
        ]
    parts = [
        ta.APGD(model, steps=steps, loss="ce", n_restarts=1, **common),
        ta.APGDT(model, steps=steps, n_classes=n_classes, n_restarts=1, **common),
        ta.FAB(model, steps=steps, multi_targeted=True, n_classes=n_classes, n_restarts=1, **common),
    ]
    if _square_applies(shape):
        parts.append(ta.Square(model, n_queries=settings["queries"], n_restarts=1, **common))
    return parts


def autoattack(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    steps: int = 100,
    queries: int = 5000,
    eot: int = 20,
    *,
    clip: tuple[float, float],
) -> Tensor:
    """AutoAttack (Croce & Hein 2020) from ``torchattacks``, on inputs in ``clip`` of any shape.

    ``version="standard"``: APGD-CE, APGD-T (all other classes as targets), FAB-T and Square (``queries``; on
    square images ``[C, H, H]`` with ``H >= 5`` only, as torchattacks samples square patches), run in turn on the
    examples not yet fooled. ``version="rand"``: APGD-CE and APGD-DLR with ``eot`` gradient draws per step, for a
    random model such as a purifier with noise. ``steps`` (100 in the paper) is the iteration count of APGD and FAB.

    torchattacks assumes inputs in ``[0, 1]``: the model is attacked through ``u -> model(low + (high - low) * u)``
    with the budget ``eps / (high - low)`` (L-inf and L2 alike), and the result is mapped back. Models run in eval
    mode (each flag restored afterwards) and only input gradients reach them, so parameters' ``.grad`` is untouched
    even by FAB's ``.backward()`` calls. The attack seeds torch's RNG itself (seed 0); the caller's RNG state is
    restored afterwards.

    Args:
        model: classifier, inputs ``[B, ...]`` -> logits ``[B, C]``; ``C >= 4`` for the standard version, ``C >= 3``
            for the rand one (the DLR losses compare the top logits).
        x: clean inputs ``[B, ...]`` in ``clip``.
        y: true labels ``[B]``.
        eps: budget in data units (the units of ``clip``).
        norm: ``"linf"`` or ``"l2"``.
        version: ``"standard"`` or ``"rand"``.
        steps: APGD/FAB iterations, >= 1.
        queries: Square's query budget, >= 1 (standard version only).
        eot: gradient draws per APGD step, >= 1 (rand version only).
        clip: the data range ``(low, high)``; required (AutoAttack works in a bounded box).

    Returns:
        Adversarial inputs shaped like ``x`` (detached), in ``clip``.
    """
    check_lp_norm(norm)
    check_choice("AutoAttack version", version, AUTOATTACK_VERSIONS)
    eps = check_nonnegative("eps", eps)
    steps, queries, eot = check_integer("steps", steps), check_integer("queries", queries), check_integer("eot", eot)
    if clip is None:
        raise ValueError("AutoAttack needs the data range clip=(low, high), got None")
    low, high = check_clip(clip)
    check_labels(y, x.shape[0])
    if eps == 0:
        return x.detach()
    ta = _torchattacks()
    x, y = x.detach().clone(), y.to(device=x.device, dtype=torch.long)
    wrapped = _UnitBoxModel(model, low, high, tuple(x.shape[1:]), x.device).eval()
    with eval_mode(model), torch.random.fork_rng(devices=_cuda_devices(x)):
        with torch.no_grad():
            n_classes = int(model(x[:1]).shape[1])
        _check_classes(n_classes, version)
        u = _as_images((x - low) / (high - low)).clamp(0.0, 1.0)
        settings = {"norm": norm, "eps": eps / (high - low), "version": version, "steps": steps}
        settings |= {"queries": queries, "eot": eot}
        parts = _autoattack_components(ta, wrapped, settings, tuple(u.shape[1:]), n_classes)
        u_adv = ta.MultiAttack(parts)(u, y)
    return (low + (high - low) * u_adv.detach()).reshape(x.shape).clamp(low, high)


def _check_classes(n_classes: int, version: str) -> None:
    """The DLR loss compares the top 3 logits, its targeted form (standard version) the top 4."""
    needed = 4 if version == "standard" else 3
    if n_classes < needed:
        raise ValueError(
            f"AutoAttack version {version!r} needs >= {needed} classes (its DLR losses compare the top logits), "
            f"the model has {n_classes}"
        )


def _cuda_devices(x: Tensor) -> list[int]:
    return [x.device.index or 0] if x.device.type == "cuda" else []
