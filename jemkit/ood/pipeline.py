"""The one OOD pipeline, shared by the evaluation report and :class:`~jemkit.callbacks.OODMonitor`: fit -> score ->
compare, with the options of :class:`OODOptions`.

1. **Fit** (:meth:`OODPipeline.fit`): the post-hoc detectors a user gets without training (Mahalanobis, relative
   Mahalanobis, KNN, ViM; :mod:`jemkit.ood.detectors`) on the features of training inputs.
2. **Score** (:meth:`OODPipeline.score`): the model's own scores (:data:`~jemkit.ood.scores.SCORES`) and the
   detectors' from one forward per batch, higher for in-distribution inputs.
3. **Compare** (:meth:`OODPipeline.compare`): AUROC, AUPR and FPR95 of the in-distribution scores against each OOD
   set's, with the fused score (:class:`~jemkit.ood.scores.FusedScore`) added when its parts are there, standardised
   on in-distribution reference scores.

Every reduction across DDP ranks is a torchmetrics state (:class:`~jemkit.metrics.OODMetrics`,
:class:`~jemkit.ood.scores.FusedReference`), so a rank that scores its own share of each set gets the same figures as
the others. What differs between the report and the callback stays with them: which split is in-distribution, how
sets are capped or sharded, where figures and logs go.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from jemkit.checks import check_integer, check_names
from jemkit.data.ood import OOD_SETS, check_ood_dataset, make_ood_dataset, ood_sets_for
from jemkit.ood.detectors import DETECTORS, POSTHOC_DETECTORS
from jemkit.ood.scores import (
    FUSED_RULES,
    INPUT_PARTS,
    SCORES,
    FusedReference,
    FusedScore,
    PostHocScores,
    compare_scores,
    score_batches,
)

__all__ = ["OODOptions", "OODPipeline", "OODResult", "build_ood_sets", "datamodule_ood_sets"]


@dataclass
class OODOptions:
    """What OOD detection measures, in the report (``jemkit evaluate --ood.*``) and in ``OODMonitor``.

    Args:
        sets: built-in OOD sets (:data:`jemkit.data.ood.OOD_SETS`), drawn in the model's input domain where they are
            noise; ``None``: every one that fits the data (:func:`jemkit.data.ood.ood_sets_for`: ``vflip`` for
            images only).
        datamodule_sets: also the near-OOD sets the datamodule offers: its ``ood_datasets()`` (e.g. MNIST-style
            digits beside Fashion-MNIST) and its ``heldout_dataset`` (the classes an open set leaves out).
        scores: the model's own OOD scores (:data:`jemkit.ood.scores.SCORES`), higher for in-distribution inputs.
        detectors: post-hoc detectors fitted on training features, some of ``mahalanobis``, ``rmd``, ``knn``, ``vim``
            or any registered with :func:`jemkit.ood.detectors.register` (``[]``: none).
        features: the classifier's layer whose output is the feature (default: the input of its last linear layer).
        fit_samples: training inputs the detectors are fitted on (the first ones, the same on every rank).
        fused: also report the fused scores (:data:`~jemkit.ood.scores.FUSED_RULES`: ``fused``, ``logpx``,
            Mahalanobis and KNN; ``logpx_ic``, ``logpx`` and the input's complexity; each part standardised on
            in-distribution reference scores, summed) when their parts are measured.
    """

    sets: list[str] | None = None
    scores: list[str] = field(default_factory=lambda: list(SCORES))
    detectors: list[str] = field(default_factory=lambda: list(POSTHOC_DETECTORS))
    features: str | None = None
    fit_samples: int = 10_000
    fused: bool = True
    datamodule_sets: bool = True

    def check(self) -> None:
        """Refuse unknown OOD sets, scores and detectors before any work is done or any file written."""
        if self.sets is not None:
            check_names("OOD set(s)", self.sets, OOD_SETS)
        check_names("OOD score(s)", self.scores, SCORES)
        check_names("post-hoc detector(s)", self.detectors, tuple(DETECTORS))  # built-in and registered ones
        check_integer("fit_samples", self.fit_samples)


def datamodule_ood_sets(datamodule: Any) -> dict[str, Dataset]:
    """The near-OOD sets a datamodule offers: what its ``ood_datasets()`` returns, and its ``heldout_dataset`` (the
    classes an open-set split leaves out) as ``"heldout"``; empty for a datamodule with neither."""
    offered = getattr(datamodule, "ood_datasets", None)
    sets = dict(offered()) if callable(offered) else {}
    heldout = getattr(datamodule, "heldout_dataset", None)
    if heldout is not None and len(heldout) > 0:
        sets.setdefault("heldout", heldout)
    return sets


def build_ood_sets(
    reference: Dataset,
    names: Sequence[str] | None,
    num_samples: int | None = None,
    domain: Any = None,
    extra_sets: dict[str, Dataset] | None = None,
) -> dict[str, Dataset]:
    """The built-in OOD sets ``names`` (``None``: every one that fits the data) made to match ``reference``
    (``num_samples`` items each, default as many as it has; noise drawn in ``domain``'s box), and ``extra_sets``, each
    checked against the reference's input shape."""
    n = None if num_samples is None else min(num_samples, len(reference))
    input_shape = tuple(reference[0][0].shape)
    names = ood_sets_for(input_shape) if names is None else names
    sets = {name: make_ood_dataset(name, reference, n, domain=domain) for name in names}
    sets |= extra_sets or {}
    for name, dataset in sets.items():
        check_ood_dataset(dataset, input_shape, name)
    return sets


@dataclass
class OODResult:
    """What one run of the pipeline gives.

    Attributes:
        in_scores: ``{score: [N]}`` of the in-distribution inputs (this rank's share under DDP).
        out_scores: ``{set: {score: [M]}}``.
        results: ``{set: {score: {auroc, aupr_in, aupr_out, fpr95}}}``, over every rank's scores.
        described: what a report says of the detectors and the fused score (or why there are none).
    """

    in_scores: dict[str, Tensor]
    out_scores: dict[str, dict[str, Tensor]]
    results: dict[str, dict[str, dict[str, float]]]
    described: dict[str, Any]

    @property
    def names(self) -> list[str]:
        """Every score compared, in order."""
        return list(self.in_scores)


class OODPipeline:
    """Fit -> score -> compare for one model and one :class:`OODOptions` (see the module docstring).

    Args:
        model: a :class:`jemkit.JEM` or a plain classifier (``forward -> logits``; its ``temperature`` is read if it
            has one).
        options: what to measure (checked here).
        device: where to score; default the model's ``device``.
        progress: show a progress bar per set.

    Example::

        >>> pipeline = OODPipeline(jem, OODOptions(sets=["uniform"]))
        >>> pipeline.fit(train_loader, num_train=1000)
        >>> result = pipeline.run(test_loader, {"uniform": noise_loader}, fused_on=val_loader)
    """

    def __init__(
        self,
        model: nn.Module,
        options: OODOptions,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        options.check()
        self.model, self.options, self.progress = model, options, progress
        self.device = device if device is not None else getattr(model, "device", None)
        self.temperature = float(getattr(model, "temperature", 1.0))
        self.posthoc: PostHocScores | None = None
        self.described: dict[str, Any] = {"detectors": []}

    # ------------------------------------------------------------------ 1. fit
    def fit(self, train_batches: Iterable | None, num_train: int | None = None) -> OODPipeline:
        """Fit the detectors on up to ``options.fit_samples`` inputs of ``train_batches`` (``None``: no training
        data; the detectors are skipped with the reason). ``num_train`` (the number of training inputs available)
        goes into the description."""
        self.posthoc = None
        if not self.options.detectors:
            self.described = {"detectors": []}
            return self
        if train_batches is None or num_train == 0:
            self.described = {"detectors": [], "skipped": "no training data to fit them on"}
            return self
        self.posthoc = PostHocScores.fit(
            self.model, train_batches, self.options.detectors, self.options.features, self.options.fit_samples,
            self.device,
        )  # fmt: skip
        self.described = {
            "detectors": self.posthoc.names,
            "features": f"{self.posthoc.hook.capture} of {self.posthoc.hook.layer_name}",
            "fit_samples": self.options.fit_samples if num_train is None else min(num_train, self.options.fit_samples),
        }
        if self.posthoc.detectors.skipped:
            self.described["skipped"] = self.posthoc.detectors.skipped
        return self

    # ------------------------------------------------------------------ 2. score
    def score(
        self, batches: Iterable, scores: Sequence[str] | None = None, desc: str | None = None
    ) -> dict[str, Tensor]:
        """``{score: [N]}`` of every input in ``batches``: the model's ``scores`` (default the options', and the input
        statistics the fused rules read) and the fitted detectors', from one forward a batch; a progress bar named
        ``desc`` if the pipeline shows them."""
        if desc is not None:
            batches = tqdm(batches, desc=desc, disable=not self.progress, leave=False)
        chosen = [*self.options.scores, *self._input_parts()] if scores is None else scores
        return score_batches(self.model, batches, chosen, self.temperature, self.device, self.posthoc)

    def _input_parts(self) -> list[str]:
        """The input statistics (:data:`~jemkit.ood.scores.INPUT_PARTS`) a fused rule of the options reads."""
        if not self.options.fused:
            return []
        return [p for p in INPUT_PARTS if any(p in parts for parts in FUSED_RULES.values())]

    def fused_scores(self, reference: dict[str, Tensor]) -> list[FusedScore]:
        """Every rule of :data:`~jemkit.ood.scores.FUSED_RULES` whose parts ``reference`` holds, standardised on
        those in-distribution reference scores (every rank's, gathered by a torchmetrics state); none with fewer
        than two references."""
        fused = []
        for name, parts in FUSED_RULES.items():
            if not all(part in reference for part in parts):
                continue
            collected = FusedReference(parts, name).to(next(iter(reference.values())).device)
            collected.update(reference)
            rule = collected.compute()
            if rule is not None:
                fused.append(rule)
        return fused

    # ------------------------------------------------------------------ 3. compare
    def compare(
        self,
        in_scores: dict[str, Tensor],
        out_scores: dict[str, dict[str, Tensor]],
        fused: Sequence[FusedScore] = (),
        fused_on: str = "in-distribution inputs",
    ) -> OODResult:
        """The metrics of ``in_scores`` against each set of ``out_scores``, with each ``fused`` score (standardised
        on what ``fused_on`` says) added to both first; input statistics are parts, not compared alone."""
        described = dict(self.described)
        for rule in fused:
            in_scores = rule.add_to(in_scores)
            out_scores = {name: rule.add_to(values) for name, values in out_scores.items()}
            described[rule.name] = {"parts": list(rule.parts), "standardised_on": fused_on}

        def reported(scores: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v for k, v in scores.items() if k not in INPUT_PARTS}

        in_scores, out_scores = reported(in_scores), {name: reported(v) for name, v in out_scores.items()}
        return OODResult(in_scores, out_scores, compare_scores(in_scores, out_scores), described)

    def run(
        self,
        in_batches: Iterable,
        sets: dict[str, Iterable],
        fused_on: Iterable | str | None = "in",
        fused_on_name: str = "in-distribution inputs",
    ) -> OODResult:
        """Score ``in_batches`` and every set, then compare. The fused scores (when the options ask for them and
        their parts are measured) are standardised on ``fused_on``: ``"in"`` the in-distribution scores themselves,
        else reference batches (a validation split), ``None`` for none. Call :meth:`fit` first for detectors."""
        in_scores = self.score(in_batches, desc="OOD in-dist")
        out_scores = {name: self.score(batches, desc=f"OOD {name}") for name, batches in sets.items()}
        fused: list[FusedScore] = []
        if self.options.fused and fused_on is not None:
            if isinstance(fused_on, str):
                reference = in_scores
            else:  # the model's own parts and the input's; the detectors' come with every forward
                parts = {p for rule in FUSED_RULES.values() for p in rule if p in (*SCORES, *INPUT_PARTS)}
                reference = self.score(fused_on, [p for p in (*SCORES, *INPUT_PARTS) if p in parts])
            fused = self.fused_scores({k: v for k, v in reference.items() if k in in_scores})
        return self.compare(in_scores, out_scores, fused, fused_on_name)
