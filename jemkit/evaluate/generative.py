"""The generative section of the report: FID and IS of the JEM's samples (:mod:`jemkit.metrics.generative`) as a
table."""

from __future__ import annotations

from typing import Any

from jemkit.evaluate.tables import text_table

__all__ = ["format_generative"]


def format_generative(section: dict[str, Any]) -> str:
    """A text table of :func:`jemkit.metrics.generative.generative_metrics`' result, one row per sample source."""
    rows = [
        [name, v["num_samples"], "-" if v["steps"] is None else v["steps"], v["fid"], v["is_mean"], v["is_std"]]
        for name, v in section.items()
        if isinstance(v, dict)
    ]
    split = f" {section['real']}" if "real" in section else ""  # evaluate() names the data split
    note = f"FID in {section['feature']} features against {section['num_real']} real{split} inputs; IS on "
    note += f"{section['is_feature']} logits"
    if section.get("heldout"):
        note += f"; row 'data': {section['heldout']} inputs measured as the samples are (the floor)"
    if "init" in section:
        note += "; row 'init': the chains' starting distribution (how far sampling moved)"
    return "\n".join([note, text_table(["source", "samples", "steps", "FID", "IS", "IS std"], rows)])
