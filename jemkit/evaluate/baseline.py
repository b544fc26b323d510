"""The baseline arm of the evaluation: the plain classifier, evaluated beside the JEM on the same data.

A JEM earns its cost only where it beats the classifier it came from plus what a user gets without training
(temperature scaling, post-hoc OOD detectors). ``jemkit evaluate --baseline_ckpt PATH`` (loaded by
:func:`jemkit.loading.load_classifier`) evaluates that classifier the same way (calibration before and after
temperature scaling, every OOD set with its own scores and the post-hoc detectors on its features) and
:func:`comparison` puts the two side by side: for each OOD set, the JEM's recommended score
(:data:`jemkit.ood.RECOMMENDED_SCORE`, ``logpx`` where it was not computed) against the best score of the plain
classifier plus its toolbox (picked per set after the fact) and against the plain classifier's own figure with the
JEM's rule, which is what that rule gives without training a JEM.
"""

from __future__ import annotations

from typing import Any

from jemkit.evaluate.tables import text_table
from jemkit.ood.scores import RECOMMENDED_SCORE

__all__ = ["comparison", "format_comparison"]


def _best(by_score: dict[str, dict[str, float]], names: list[str] | None = None) -> tuple[str, float]:
    candidates = {k: v["auroc"] for k, v in by_score.items() if names is None or k in names}
    name = max(candidates, key=lambda k: candidates[k])
    return name, candidates[name]


def comparison(report: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The JEM beside the baseline: accuracy, ECE before and after temperature scaling, and per OOD set the JEM's
    recommended score, its best score, the baseline's best score (its own scores and post-hoc detectors, picked per
    set after the fact) and the baseline's with the JEM's rule (what that rule gives without training a JEM)."""

    def ece_scaled(section: dict[str, Any]) -> float | None:
        return (section.get("temperature_scaling") or {}).get("ece")

    rows: dict[str, Any] = {
        "accuracy": [report["calibration"]["accuracy"], baseline["calibration"]["accuracy"]],
        "ece": [report["calibration"]["ece"], baseline["calibration"]["ece"]],
        "ece_scaled": [ece_scaled(report), ece_scaled(baseline)],
    }
    ood: dict[str, Any] = {}
    for name, by_score in report.get("ood", {}).items():
        if name not in baseline.get("ood", {}):
            continue
        score = RECOMMENDED_SCORE if RECOMMENDED_SCORE in by_score else "logpx"
        ood[name] = {
            "jem": {"score": score, "auroc": by_score.get(score, {}).get("auroc")},
            "jem_best": dict(zip(("score", "auroc"), _best(by_score), strict=True)),
            "baseline_best": dict(zip(("score", "auroc"), _best(baseline["ood"][name]), strict=True)),
            "baseline_same_rule": {"score": score, "auroc": baseline["ood"][name].get(score, {}).get("auroc")},
        }
    return {"columns": ["jem", "baseline"], "rows": rows, "ood": ood}


def format_comparison(compared: dict[str, Any]) -> list[str]:
    """The side-by-side table of :func:`comparison`, as report lines."""
    titles = {"accuracy": "accuracy", "ece": "ECE", "ece_scaled": "ECE after temperature scaling"}
    rows = [[titles[k], *v, _delta(*v)] for k, v in compared["rows"].items()]
    for name, o in compared["ood"].items():
        jem, best, base, same = o["jem"], o["jem_best"], o["baseline_best"], o["baseline_same_rule"]
        note = f"JEM best: {best['score']} {best['auroc']:.4f}; plain best: {base['score']}"
        if same["auroc"] is not None:
            note += f"; plain with {same['score']}: {same['auroc']:.4f}"
        rows.append([f"AUROC {name}", jem["auroc"], base["auroc"], _delta(jem["auroc"], base["auroc"]), note])
    scores = {o["jem"]["score"] for o in compared["ood"].values()} or {RECOMMENDED_SCORE}
    header = ["", f"JEM ({', '.join(sorted(scores))})", "plain + toolbox", "JEM - plain", "notes"]
    rows = [r + [""] * (len(header) - len(r)) for r in rows]
    return ["JEM beside the plain classifier", text_table(header, rows), ""]


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
