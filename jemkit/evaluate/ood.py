"""The OOD section of the report: the figures and the table of :mod:`jemkit.ood.pipeline`'s comparison of the test
split with each OOD set.

Scores are the model's own (``logpx`` for a JEM) and the post-hoc detectors a user gets without training
(Mahalanobis, relative Mahalanobis, KNN, ViM), fitted on the training split's features, so that the report answers
whether the JEM's training bought anything over its classifier plus that toolbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from jemkit.evaluate.splits import capped_loader
from jemkit.evaluate.tables import text_table
from jemkit.ood.pipeline import OODOptions, OODPipeline
from jemkit.ood.scores import FUSED_RULES, reversed_scores
from jemkit.pictures import ood_histograms, save_figure

__all__ = ["format_ood", "ood_section"]


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
    """``({"ood": {set: {score: {auroc, aupr_in, aupr_out, fpr95}}}, "posthoc": {...}}, figures)``: the test
    inputs (positive) against each set, the detectors fitted on ``train_set`` and the fused score standardised on
    ``val_set``; a histogram per score (files named with ``prefix``). ``({}, {})`` when there is no set or no score."""
    pipeline = OODPipeline(model, options, progress=progress)
    train = capped_loader(train_set, batch_size, options.fit_samples) if train_set is not None else None
    pipeline.fit(train, num_train=len(train_set) if train_set is not None else 0)
    if not sets or not [*options.scores, *(pipeline.posthoc.names if pipeline.posthoc is not None else [])]:
        return {}, {}
    fused_on = capped_loader(val_set, batch_size, max_samples) if val_set is not None and len(val_set) >= 2 else None
    result = pipeline.run(
        capped_loader(test_set, batch_size, max_samples),
        {name: capped_loader(dataset, batch_size, max_samples) for name, dataset in sets.items()},
        fused_on,
        "validation split",
    )
    figures = {
        f"{prefix}ood_{score}": str(save_figure(figure, out / f"{prefix}ood_{score}.png"))
        for score, figure in ood_histograms(result.in_scores, result.out_scores, result.results).items()
    }
    return {"ood": result.results, "posthoc": result.described}, figures


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
    for rule in FUSED_RULES:
        if posthoc and posthoc.get(rule):
            fused = posthoc[rule]
            notes.append(f"{rule}: {' + '.join(fused['parts'])}, each standardised on the {fused['standardised_on']}")
    if posthoc and posthoc.get("skipped"):
        notes.append(f"skipped: {posthoc['skipped']}")
    return [
        "OOD detection (in-distribution = positive)",
        text_table(["OOD set", "score", "AUROC", "AUPR-in", "AUPR-out", "FPR95"], rows),
        *notes,
        *(f"! {message}" for message in reversed_scores(ood)),
        "",
    ]
