"""Every figure jemkit draws, from tensors: reliability diagrams, OOD score histograms, sample pictures (image
grids, 2-D energy landscapes, signal line plots, per-feature histograms of rows), shift curves; and saving them.

The callbacks and the evaluation report both draw through this module, so a picture looks the same during training
and in a report. Figures are :class:`matplotlib.figure.Figure` objects with an Agg canvas, never made through
``pyplot``: no window opens, no global figure registry fills up, and several threads (or dataloader workers, or
callbacks) can draw at once. Inputs are what :mod:`jemkit.metrics` computes (per-bin tensors; score tensors ``[N]``)
and samples as tensors; the one function that asks a model for anything, :func:`save_sample_pictures`, asks a JEM
for its samples (``jem.sample``) and its energy.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torch.nn import functional as F
from torchvision.utils import make_grid, save_image

from jemkit.checks import check_integer
from jemkit.data.kinds import input_kind
from jemkit.sampling.domain import domain_of

__all__ = [
    "MAX_FEATURES",
    "MIN_IMAGE_PIXELS",
    "energy_landscape",
    "feature_histograms",
    "ood_histograms",
    "readable_grid",
    "reliability_diagram",
    "sample_pictures",
    "save_figure",
    "save_grid",
    "save_sample_pictures",
    "score_histogram",
    "shift_figure",
    "signal_plot",
]

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
    check_integer("bins", bins)
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


def ood_histograms(
    in_scores: Mapping[str, Tensor],
    out_scores: Mapping[str, Mapping[str, Tensor]],
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    title: str = "OOD score: {score}",
) -> dict[str, Figure]:
    """One :func:`score_histogram` per score: the in-distribution scores ``{score: [N]}`` against each OOD set's
    ``{set: {score: [M]}}``, every set's AUROC (``results[set][score]["auroc"]``) in the legend; ``title`` is
    formatted with the score's name."""
    figures = {}
    for score, values_in in in_scores.items():
        groups = {"in-distribution": values_in.cpu()} | {name: o[score].cpu() for name, o in out_scores.items()}
        aurocs = {name: f"AUROC {results[name][score]['auroc']:.3f}" for name in out_scores}
        figures[score] = score_histogram(groups, title=title.format(score=score), xlabel=score, legend_extra=aurocs)
    return figures


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


# ---------------------------------------------------------------------------------------------- samples
MAX_FEATURES = 12
"""Tabular pictures show at most this many features (those with the largest spread in the data)."""

MIN_IMAGE_PIXELS = 48
"""Small images (digits are 8x8) are enlarged, nearest-neighbour, to at least this many pixels a side."""


@torch.no_grad()
def energy_landscape(
    energy: Callable[[Tensor], Tensor],
    samples: Tensor,
    extent: tuple[float, float] = (-1.0, 1.0),
    resolution: int = 120,
    title: str = "p(x) and samples",
) -> Figure:
    """Unnormalised density ``exp(-E(x))`` of a 2-D energy ``energy: [B, 2] -> [B]`` on a grid over ``extent`` (on
    ``samples``' device), with ``samples [N, 2]`` on top."""
    axis = torch.linspace(extent[0], extent[1], resolution, device=samples.device)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    values = torch.cat([energy(chunk) for chunk in grid.split(4096)]).float()
    density = torch.exp(-(values - values.min())).reshape(resolution, resolution).cpu()
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.imshow(density.numpy(), origin="lower", extent=(*extent, *extent), cmap="viridis")
    pts = samples.float().cpu()
    ax.scatter(pts[:, 0], pts[:, 1], s=4, c="white", alpha=0.6, label="samples")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return fig


def readable_grid(
    images: Tensor, nrow: int, value_range: tuple[float, float] = (-1.0, 1.0), min_pixels: int = MIN_IMAGE_PIXELS
) -> Tensor:
    """``images [N, C, H, W]`` as one grid ``[3, H', W']`` in [0, 1], each image enlarged by an integer factor
    (nearest-neighbour: pixels stay sharp) until its longer side has at least ``min_pixels`` pixels."""
    images = images.detach().float().cpu()
    factor = max(1, math.ceil(min_pixels / max(images.shape[-2:])))
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode="nearest")
    low, high = value_range
    images = ((images - low) / (high - low)).clamp(0, 1)
    return make_grid(images, nrow=nrow, padding=max(2, factor), pad_value=1.0)


def save_grid(grid: Tensor, path: Path, row_labels: list[str] | None = None) -> Path:
    """Save a grid from :func:`readable_grid`; with ``row_labels``, each row is named on the left (matplotlib)."""
    if row_labels is None:
        save_image(grid, path)
        return path
    height, width = grid.shape[1:]
    dpi = 100
    fig = Figure(figsize=(width / dpi + 0.9, height / dpi + 0.1), dpi=dpi)
    ax = fig.add_axes((0.9 / (width / dpi + 0.9), 0.0, width / dpi / (width / dpi + 0.9), 1.0))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    rows = len(row_labels)
    ax.set_yticks([(r + 0.5) * height / rows for r in range(rows)], row_labels)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def signal_plot(samples: Tensor, data: Tensor | None, labels: Tensor | None = None, title: str = "") -> Figure:
    """Signals ``[N, C, L]`` (channel 0 drawn) as lines, one panel per class when ``labels [N]`` are given, with
    ``data [M, C, L]`` in grey behind them for comparison."""
    samples = samples.detach().float().cpu()
    groups = labels.cpu().unique().tolist() if labels is not None else [None]
    cols = min(len(groups), 5)
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.2 * rows))
    for i, group in enumerate(groups):
        ax = fig.add_subplot(rows, cols, i + 1)
        if data is not None:
            for signal in data.detach().float().cpu()[:8, 0]:
                ax.plot(signal.numpy(), color="0.75", linewidth=0.8)
        chosen = samples if group is None else samples[labels.cpu() == group]
        for signal in chosen[:8, 0]:
            ax.plot(signal.numpy(), linewidth=1.0)
        ax.set_title(f"class {group}" if group is not None else "samples (colour) and data (grey)", fontsize=9)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def feature_histograms(samples: Tensor, data: Tensor | None, title: str = "") -> Figure:
    """Per-feature histograms of tabular samples ``[N, D]`` against ``data [M, D]`` (the :data:`MAX_FEATURES`
    features with the largest spread in the data, or in the samples without data)."""
    samples = samples.detach().float().cpu()
    reference = data.detach().float().cpu() if data is not None else samples
    order = reference.std(0).argsort(descending=True)[:MAX_FEATURES].sort().values.tolist()
    cols = min(len(order), 4)
    rows = math.ceil(len(order) / cols)
    fig = Figure(figsize=(3.0 * cols, 2.2 * rows))
    for i, feature in enumerate(order):
        ax = fig.add_subplot(rows, cols, i + 1)
        low, high = float(reference[:, feature].min()), float(reference[:, feature].max())
        low, high = min(low, float(samples[:, feature].min())), max(high, float(samples[:, feature].max()))
        bins = torch.linspace(low, high + 1e-6, 21).numpy()
        if data is not None:
            ax.hist(reference[:, feature].numpy(), bins=bins, density=True, color="0.7", label="data")
        ax.hist(samples[:, feature].numpy(), bins=bins, density=True, histtype="step", linewidth=1.5, label="samples")
        ax.set_title(f"feature {feature}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _warn_no_picture(shape: Sequence[int] | None) -> None:
    warnings.warn(
        f"no sample pictures for inputs shaped {shape}: jemkit draws images [C, H, W], 2-D points [2] (with their "
        "energy), signals [C, L] and tabular rows [D]",
        UserWarning,
        stacklevel=3,
    )


def sample_pictures(
    samples: Mapping[str, Tensor],
    out_dir: str | Path,
    per_class: int,
    value_range: tuple[float, float],
    suffix: str = "",
    data: Tensor | None = None,
    energy: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Path]:
    """Save pictures of ``samples`` in the form that fits one input's shape (:func:`jemkit.data.kinds.input_kind`):
    image grids, the energy landscape of 2-D points (``energy`` needed), line plots of signals or per-feature
    histograms of rows, the last two beside ``data`` (real inputs).

    Args:
        samples: ``{"buffer": [N, *shape], "class": [per_class * C, *shape]}`` (either may be missing), the class
            samples ordered class by class.
        out_dir: folder for ``<name>[_<suffix>].png`` (created).
        per_class: class samples per class (the rows of the class grid).
        value_range: mapped to black..white in grids; the square of the landscape.
        suffix: appended to the file names.
        data: real inputs drawn behind signal and tabular samples.
        energy: ``E(x)`` for the landscape of 2-D points.

    Returns:
        ``{name: path}``; empty, with a warning, for shapes no picture fits.
    """
    shape = tuple(next(iter(samples.values())).shape[1:]) if samples else None
    kind = input_kind(shape)
    if kind is None or (kind == "points" and energy is None):
        _warn_no_picture(shape)
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{suffix}" if suffix else ""
    paths: dict[str, Path] = {}
    if kind == "points":
        figure = energy_landscape(energy, torch.cat(list(samples.values())), value_range)
        paths["landscape"] = save_figure(figure, out / f"landscape{tag}.png")
    elif kind == "image":
        for name, images in samples.items():
            nrow = per_class if name == "class" else max(1, int(len(images) ** 0.5))
            labels = [f"class {c}" for c in range(len(images) // per_class)] if name == "class" else None
            grid = readable_grid(images, nrow, value_range)
            paths[name] = save_grid(grid, out / f"{name}{tag}.png", labels)
    else:
        for name, drawn in samples.items():
            labels = None
            if name == "class":
                labels = torch.arange(len(drawn) // per_class).repeat_interleave(per_class)
            title = "buffer chains" if name == "buffer" else "fresh class-conditional chains"
            if kind == "signal":
                figure = signal_plot(drawn, data, labels, title)
            else:
                figure = feature_histograms(drawn, data, title)
            paths[name] = save_figure(figure, out / f"{name}{tag}.png")
    return paths


def save_sample_pictures(
    jem: Any,
    out_dir: str | Path,
    num_samples: int = 64,
    per_class: int = 8,
    fresh_steps: int | None = None,
    value_range: tuple[float, float] | None = None,
    suffix: str = "",
    data: Tensor | None = None,
) -> dict[str, Path]:
    """Draw a JEM's samples with ``jem.sample`` and save them with :func:`sample_pictures`: ``num_samples`` chains
    continued from the replay buffer (``"buffer"``) and ``per_class`` fresh class-conditional chains per class
    (``"class"``, ``fresh_steps`` steps, by default the JEM's policy for fresh chains). ``value_range`` defaults to
    the JEM's input domain's box. Shared by :class:`~jemkit.callbacks.SampleGrid` and ``jemkit evaluate``."""
    if input_kind(jem.buffer.input_shape) is None:
        _warn_no_picture(jem.buffer.input_shape)
        return {}
    samples = {"buffer": jem.sample(num_samples, source="buffer")}
    if per_class > 0 and jem.num_classes:
        labels = torch.arange(jem.num_classes, device=jem.device).repeat_interleave(per_class)
        samples["class"] = jem.sample(len(labels), y=labels, n_steps=fresh_steps, source="fresh")
    value_range = value_range if value_range is not None else domain_of(jem).bounds()
    return sample_pictures(samples, out_dir, per_class, value_range, suffix, data, jem.energy)


# ---------------------------------------------------------------------------------------------- shift
def shift_figure(section: dict[str, Any]) -> Figure:
    """Accuracy (left) and ECE (right) against severity (0: clean), one thin line per shift and the mean over shifts
    in black; with a temperature, the mean ECE after it dashed. Save it with
    :func:`save_figure`."""
    severities = [0, *section["severities"]]
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_ece = fig.subplots(1, 2)
    for name, rows in section["results"].items():
        for ax, key in ((ax_acc, "accuracy"), (ax_ece, "ece")):
            values = [section["clean"][key], *(rows[str(s)][key] for s in section["severities"])]
            ax.plot(severities, [100 * v for v in values], marker="o", markersize=3, linewidth=1, label=name)
    means = [section["clean"], *(section["by_severity"][str(s)] for s in section["severities"])]
    for ax, key in ((ax_acc, "accuracy"), (ax_ece, "ece")):
        ax.plot(severities, [100 * m[key] for m in means], color="black", linewidth=2.5, label="mean")
        ax.set_xlabel("severity (0: clean)")
        ax.set_xticks(severities)
    if section.get("temperature") is not None:
        ax_ece.plot(
            severities,
            [100 * m["ece_scaled"] for m in means],
            color="black",
            linestyle="--",
            linewidth=2,
            label=f"mean after T={section['temperature']:.2f}",
        )
    ax_acc.set_ylabel("accuracy %")
    ax_ece.set_ylabel("ECE %")
    ax_acc.set_title("Accuracy under shift")
    ax_ece.set_title("Calibration under shift")
    ax_ece.legend(fontsize=7, loc="upper left")
    return fig
