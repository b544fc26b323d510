"""Per-sample out-of-distribution scores read off a classifier seen as a JEM.

Convention: every score is **higher for inputs that look in-distribution** (the in-distribution set is the positive
class of AUROC/FPR95). The scores of the JEM paper (Grathwohl et al. 2020, Table 3):

- ``logpx``: unnormalised ``log p(x) = -E(x)`` (the JEM score),
- ``msp``: maximum softmax probability ``max_y p(y|x)`` (Hendrycks & Gimpel 2017),
- ``max_logit``: ``max_y f(x)[y]``,
- ``grad_norm``: ``-|| d log p(x) / dx ||_2`` (JEM's "approximate mass": data sits where the density is flat).

Beside them, the post-hoc detectors a user gets without training (:mod:`jemkit.ood.detectors`: Mahalanobis,
relative Mahalanobis, KNN, ViM, from pytorch-ood) score the classifier's features, captured by a hook during the same
forward (:class:`PostHocScores`), so one scoring loop (:func:`score_batches`) serves every caller; the pipeline of
:mod:`jemkit.ood.pipeline` runs it for the evaluation report and ``OODMonitor``.

:data:`RECOMMENDED_SCORE` is the one score jemkit recommends for a JEM: the report names it, never picked per test set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from jemkit.checks import check_names
from jemkit.energy import log_px, log_py_given_x
from jemkit.ood.complexity import input_complexity
from jemkit.ood.detectors import POSTHOC_DETECTORS, PostHocDetectors
from jemkit.ood.features import FeatureHook, extract_features, last_linear

__all__ = [
    "FUSED_PARTS",
    "FUSED_RULES",
    "INPUT_PARTS",
    "RECOMMENDED_SCORE",
    "SCORES",
    "FusedReference",
    "FusedScore",
    "PostHocScores",
    "compare_scores",
    "ood_scores",
    "reversed_scores",
    "score_batches",
]

SCORES: tuple[str, ...] = ("logpx", "msp", "max_logit", "grad_norm")

RECOMMENDED_SCORE = "fused"
"""The OOD score jemkit recommends for a JEM, one rule for every data set: :class:`FusedScore` (``logpx`` +
Mahalanobis + KNN on the JEM's features, standardised on validation data). Chosen on ``benchmarks/quality.py`` (10
scenarios, 3 seeds): it meets the post-hoc-toolbox target on 20 of 23 scenario x OOD-set pairs where ``logpx`` alone
meets 13 (``benchmarks/RESULTS.md``). Where it cannot be computed (no detectors, no validation data), ``logpx``."""

FUSED_PARTS: tuple[str, ...] = ("logpx", "mahalanobis", "knn")
"""The scores :class:`FusedScore` sums by default: the JEM's density and two detectors on its own features."""

INPUT_PARTS: tuple[str, ...] = ("complexity",)
"""Statistics of the input alone that a fused rule may read beside the scores: ``complexity``, the bits per value a
lossless compressor needs (:func:`jemkit.ood.complexity.input_complexity`). They are parts, never reported alone."""

FUSED_RULES: dict[str, tuple[str, ...]] = {"fused": FUSED_PARTS, "logpx_ic": ("logpx", "complexity")}
"""The fused scores the OOD pipeline reports, by name: ``fused`` (:data:`RECOMMENDED_SCORE`) and ``logpx_ic``, the
JEM's density corrected for the input's complexity (Serrà et al. 2020): simple inputs, which densities rank too
likely (MNIST beside Fashion-MNIST), are caught; more complex ones than the data (blends, noise) are ranked higher
than by ``logpx`` alone. Each part is standardised on in-distribution reference inputs."""


@dataclass
class FusedScore:
    """A sum of standardised scores, ``sum_s (s(x) - mean_s) / sd_s``, the statistics taken on in-distribution
    reference inputs (the validation split: never a test or OOD set).

    Each part sees something the others miss: ``logpx`` the density the JEM was trained for, Mahalanobis the
    class-conditional spread of its features, KNN their local density. Standardising puts them on one scale without
    any OOD data, so the rule is the same for every data set.

    Attributes:
        parts: the scores summed (names of :func:`score_batches`' outputs).
        stats: ``{part: (mean, sd)}`` on the reference inputs (a constant part gets sd 1).
        name: the score's name in reports.
    """

    parts: tuple[str, ...]
    stats: dict[str, tuple[float, float]]
    name: str = "fused"

    @classmethod
    def fit(cls, reference: dict[str, Tensor], parts: Sequence[str] = FUSED_PARTS, name: str = "fused") -> FusedScore:
        """Standardisation statistics of the reference scores ``{score: [N]}`` (N >= 2) of each part."""
        missing = [p for p in parts if p not in reference]
        if missing:
            raise ValueError(f"the fused score needs the scores {missing}; the reference holds {sorted(reference)}")
        stats = {}
        for part in parts:
            values = reference[part].double()
            if values.numel() < 2:
                raise ValueError(f"the fused score needs >= 2 reference inputs, got {values.numel()}")
            sd = float(values.std())
            stats[part] = (float(values.mean()), sd if sd > 0 and math.isfinite(sd) else 1.0)
        return cls(tuple(parts), stats, name)

    def __call__(self, scores: dict[str, Tensor]) -> Tensor:
        """The fused score ``[M]`` of per-sample scores ``{score: [M]}`` holding every part."""
        total = sum((scores[p].double() - self.stats[p][0]) / self.stats[p][1] for p in self.parts)
        return torch.as_tensor(total).float()

    def add_to(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        """``scores`` with the fused score added under :attr:`name`."""
        return scores | {self.name: self(scores)}


class FusedReference(Metric):
    """The in-distribution reference scores of a fused score's parts, gathered over every DDP rank by torchmetrics
    (``cat`` states); :meth:`compute` fits the :class:`FusedScore` on them.

    Example::

        >>> reference = FusedReference()
        >>> reference.update(score_batches(model, val_loader, ["logpx"], posthoc=posthoc))
        >>> fused = reference.compute()  # None with fewer than two reference inputs
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, parts: Sequence[str] = FUSED_PARTS, name: str = "fused", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not parts:
            raise ValueError("a fused score needs at least one part")
        self.parts, self.name = tuple(parts), name
        for index in range(len(self.parts)):
            self.add_state(f"part_{index}", default=[], dist_reduce_fx="cat")

    def update(self, scores: dict[str, Tensor]) -> None:
        """Add the reference scores ``{part: [N]}`` (every part, one length)."""
        missing = [p for p in self.parts if p not in scores]
        if missing:
            raise ValueError(f"the fused score needs the scores {missing}; got {sorted(scores)}")
        for index, part in enumerate(self.parts):
            getattr(self, f"part_{index}").append(scores[part].detach().to(self.dtype))

    def compute(self) -> FusedScore | None:
        """The fused score standardised on every rank's references, or ``None`` with fewer than two of them."""
        values = {part: _cat(getattr(self, f"part_{i}")) for i, part in enumerate(self.parts)}
        if values[self.parts[0]].numel() < 2:
            return None
        return FusedScore.fit(values, self.parts, self.name)


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    if isinstance(state, list):
        return torch.cat(state) if state else torch.empty(0)
    return state


@dataclass
class PostHocScores:
    """Post-hoc detectors fitted on a classifier's training features, and the hook that captures its features.

    Build it with :meth:`fit`; :func:`score_batches` then adds the detectors' scores (higher = more
    in-distribution) to the model's own from the same forward.
    """

    hook: FeatureHook
    detectors: PostHocDetectors

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        train_batches: Iterable,
        names: Sequence[str] | None = None,
        layer: str | None = None,
        max_samples: int | None = 10_000,
        device: torch.device | str | None = None,
    ) -> PostHocScores:
        """Fit ``names`` (default all of :data:`~jemkit.ood.detectors.POSTHOC_DETECTORS`) on the features of up to
        ``max_samples`` training inputs. ``model`` is the classifier, or a :class:`jemkit.JEM` (its ``classifier``'s
        layers are read); ``layer`` names a layer of the classifier (default: the input of its last linear layer,
        whose weights ViM also reads; ViM is skipped with a named layer). A detector that cannot be fitted on these
        features is skipped, its reason in ``detectors.skipped`` (and in the report)."""
        classifier = getattr(model, "classifier", model)
        hook = FeatureHook(classifier, layer)
        z, y = extract_features(classifier, train_batches, layer, device, max_samples)
        head = last_linear(classifier) if layer is None else None
        names = list(POSTHOC_DETECTORS if names is None else names)
        # a detector that cannot be fitted here (ViM without a head, or with too few features) is skipped and named
        detectors = PostHocDetectors(names, strict=False).fit(
            z, y, None if head is None else head.weight.detach(), None if head is None else _bias(head)
        )
        return cls(hook, detectors)

    @property
    def names(self) -> list[str]:
        return list(self.detectors.detectors)


def _bias(head: nn.Linear) -> Tensor | None:
    return None if head.bias is None else head.bias.detach()


def ood_scores(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    scores: Sequence[str] = SCORES,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """Scores ``{name: [B]}`` of inputs ``x [B, ...]`` for a classifier ``model: x -> logits [B, C]``; also the
    :data:`INPUT_PARTS` named in ``scores`` (``complexity`` in the model's input domain, if it has one).

    Only ``grad_norm`` needs a backward pass (input gradients only); it works inside validation/inference mode.
    """
    check_names("OOD score(s)", scores, (*SCORES, *INPUT_PARTS))
    out: dict[str, Tensor] = {}
    if "grad_norm" in scores:
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            logits = model(x_in).float()
            (grad,) = torch.autograd.grad(log_px(logits, temperature).sum(), x_in)
        out["grad_norm"] = -grad.flatten(1).norm(dim=1)
        logits = logits.detach()
    else:
        logits = model(x).float()
    if "logpx" in scores:
        out["logpx"] = log_px(logits, temperature)
    if "msp" in scores:
        out["msp"] = log_py_given_x(logits, temperature).max(1).values.exp()
    if "max_logit" in scores:
        out["max_logit"] = logits.max(1).values
    if "complexity" in scores:
        out["complexity"] = input_complexity(x, getattr(model, "domain", None))
    return {name: out[name] for name in scores}


def score_batches(
    model: Callable[[Tensor], Tensor],
    batches: Iterable,
    scores: Sequence[str] = SCORES,
    temperature: float = 1.0,
    device: torch.device | str | None = None,
    posthoc: PostHocScores | None = None,
) -> dict[str, Tensor]:
    """:func:`ood_scores` of every input in ``batches`` (``(x, ...)`` tuples or bare ``x``), concatenated:
    ``{name: [N]}`` float32 on ``device`` (empty tensors when there are no batches); with ``posthoc``, its
    detectors' scores of the features of the same forward too."""
    names = list(scores) + (posthoc.names if posthoc is not None else [])
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if posthoc is None:
            values = ood_scores(model, x.to(device), scores, temperature)
        else:
            with posthoc.hook:
                values = ood_scores(model, x.to(device), scores or ("max_logit",), temperature)
                z = posthoc.hook.pop()
            values = {name: values[name] for name in scores}
            values |= {name: value.to(device) for name, value in posthoc.detectors.score(z).items()}
        for name, value in values.items():
            parts[name].append(value.detach().float())
    return {name: torch.cat(v) if v else torch.empty(0, device=device) for name, v in parts.items()}


def compare_scores(
    in_scores: dict[str, Tensor], out_scores: dict[str, dict[str, Tensor]]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {score: {auroc, aupr_in, aupr_out, fpr95}}}`` of in-distribution scores ``{score: [N]}`` against each
    OOD set's ``{set: {score: [M]}}``: the one comparison of the evaluation report and the ``OODMonitor`` callback.

    Computed with :class:`~jemkit.metrics.OODMetrics`, which gathers every rank's scores under DDP (an empty share of
    a tiny set is skipped), so every rank gets the same values.
    """
    from jemkit.metrics.ood import OODMetrics

    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, scores_out in out_scores.items():
        results[name] = {}
        for score, values_in in in_scores.items():
            metric = OODMetrics().to(values_in.device)
            for share, is_in in ((values_in, True), (scores_out[score], False)):
                if len(share):
                    metric.update(share, is_in)
            results[name][score] = {k: float(v) for k, v in metric.compute().items()}
    return results


def reversed_scores(results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """A message for every score that ranks an OOD set as *more* in-distribution than the data (AUROC < 0.5)."""
    return [
        f"{score} points the wrong way on {name}: AUROC {values['auroc']:.3f} < 0.5 (the negated score would give "
        f"{1 - values['auroc']:.3f}); the model gives these inputs the values it gives data"
        for name, scores in results.items()
        for score, values in scores.items()
        if values["auroc"] < 0.5
    ]
