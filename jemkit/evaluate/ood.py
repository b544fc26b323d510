"""The OOD section of the evaluation: how well each score tells the test split from OOD sets, with histograms."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from jemkit.data.ood import OOD_SETS, check_ood_dataset, make_ood_dataset
from jemkit.evaluate.plots import save_figure, score_histogram
from jemkit.evaluate.splits import capped_loader
from jemkit.evaluate.tables import text_table
from jemkit.scores import SCORES, compare_scores, reversed_scores, score_sets

__all__ = ["OODOptions", "format_ood", "ood_section"]


@dataclass
class OODOptions:
    """What the OOD section measures.

    Args:
        sets: built-in OOD sets (see :data:`jemkit.data.ood.OOD_SETS`); the noise sets are drawn in the model's
            input domain.
        scores: OOD scores (see :data:`jemkit.scores.SCORES`), higher for inputs that look in-distribution.
    """

    sets: list[str] = field(default_factory=lambda: list(OOD_SETS))
    scores: list[str] = field(default_factory=lambda: list(SCORES))

    def check(self) -> None:
        """Refuse unknown OOD sets and scores before any work is done or any file written."""
        unknown_sets = [name for name in self.sets if name not in OOD_SETS]
        if unknown_sets:
            raise ValueError(
                f"unknown OOD set(s) {unknown_sets}; built-in sets: {', '.join(OOD_SETS)} (others: ood_data)"
            )
        unknown_scores = [name for name in self.scores if name not in SCORES]
        if unknown_scores:
            raise ValueError(f"unknown OOD score(s) {unknown_scores}; expected some of {', '.join(SCORES)}")


def ood_section(
    model: Any,
    test_set: Dataset,
    options: OODOptions,
    extra_sets: dict[str, Dataset] | None,
    out: Path,
    max_samples: int | None = 1000,
    batch_size: int = 128,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """``({set: {score: {auroc, aupr_in, aupr_out, fpr95}}}, figures)``, in-distribution test inputs positive, and
    a histogram per score; ``({}, {})`` when there is no set or no score."""
    n = max_samples and min(max_samples, len(test_set))
    domain = getattr(model, "domain", None)
    sets = {name: make_ood_dataset(name, test_set, n, domain=domain) for name in options.sets}
    sets |= extra_sets or {}
    if not sets or not options.scores:
        return {}, {}
    input_shape = tuple(test_set[0][0].shape)
    for name, dataset in sets.items():
        check_ood_dataset(dataset, input_shape, name)
    in_scores, out_scores = score_sets(
        model,
        capped_loader(test_set, batch_size, max_samples),
        {name: capped_loader(dataset, batch_size, max_samples) for name, dataset in sets.items()},
        options.scores,
        getattr(model, "temperature", 1.0),
        model.device,
        progress,
    )
    results = compare_scores(in_scores, out_scores)
    figures = {}
    for s in options.scores:
        groups = {"in-distribution": in_scores[s]} | {name: values[s] for name, values in out_scores.items()}
        aurocs = {name: f"AUROC {results[name][s]['auroc']:.3f}" for name in sets}
        figure = score_histogram(groups, title=f"OOD score: {s}", xlabel=s, legend_extra=aurocs)
        figures[f"ood_{s}"] = str(save_figure(figure, out / f"ood_{s}.png"))
    return results, figures


def format_ood(ood: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The OOD table, one row per set and score, and a warning line for each score that points the wrong way."""
    rows = [
        [name, score, *(values[k] for k in ("auroc", "aupr_in", "aupr_out", "fpr95"))]
        for name, by_score in ood.items()
        for score, values in by_score.items()
    ]
    return [
        "OOD detection (in-distribution = positive)",
        text_table(["OOD set", "score", "AUROC", "AUPR-in", "AUPR-out", "FPR95"], rows),
        *(f"! {message}" for message in reversed_scores(ood)),
        "",
    ]
