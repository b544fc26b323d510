"""The OOD section of the evaluation: how well each score tells the test split from OOD sets, with histograms.

Scores are the model's own (:data:`jemkit.scores.SCORES`: ``logpx`` for a JEM) and the post-hoc detectors a user
gets without training (Mahalanobis, relative Mahalanobis, KNN, ViM; :mod:`jemkit.detectors`), fitted on the training
split's features, so that the report answers whether the JEM's training bought anything over its classifier plus
that toolbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from jemkit.checks import check_integer
from jemkit.data.ood import OOD_SETS, check_ood_dataset, make_ood_dataset
from jemkit.detectors import POSTHOC_DETECTORS
from jemkit.evaluate.plots import save_figure, score_histogram
from jemkit.evaluate.splits import capped_loader
from jemkit.evaluate.tables import text_table
from jemkit.scores import (
    FUSED_PARTS,
    SCORES,
    FusedScore,
    PostHocScores,
    compare_scores,
    reversed_scores,
    score_batches,
    score_sets,
)

__all__ = ["OODOptions", "format_ood", "ood_section", "ood_test_sets"]


@dataclass
class OODOptions:
    """What the OOD section measures.

    Args:
        sets: built-in OOD sets (see :data:`jemkit.data.ood.OOD_SETS`); the noise sets are drawn in the JEM's input
            domain.
        scores: the model's own OOD scores (see :data:`jemkit.scores.SCORES`), higher for in-distribution inputs.
        detectors: post-hoc detectors fitted on the training split's features, some of ``mahalanobis``, ``rmd``,
            ``knn``, ``vim`` (``[]``: none).
        features: the classifier's layer whose output is the feature (default: the input of its last linear layer).
        fit_samples: training inputs the detectors are fitted on.
        fused: also report the fused score (:class:`~jemkit.scores.FusedScore`: ``logpx``, Mahalanobis and KNN,
            each standardised on the validation split, summed) when its parts are measured and there is validation
            data.
    """

    sets: list[str] = field(default_factory=lambda: list(OOD_SETS))
    scores: list[str] = field(default_factory=lambda: list(SCORES))
    detectors: list[str] = field(default_factory=lambda: list(POSTHOC_DETECTORS))
    features: str | None = None
    fit_samples: int = 10_000
    fused: bool = True

    def check(self) -> None:
        """Refuse unknown OOD sets, scores and detectors before any work is done or any file written."""
        for kind, given, known in (
            ("OOD set(s)", self.sets, OOD_SETS),
            ("OOD score(s)", self.scores, SCORES),
            ("post-hoc detector(s)", self.detectors, POSTHOC_DETECTORS),
        ):
            unknown = [name for name in given if name not in known]
            if unknown:
                raise ValueError(f"unknown {kind} {unknown}; expected some of {', '.join(known)}")
        check_integer("fit_samples", self.fit_samples)


def ood_test_sets(
    test_set: Dataset,
    options: OODOptions,
    domain: Any = None,
    extra_sets: dict[str, Dataset] | None = None,
    max_samples: int | None = 1000,
) -> dict[str, Dataset]:
    """The OOD sets of one evaluation (built once, so every model in it is scored on the same inputs), checked
    against the test inputs' shape."""
    n = max_samples and min(max_samples, len(test_set))
    sets = {name: make_ood_dataset(name, test_set, n, domain=domain) for name in options.sets}
    sets |= extra_sets or {}
    input_shape = tuple(test_set[0][0].shape)
    for name, dataset in sets.items():
        check_ood_dataset(dataset, input_shape, name)
    return sets


def ood_section(
    model: nn.Module,
    test_set: Dataset,
    sets: dict[str, Dataset],
    options: OODOptions,
    train_set: Dataset | None,
    out: Path,
    max_samples: int | None = 1000,
    batch_size: int = 128,
    progress: bool = False,
    prefix: str = "",
    val_set: Dataset | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """``({"ood": {set: {score: {auroc, aupr_in, aupr_out, fpr95}}}, "posthoc": {...}}, figures)``, in-distribution
    test inputs positive, and a histogram per score (files named with ``prefix``); ``({}, {})`` when there is no set
    or no score."""
    posthoc, described = _fit_detectors(model, options, train_set, batch_size)
    names = list(options.scores) + (posthoc.names if posthoc is not None else [])
    if not sets or not names:
        return {}, {}
    in_scores, out_scores = score_sets(
        model,
        capped_loader(test_set, batch_size, max_samples),
        {name: capped_loader(dataset, batch_size, max_samples) for name, dataset in sets.items()},
        options.scores,
        getattr(model, "temperature", 1.0),
        model.device,
        progress,
        posthoc,
    )
    fused = _fused(model, options, posthoc, val_set, max_samples, batch_size)
    if fused is not None:
        in_scores = fused.add_to(in_scores)
        out_scores = {name: fused.add_to(values) for name, values in out_scores.items()}
        names.append(fused.name)
        described["fused"] = {"parts": list(fused.parts), "standardised_on": "validation split"}
    results = compare_scores(in_scores, out_scores)
    figures = {}
    for s in names:
        groups = {"in-distribution": in_scores[s]} | {name: values[s] for name, values in out_scores.items()}
        aurocs = {name: f"AUROC {results[name][s]['auroc']:.3f}" for name in sets}
        figure = score_histogram(groups, title=f"OOD score: {s}", xlabel=s, legend_extra=aurocs)
        figures[f"{prefix}ood_{s}"] = str(save_figure(figure, out / f"{prefix}ood_{s}.png"))
    return {"ood": results, "posthoc": described}, figures


def _fused(
    model: nn.Module,
    options: OODOptions,
    posthoc: PostHocScores | None,
    val_set: Dataset | None,
    max_samples: int | None,
    batch_size: int,
) -> FusedScore | None:
    """The fused score standardised on the validation split, or ``None`` when a part or the data is missing."""
    available = set(options.scores) | set(posthoc.names if posthoc is not None else ())
    if not options.fused or not set(FUSED_PARTS) <= available or val_set is None or len(val_set) < 2:
        return None
    loader = capped_loader(val_set, batch_size, max_samples)
    reference = score_batches(
        model, loader, ["logpx"], getattr(model, "temperature", 1.0), getattr(model, "device", None), posthoc
    )
    return FusedScore.fit(reference)


def _fit_detectors(
    model: nn.Module, options: OODOptions, train_set: Dataset | None, batch_size: int
) -> tuple[PostHocScores | None, dict[str, Any]]:
    """The detectors fitted on the training split, and what the report says of them (or why there are none)."""
    if not options.detectors:
        return None, {"detectors": []}
    if train_set is None or len(train_set) == 0:
        return None, {"detectors": [], "skipped": "the datamodule has no training data to fit them on"}
    loader = capped_loader(train_set, batch_size, options.fit_samples)
    posthoc = PostHocScores.fit(model, loader, options.detectors, options.features, options.fit_samples, model.device)
    described = {
        "detectors": posthoc.names,
        "features": f"{posthoc.hook.capture} of {posthoc.hook.layer_name}",
        "fit_samples": min(len(train_set), options.fit_samples),
    }
    if posthoc.detectors.skipped:
        described["skipped"] = posthoc.detectors.skipped
    return posthoc, described


def format_ood(ood: dict[str, dict[str, dict[str, float]]], posthoc: dict[str, Any] | None = None) -> list[str]:
    """The OOD table, one row per set and score, and a warning line for each score that points the wrong way."""
    rows = [
        [name, score, *(values[k] for k in ("auroc", "aupr_in", "aupr_out", "fpr95"))]
        for name, by_score in ood.items()
        for score, values in by_score.items()
    ]
    notes = []
    if posthoc and posthoc.get("detectors"):
        notes.append(
            f"post-hoc detectors ({', '.join(posthoc['detectors'])}) fitted on {posthoc['fit_samples']} training "
            f"inputs' features ({posthoc['features']})"
        )
    if posthoc and posthoc.get("fused"):
        notes.append(f"fused: {' + '.join(posthoc['fused']['parts'])}, each standardised on the validation split")
    if posthoc and posthoc.get("skipped"):
        notes.append(f"skipped: {posthoc['skipped']}")
    return [
        "OOD detection (in-distribution = positive)",
        text_table(["OOD set", "score", "AUROC", "AUPR-in", "AUPR-out", "FPR95"], rows),
        *notes,
        *(f"! {message}" for message in reversed_scores(ood)),
        "",
    ]
