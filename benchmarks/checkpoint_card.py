"""Write a shipped checkpoint's card (``checkpoints/<name>.json``) from ``jemkit evaluate``'s report.

The card keeps the figures ``checkpoints/README.md`` quotes and ``tests/test_checkpoints.py`` checks, so that they
are read from one evaluation, not copied by hand. The card being replaced is kept under ``previous`` (its own
``previous`` dropped), so a reader sees what a retraining changed::

    jemkit evaluate --ckpt runs/digits/checkpoints/best.ckpt --out runs/digits/eval --robustness.defense_steps 10
    python benchmarks/checkpoint_card.py --ckpt runs/digits/checkpoints/best.ckpt \\
        --report runs/digits/eval/report.json --card checkpoints/jem-digits.json --recipe recipes/digits.yaml \\
        --settings "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from jemkit import __version__
from jemkit.ood.scores import FUSED_RULES

CALIBRATION = ("accuracy", "nll", "ece", "brier")


def best_posthoc(by_score: dict[str, dict[str, float]], own: tuple[str, ...]) -> list[Any]:
    """``[AUROC, name]`` of the best score on one OOD set that is not the JEM's own."""
    name = max((s for s in by_score if s not in own), key=lambda s: by_score[s]["auroc"])
    return [by_score[name]["auroc"], name]


def card(report: dict[str, Any], checkpoint: dict[str, Any], recipe: str, command: str, settings: str) -> dict:
    """The card's fields: the recipe, the run's length, calibration, OOD AUROCs, robustness and sample quality."""
    own = ("logpx", *FUSED_RULES)  # the JEM's density and the fused scores built on it
    result: dict[str, Any] = {
        "recipe": recipe,
        "command": command,
        "jemkit": __version__,
        "settings": settings,
        "epoch": checkpoint["epoch"],
        "global_step": checkpoint["global_step"],
    }
    result |= {f"test/{'acc' if k == 'accuracy' else k}": report["calibration"][k] for k in CALIBRATION}
    result["test/ece_temperature_scaled"] = report["temperature_scaling"]["ece"]
    result["temperature"] = report["temperature_scaling"]["temperature"]
    ood = report.get("ood", {})
    for score in own:
        result[f"ood_auroc_{score}"] = {s: v[score]["auroc"] for s, v in ood.items() if score in v}
    result["ood_auroc_best_posthoc"] = {s: best_posthoc(v, own) for s, v in ood.items()}
    if "baseline" in report:  # the plain classifier evaluated beside it (--baseline_ckpt): its energy is logpx
        base = report["baseline"]
        result["baseline"] = {
            "test/acc": base["calibration"]["accuracy"],
            "test/ece_temperature_scaled": base["temperature_scaling"]["ece"],
            "ood_auroc_energy": {s: v["logpx"]["auroc"] for s, v in base["ood"].items()},
            "ood_auroc_best_posthoc": {s: best_posthoc(v, own) for s, v in base["ood"].items()},
        }
    for section in ("robustness", "generative"):
        if section in report:
            result[section] = report[section]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint the report evaluated")
    parser.add_argument("--report", type=Path, required=True, help="jemkit evaluate's report.json")
    parser.add_argument("--card", type=Path, required=True, help="the card to write (its old content -> previous)")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--command", default="", help="how the checkpoint was made (default: jemkit fit -c RECIPE)")
    parser.add_argument("--settings", required=True, help="the settings in words (release, sampler, restarts, ...)")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    command = args.command or f"jemkit fit -c {args.recipe}; best.ckpt (lowest validation NLL)"
    new = card(report, checkpoint, args.recipe, command, args.settings)
    if args.card.exists():
        old = json.loads(args.card.read_text())
        old.pop("previous", None)
        new["previous"] = old
    args.card.write_text(json.dumps(new, indent=1) + "\n")
    return new


if __name__ == "__main__":
    main()
