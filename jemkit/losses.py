"""Losses on energies: the discriminative EBM losses of LeCun et al. (2006) and JEM's generative terms.

Any classifier is an energy-based model once its logits are read as energies
(``jemkit.energy.energy_matrix``: ``E(x, y) = -f(x)[y] / T``). "A Tutorial on Energy-Based Learning"
(LeCun, Chopra, Hadsell, Ranzato & Huang 2006, Table 1) lists the losses that train such a model to give
the correct answer a lower energy than the others. They are written here once, as pure functions of an
energy matrix ``energies [B, C]`` (lower = better) and integer labels ``y [B]``, each returning the batch
mean, so that a training loop can swap the classification term of JEM for any of them by name
(``get_ebm_loss``). With ``beta = 1`` the NLL/MMI loss is exactly cross-entropy on the logits, which is the
term JEM uses for ``log p(y | x)``.

The generative half of JEM does not need labels: ``contrastive_divergence_loss`` is the maximum-likelihood
surrogate for ``log p(x)`` given energies of data and of model samples (e.g. from SGLD), and
``energy_l2_regularization`` is the energy-magnitude penalty of Du & Mordatch (2019) that keeps it stable.

Notation: ``ȳ`` is the *most offending incorrect answer*, the incorrect class with the lowest energy.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from jemkit.checks import check_nonnegative
from jemkit.energy import check_labels, energy_matrix, joint_energy, marginal_energy

__all__ = [
    "DEFAULT_WEIGHTS",
    "EBM_LOSSES",
    "DrawnInputs",
    "JEMLogits",
    "PAPER_MARGINS",
    "classification_loss",
    "contrastive_divergence_loss",
    "energy_l2_regularization",
    "energy_loss",
    "energy_margin_loss",
    "get_ebm_loss",
    "hinge_loss",
    "jem_objective",
    "log_loss",
    "lvq2_loss",
    "margins_from_energies",
    "mce_loss",
    "nll_loss",
    "objective_weights",
    "perceptron_loss",
    "square_exponential_loss",
    "square_square_loss",
]


# ----------------------------------------------------------------------------------------------------------
# helpers


def _check_energies_and_labels(energies: Tensor, y: Tensor, min_classes: int = 1) -> None:
    """Check ``energies [B, C]`` and ``B`` integer labels ``y`` in ``[0, C)`` (:func:`jemkit.energy.check_labels`)."""
    if energies.dim() != 2:
        raise ValueError(f"expected energies of shape [B, C], got shape {tuple(energies.shape)}")
    batch, num_classes = energies.shape
    if num_classes < min_classes:
        why = " to compare the correct answer with an incorrect one" if min_classes >= 2 else ""
        raise ValueError(f"this loss needs at least {min_classes} classes{why}, got energies with C={num_classes}")
    check_labels(y, batch, num_classes)


def _correct_energy(energies: Tensor, y: Tensor) -> Tensor:
    """``E(x, y)`` for the correct labels: ``[B, C], [B] -> [B]``."""
    return energies.gather(1, y.long().unsqueeze(1)).squeeze(1)


def _most_offending_energy(energies: Tensor, y: Tensor) -> Tensor:
    """``E(x, ȳ)``, ``ȳ = argmin_{c != y} E(x, c)`` the most offending incorrect answer: ``[B, C] -> [B]``.

    The correct class is masked with ``+inf`` before the min, so the gradient flows only to ``E(x, ȳ)``.
    """
    correct = F.one_hot(y.long(), num_classes=energies.shape[1]).bool()
    return energies.masked_fill(correct, float("inf")).amin(dim=1)


def _energy_gap(energies: Tensor, y: Tensor) -> Tensor:
    """``E(x, y) - E(x, ȳ)`` (negative when the correct answer wins): ``[B, C], [B] -> [B]``."""
    _check_energies_and_labels(energies, y, min_classes=2)
    return _correct_energy(energies, y) - _most_offending_energy(energies, y)


def _check_sample_energies(e_data: Tensor, e_sample: Tensor) -> None:
    for name, e in (("e_data", e_data), ("e_sample", e_sample)):
        if e.dim() != 1:
            raise ValueError(f"expected {name} of shape [N], got shape {tuple(e.shape)}")
        if e.numel() == 0:
            raise ValueError(f"{name} is empty; need at least one energy to average")


# ----------------------------------------------------------------------------------------------------------
# discriminative losses (LeCun et al. 2006, Table 1)


def energy_loss(energies: Tensor, y: Tensor) -> Tensor:
    """Energy loss ``mean E(x, y)``: only pushes the correct energy down (can collapse without an architecture
    that pulls the others up). ``energies [B, C]``, ``y [B]`` -> scalar."""
    _check_energies_and_labels(energies, y)
    return _correct_energy(energies, y).mean()


def perceptron_loss(energies: Tensor, y: Tensor) -> Tensor:
    """Generalised perceptron loss ``mean(E(x, y) - min_c E(x, c))`` (``>= 0``, no margin).
    ``energies [B, C]``, ``y [B]`` -> scalar."""
    _check_energies_and_labels(energies, y)
    return (_correct_energy(energies, y) - energies.amin(dim=1)).mean()


def hinge_loss(energies: Tensor, y: Tensor, margin: float = 1.0) -> Tensor:
    """Hinge loss ``mean max(0, m + E(x, y) - E(x, ȳ))``: zero once the correct answer wins by ``margin``.
    ``energies [B, C]`` (``C >= 2``), ``y [B]`` -> scalar."""
    return F.relu(margin + _energy_gap(energies, y)).mean()


def log_loss(energies: Tensor, y: Tensor) -> Tensor:
    """Log loss ``mean log(1 + exp(E(x, y) - E(x, ȳ)))``, a soft hinge with an infinite margin.
    ``energies [B, C]`` (``C >= 2``), ``y [B]`` -> scalar."""
    return F.softplus(_energy_gap(energies, y)).mean()


def lvq2_loss(energies: Tensor, y: Tensor, saturation: float = 1.0) -> Tensor:
    """LVQ2 loss ``mean min(M, max(0, E(x, y) - E(x, ȳ)))`` with ``M = saturation`` (Table 1's form; no
    margin, and the loss saturates for badly wrong samples).
    ``energies [B, C]`` (``C >= 2``), ``y [B]`` -> scalar."""
    if not saturation > 0:
        raise ValueError(f"saturation must be > 0, got {saturation!r}")
    return _energy_gap(energies, y).clamp(min=0.0, max=saturation).mean()


def mce_loss(energies: Tensor, y: Tensor) -> Tensor:
    """Minimum classification error loss ``mean sigmoid(E(x, y) - E(x, ȳ))``, a smooth 0/1 error.
    ``energies [B, C]`` (``C >= 2``), ``y [B]`` -> scalar."""
    return torch.sigmoid(_energy_gap(energies, y)).mean()


def square_square_loss(energies: Tensor, y: Tensor, margin: float = 1.0) -> Tensor:
    """Square-square loss ``mean(E(x, y)^2 + max(0, m - E(x, ȳ))^2)``: drives the correct energy to 0 and the
    most offending one above ``m`` (assumes non-negative energies to be meaningful).
    ``energies [B, C]`` (``C >= 2``), ``y [B]`` -> scalar."""
    _check_energies_and_labels(energies, y, min_classes=2)
    e_correct = _correct_energy(energies, y)
    e_offending = _most_offending_energy(energies, y)
    return (e_correct.square() + F.relu(margin - e_offending).square()).mean()


def square_exponential_loss(energies: Tensor, y: Tensor, gamma: float = 1.0) -> Tensor:
    """Square-exponential loss ``mean(E(x, y)^2 + gamma * exp(-E(x, ȳ)))``.
    ``energies [B, C]`` (``C >= 2``), ``y [B]`` -> scalar."""
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    _check_energies_and_labels(energies, y, min_classes=2)
    e_correct = _correct_energy(energies, y)
    e_offending = _most_offending_energy(energies, y)
    return (e_correct.square() + gamma * torch.exp(-e_offending)).mean()


def nll_loss(energies: Tensor, y: Tensor, beta: float = 1.0) -> Tensor:
    """Negative log-likelihood / MMI loss ``mean(E(x, y) + (1 / beta) * logsumexp_c(-beta * E(x, c)))``.

    This is ``-log p(y | x) / beta`` under the Gibbs distribution at inverse temperature ``beta``; with
    ``beta = 1`` and ``energies = -logits`` it equals ``F.cross_entropy(logits, y)``.
    ``energies [B, C]``, ``y [B]`` -> scalar.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    _check_energies_and_labels(energies, y)
    free_energy = torch.logsumexp(-beta * energies, dim=1) / beta
    return (_correct_energy(energies, y) + free_energy).mean()


EBM_LOSSES: dict[str, Callable[..., Tensor]] = {
    "energy": energy_loss,
    "perceptron": perceptron_loss,
    "hinge": hinge_loss,
    "log": log_loss,
    "lvq2": lvq2_loss,
    "mce": mce_loss,
    "square_square": square_square_loss,
    "square_exponential": square_exponential_loss,
    "nll": nll_loss,
    "mmi": nll_loss,
}
"""Name -> loss function; ``"mmi"`` is an alias of ``"nll"``."""


def get_ebm_loss(name: str, **kwargs: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Look up a loss by name and bind its hyperparameters, e.g.
    ``get_ebm_loss("hinge", margin=0.5)(energies, y)``.

    Names are case-insensitive and ``-`` may stand for ``_``. Raises ``ValueError`` on an unknown name or on
    a keyword the loss does not take.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in EBM_LOSSES:
        raise ValueError(f"unknown EBM loss {name!r}; valid names: {', '.join(sorted(EBM_LOSSES))}")
    fn = EBM_LOSSES[key]
    params = list(inspect.signature(fn).parameters)[2:]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = ", ".join(params) if params else "none"
        raise ValueError(f"loss {key!r} got unexpected argument(s) {', '.join(unknown)}; it accepts: {accepted}")
    return functools.partial(fn, **kwargs) if kwargs else fn


# ----------------------------------------------------------------------------------------------------------
# generative terms (JEM's log p(x))


def contrastive_divergence_loss(e_data: Tensor, e_sample: Tensor) -> Tensor:
    """Maximum-likelihood surrogate for ``log p(x)``: ``mean E(x_data) - mean E(x_sample)``.

    Its gradient is the (sampled) gradient of ``-log p(x_data)``: it lowers data energies and raises the
    energies of the model's own samples. Pass ``e_sample`` computed on detached samples.
    ``e_data [N]``, ``e_sample [M]`` -> scalar.
    """
    _check_sample_energies(e_data, e_sample)
    return e_data.mean() - e_sample.mean()


def energy_l2_regularization(e_data: Tensor, e_sample: Tensor) -> Tensor:
    """Energy magnitude penalty ``mean E(x_data)^2 + mean E(x_sample)^2`` (Du & Mordatch 2019).

    Keeps the energies near zero so contrastive divergence cannot diverge by shifting them without bound.
    ``e_data [N]``, ``e_sample [M]`` -> scalar.
    """
    _check_sample_energies(e_data, e_sample)
    return e_data.square().mean() + e_sample.square().mean()


PAPER_MARGINS: tuple[float, float] = (-23.0, -5.0)
"""``(margin_in, margin_out)`` of Liu et al. (2020) for CIFAR-10 and a WRN-40-2 (CIFAR-100: ``margin_in=-27``). They fit
only that scale of energies: a JEM derives its margins from its classifier's own energies
(:func:`margins_from_energies`)."""


def energy_margin_loss(
    e_in: Tensor, e_out: Tensor, margin_in: float = PAPER_MARGINS[0], margin_out: float = PAPER_MARGINS[1]
) -> Tensor:
    """Energy-based outlier exposure (Liu et al. 2020): ``mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2``.

    Squared hinges push in-distribution energies below ``margin_in`` and outliers' above ``margin_out``, and leave
    alone what is already on its side, so that the classifier's logits are not rescaled without bound. The defaults
    are the paper's (:data:`PAPER_MARGINS`). ``e_in [N]``, ``e_out [M]``.
    """
    _check_sample_energies(e_in, e_out)
    if margin_in >= margin_out:
        raise ValueError(f"margin_in must lie below margin_out, got margin_in={margin_in}, margin_out={margin_out}")
    return F.relu(e_in - margin_in).square().mean() + F.relu(margin_out - e_out).square().mean()


# ----------------------------------------------------------------------------------------------------------
# the classification term of a JEM


def classification_loss(spec: str | dict[str, Any] = "ce") -> Callable[[Tensor, Tensor], Tensor]:
    """The JEM's classification term as a function ``(energies [B, C], y [B]) -> scalar``.

    ``spec`` is ``"ce"`` (cross-entropy, JEM's ``-log p(y|x)``; the same as ``"nll"`` at ``beta = 1``), a name of
    :data:`EBM_LOSSES`, or a dict with ``name`` and the loss's parameters, e.g. ``{"name": "hinge", "margin": 0.5}``.
    """
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"a classification_loss dict needs a 'name' key, got {spec!r}")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        name, kwargs = spec, {}
    if not isinstance(name, str):
        raise ValueError(f"classification_loss must be a loss name or a dict with 'name', got {spec!r}")
    if name.strip().lower() in ("ce", "cross_entropy", "cross-entropy"):
        if kwargs:
            raise ValueError(f"cross-entropy takes no parameters, got {sorted(kwargs)}")
        return _cross_entropy_of_energies
    return get_ebm_loss(name, **kwargs)


def _cross_entropy_of_energies(energies: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy on logits ``-energies``, without the per-call label range check (a host sync)."""
    return F.cross_entropy(-energies, y)


# ----------------------------------------------------------------------------------------------------------
# the whole JEM objective


@dataclass
class DrawnInputs:
    """What one training step feeds the classifier besides its batch: kept so that an optimiser that evaluates the
    step twice (SAM) sees the same noisy data and samples again. Their logits are a :class:`JEMLogits`."""

    key: tuple[int, int]  # (global step, batch index)
    data: Tensor  # the data with its training noise
    sample: Tensor | None = None  # unconditional samples
    conditional_sample: Tensor | None = None  # class-conditional samples (inputs) ...
    conditional_labels: Tensor | None = None  # ... and the labels they were drawn for
    outlier: Tensor | None = None  # outliers of the energy-margin term (None: the samples serve, if any)

    def extra_batches(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The batches besides the data, in the order their logits are computed."""
        return self.sample, self.conditional_sample, self.outlier


class JEMLogits(NamedTuple):
    """Float32 logits ``[N, C]`` of one JEM training step; a term whose inputs are absent is ``None``.

    ``data`` is the classification forward of the (noisy) data; ``contrast`` is the data's half of the generative
    contrasts, computed by the same function of its input as the samples' half (the same tensor as ``data`` when the
    classifier has no BatchNorm/Dropout); ``sample``/``sample_y`` are the unconditional/class-conditional samples;
    ``outlier`` the outliers of the energy-margin term.
    """

    data: Tensor
    contrast: Tensor
    sample: Tensor | None = None
    sample_y: Tensor | None = None
    outlier: Tensor | None = None


DEFAULT_WEIGHTS: dict[str, float] = {"ce": 1.0, "px": 0.05, "pxy": 0.0, "energy_l2": 0.01, "margin": 0.0}
"""The objective's weights when neither the user nor a preset gives one, chosen on the quality benchmark: ``px``
0.05 (with steps of a fixed size, the samples reach the data; 0.1 cost Fashion-MNIST another point of accuracy);
``energy_l2`` 0.01 keeps the energies from running away on 1-D signals and tabular data."""


def margins_from_energies(energies: Tensor) -> tuple[float, float]:
    """Margins of :func:`energy_margin_loss` from a classifier's own energies on training data ``[N]``:
    ``(q10, q90 + max(q90 - q10, 1))``. The data's energies are pulled below their 10% quantile and outliers' pushed
    above the data's spread, on the scale this classifier already has (the paper's ``(-23, -5)`` fit only CIFAR
    WideResNets; on other data they wreck the classifier)."""
    q10, q90 = torch.quantile(energies.float(), torch.tensor([0.1, 0.9], device=energies.device)).tolist()
    return q10, q90 + max(q90 - q10, 1.0)


def objective_weights(weights: Mapping[str, float] | None, base: Mapping[str, float] | None = None) -> dict[str, float]:
    """``weights`` over ``base`` over :data:`DEFAULT_WEIGHTS`, checked: known names, finite values ``>= 0``."""
    merged = dict(DEFAULT_WEIGHTS) | dict(base or {}) | dict(weights or {})
    unknown = sorted(set(merged) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown objective weight(s) {unknown}; the weights are {sorted(DEFAULT_WEIGHTS)}")
    return {name: check_nonnegative(f"weight {name!r}", value) for name, value in merged.items()}


def jem_objective(
    logits: JEMLogits,
    y: Tensor,
    y_sample: Tensor | None = None,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    temperature: float = 1.0,
    margins: tuple[float, float] | None = PAPER_MARGINS,
    classification: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The JEM loss and its terms: ``(loss, stats)``, every statistic a detached-able scalar tensor (no host sync).

    ``loss = ce * CE + px * (E(data) - E(sample)) + energy_l2 * (E(data)^2 + E(sample)^2) + margin * margin_term
    + pxy * (E(data, y) - E(sample_y, y_sample))``, each term present when its logits are and its weight is > 0
    (``energy_l2`` regularises the ``px`` contrast and comes with it).
    ``y [B]`` are the data's labels, ``y_sample`` the labels the class-conditional samples were drawn for;
    ``margins`` are the energy-margin term's ``(margin_in, margin_out)``, needed when ``logits.outlier`` is given;
    ``classification(energies [B, C], y)`` replaces cross-entropy (see :func:`classification_loss`).
    """
    classify = classification or _cross_entropy_of_energies
    e_data = marginal_energy(logits.contrast, temperature)
    stats = {"ce": classify(energy_matrix(logits.data, temperature), y), "energy_data": e_data.mean()}
    if logits.sample is not None:
        e_sample = marginal_energy(logits.sample, temperature)
        stats["px"] = contrastive_divergence_loss(e_data, e_sample)
        stats |= {"energy_sample": e_sample.mean(), "energy_gap": -stats["px"]}
        if weights["px"] > 0:  # the regulariser of the log p(x) contrast (not of a margin term using the samples)
            stats["energy_l2"] = energy_l2_regularization(e_data, e_sample)
    if logits.outlier is not None:
        if margins is None:
            raise ValueError("the energy-margin term needs margins=(margin_in, margin_out), got None")
        e_outlier = marginal_energy(logits.outlier, temperature)
        stats["margin"] = energy_margin_loss(e_data, e_outlier, *margins)
        stats["energy_outlier"] = e_outlier.mean()
    if logits.sample_y is not None:
        if y_sample is None:
            raise ValueError("class-conditional sample logits need the labels they were drawn for (y_sample)")
        e_joint = joint_energy(logits.contrast, y, temperature), joint_energy(logits.sample_y, y_sample, temperature)
        stats["pxy"] = contrastive_divergence_loss(*e_joint)
    loss = weights["ce"] * stats["ce"]
    for term in ("px", "energy_l2", "margin", "pxy"):
        if term in stats and weights[term] > 0:
            loss = loss + weights[term] * stats[term]
    stats["loss"] = loss
    return loss, stats
