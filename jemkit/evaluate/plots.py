"""Figures for evaluation reports: reliability diagrams, OOD score histograms, and saving them as PNG.

Figures are built as :class:`matplotlib.figure.Figure` objects with an Agg canvas, never through ``pyplot``: no window
opens, no global figure registry fills up, and several threads (or dataloader workers, or callbacks) can draw at once.
Inputs are the outputs of :mod:`jemkit.metrics` (per-bin tensors; score tensors ``[N]``), so plotting never
recomputes a metric except the ECE shown in a legend, which is the same weighted gap.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["reliability_diagram", "save_figure", "score_histogram"]

ArrayLike = Tensor | np.ndarray | Sequence[float]

_DPI = 120


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _to_numpy(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        array = values.detach().cpu().double().numpy()
    else:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"expected {name} to be a Tensor or a sequence of numbers, got {type(values).__name__}"
            ) from err
    if array.ndim != 1:
        raise ValueError(f"expected {name} of shape [n], got shape {array.shape}")
    return array


def reliability_diagram(
    bin_confidence: ArrayLike,
    bin_accuracy: ArrayLike,
    bin_counts: ArrayLike,
    title: str | None = None,
) -> Figure:
    """Reliability diagram from per-bin statistics (:func:`jemkit.metrics.reliability_bins` or ReliabilityDiagram).

    Top axes: accuracy per equal-width confidence bin (bars), the diagonal of perfect calibration, and the gap to
    each bin's mean confidence shaded; the ECE is in the legend. Bottom axes: number of samples per bin.

    Args:
        bin_confidence: mean confidence per bin ``[n_bins]`` (bins are ``n_bins`` equal-width bins of ``[0, 1]``).
        bin_accuracy: accuracy per bin ``[n_bins]``.
        bin_counts: number of samples per bin ``[n_bins]``.
        title: figure title.

    Returns:
        A figure with two axes (reliability, counts).

    Raises:
        ValueError: if the three inputs are not 1-D of one length, are empty, counts are negative or all zero, or
            confidences/accuracies lie outside ``[0, 1]``.
    """
    confidence = _to_numpy(bin_confidence, "bin_confidence")
    accuracy = _to_numpy(bin_accuracy, "bin_accuracy")
    counts = _to_numpy(bin_counts, "bin_counts")
    if not len(confidence) == len(accuracy) == len(counts):
        raise ValueError(
            "bin_confidence, bin_accuracy and bin_counts must have one length, got "
            f"{len(confidence)}, {len(accuracy)}, {len(counts)}"
        )
    if len(counts) == 0:
        raise ValueError("expected at least one bin")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("bin_counts must be non-negative with a positive total")
    for name, values in (("bin_confidence", confidence), ("bin_accuracy", accuracy)):
        if not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"{name} must lie in [0, 1]")

    n_bins = len(counts)
    width = 1.0 / n_bins
    left = np.arange(n_bins) * width
    filled = counts > 0
    ece = float(np.sum(np.abs(accuracy - confidence) * counts) / counts.sum())

    fig = _new_figure((5.0, 6.0))
    ax, ax_count = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.bar(
        left[filled],
        accuracy[filled],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label=f"accuracy (ECE = {100 * ece:.2f}%)",
    )
    ax.bar(
        left[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.5,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)

    ax_count.bar(left, counts, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("count")
    return fig


def score_histogram(
    scores: Mapping[str, ArrayLike],
    title: str | None = None,
    xlabel: str = "score",
    legend_extra: Mapping[str, str] | None = None,
    bins: int = 50,
) -> Figure:
    """Overlaid density histograms of OOD scores, one per data set, on common bins.

    Put the in-distribution set first: it is drawn as a filled histogram, the others as outlines. Non-finite
    scores (e.g. ``-inf`` log-densities) cannot be placed on the axis and are left out of the histogram; their
    number is added to the legend.

    Args:
        scores: ``{name: scores [N]}``, e.g. ``{"digits (in)": s_in, "noise": s_noise}``.
        title: figure title.
        xlabel: x-axis label, e.g. ``"log p(x)"``.
        legend_extra: ``{name: text}`` appended to that set's legend entry, e.g. ``{"noise": "AUROC 0.97"}``.
        bins: number of histogram bins shared by all sets.

    Returns:
        A figure with one axes.

    Raises:
        ValueError: on an empty mapping, a set that is empty or not 1-D or has no finite score, ``legend_extra``
            keys missing from ``scores``, or ``bins < 1``.
    """
    if not scores:
        raise ValueError("expected at least one set of scores")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    extra = dict(legend_extra or {})
    unknown = sorted(set(extra) - set(scores))
    if unknown:
        raise ValueError(f"legend_extra has keys {unknown} that are not in scores {list(scores)}")

    arrays: dict[str, np.ndarray] = {}
    dropped: dict[str, int] = {}
    for name, values in scores.items():
        array = _to_numpy(values, f"scores[{name!r}]")
        finite = np.isfinite(array)
        if not finite.any():
            raise ValueError(f"scores[{name!r}] has no finite values")
        arrays[name] = array[finite]
        dropped[name] = int((~finite).sum())

    everything = np.concatenate(list(arrays.values()))
    low, high = float(everything.min()), float(everything.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)

    fig = _new_figure((6.0, 4.0))
    ax = fig.subplots()
    for i, (name, array) in enumerate(arrays.items()):
        label = name
        if name in extra:
            label += f" ({extra[name]})"
        if dropped[name]:
            label += f" [{dropped[name]} non-finite]"
        if i == 0:
            ax.hist(array, bins=edges, density=True, alpha=0.5, label=label)
        else:
            ax.hist(array, bins=edges, density=True, histtype="step", linewidth=1.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    if title:
        ax.set_title(title)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (dpi 120) to ``path``, creating parent folders, and close it; returns the path.

    A path without suffix gets ``.png``. The figure is released afterwards (closed in ``pyplot`` if it was made
    there), so do not draw on it again.

    Raises:
        ValueError: if ``path`` has a suffix other than ``.png``.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; got a path ending in {path.suffix!r}: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    pyplot = sys.modules.get("matplotlib.pyplot")  # not imported here: pyplot is global state
    if pyplot is not None:
        pyplot.close(fig)
    fig.clear()
    return path
