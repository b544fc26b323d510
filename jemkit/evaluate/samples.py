"""Draw a JEM's samples and save them as pictures in a form that fits the input's shape.

- images ``[C, H, W]``: grids (chains from the replay buffer; one row per class from fresh chains);
- 2-D points ``[2]``: the energy landscape ``exp(-E(x))`` with the samples on top;
- 1-D signals ``[C, L]``: line plots of samples against data, one panel per class;
- tabular rows ``[D]``: per-feature histograms of samples against data.

Value ranges come from the JEM's input domain (the box fitted on training data). Shared by the
:class:`~jemkit.callbacks.SampleGrid` callback and ``jemkit evaluate``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.utils import make_grid, save_image

from jemkit.checks import check_integer
from jemkit.evaluate.plots import save_figure
from jemkit.sampling.domain import domain_of

if TYPE_CHECKING:
    from jemkit.module import JEM

__all__ = [
    "SOURCES",
    "SampleOptions",
    "draw",
    "draw_samples",
    "energy_landscape",
    "feature_histograms",
    "picture_kind",
    "readable_grid",
    "save_grid",
    "save_sample_grids",
    "signal_plot",
    "source_steps",
]

SOURCES = ("buffer", "fresh")
"""Where samples come from: chains continued from the replay buffer, or new chains from the initial distribution."""


@dataclass
class SampleOptions:
    """The sample pictures of the evaluation.

    Args:
        per_class: class-conditional samples per class in the picture of fresh chains (0: no pictures).
        num_samples: chains continued from the replay buffer in the buffer picture.
    """

    per_class: int = 8
    num_samples: int = 64

    def check(self) -> None:
        check_integer("per_class", self.per_class, minimum=0)
        check_integer("num_samples", self.num_samples)


MAX_FEATURES = 12
"""Tabular pictures show at most this many features (those with the largest spread in the data)."""

MIN_IMAGE_PIXELS = 48
"""Small images (digits are 8x8) are enlarged, nearest-neighbour, to at least this many pixels a side."""


@contextmanager
def _no_restarts(jem: nn.Module) -> Iterator[None]:
    """Buffer samples as the buffer holds them: no ``reinit_prob`` restarts from the initial distribution mixed in."""
    buffer = getattr(jem, "buffer", None)
    prob = getattr(buffer, "reinit_prob", None)
    if prob is None:
        yield
        return
    buffer.reinit_prob = 0.0
    try:
        yield
    finally:
        buffer.reinit_prob = prob


def source_steps(jem: JEM, source: str, fresh_steps: int | None = None) -> int:
    """Sampler steps run for ``source``: the sampler's own for buffer chains, ``fresh_steps`` (default 5x the
    sampler's) for fresh ones."""
    if source == "buffer":
        return int(jem.sampler.n_steps)
    return int(fresh_steps) if fresh_steps is not None else 5 * int(jem.sampler.n_steps)


def draw(jem: JEM, source: str, n: int, steps: int, y: Tensor | None = None) -> Tensor:
    """``n`` samples from ``source``, the one way pictures, FID and IS draw them: ``"buffer"`` continues stored
    chains for ``steps`` steps (no random restarts, so the picture shows what the buffer holds), ``"fresh"`` starts
    new chains from the initial distribution and runs ``steps`` steps; class-conditional with labels ``y [n]``."""
    if source == "buffer":
        with _no_restarts(jem):
            return jem.sample(n, y=y, n_steps=steps, from_buffer=True)
    if source == "fresh":
        return jem.sample(n, y=y, n_steps=steps, from_buffer=False)
    raise ValueError(f"unknown sample source {source!r}; expected one of {SOURCES}")


def draw_samples(
    jem: JEM, num_samples: int = 64, per_class: int = 8, fresh_steps: int | None = None
) -> dict[str, Tensor]:
    """``{"buffer": [num_samples, ...], "class": [per_class * C, ...]}`` by :func:`draw`: chains continued from the
    replay buffer, and class-conditional chains from the initial distribution (``fresh_steps``, default 5x the
    sampler's steps), ordered class by class."""
    samples = {"buffer": draw(jem, "buffer", num_samples, source_steps(jem, "buffer"))}
    if per_class > 0 and jem.num_classes:
        labels = torch.arange(jem.num_classes, device=jem.device).repeat_interleave(per_class)
        samples["class"] = draw(jem, "fresh", len(labels), source_steps(jem, "fresh", fresh_steps), y=labels)
    return samples


@torch.no_grad()
def energy_landscape(
    jem: JEM,
    samples: Tensor,
    extent: tuple[float, float] = (-1.0, 1.0),
    resolution: int = 120,
    title: str = "p(x) and samples",
) -> Figure:
    """Unnormalised density ``exp(-E(x))`` of a 2-D JEM on a grid, with ``samples [N, 2]`` on top."""
    axis = torch.linspace(extent[0], extent[1], resolution, device=jem.device)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    energy = torch.cat([jem.energy(chunk) for chunk in grid.split(4096)]).float()
    density = torch.exp(-(energy - energy.min())).reshape(resolution, resolution).cpu()
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


def picture_kind(shape: tuple[int, ...] | None) -> str | None:
    """``"image"``, ``"points"``, ``"signal"``, ``"tabular"`` or ``None`` (no picture fits) for one input's shape."""
    if shape is None:
        return None
    if len(shape) == 3:
        return "image"
    if len(shape) == 2:
        return "signal"
    if len(shape) == 1:
        return "points" if shape[0] == 2 else "tabular"
    return None


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


def _domain_range(jem: JEM) -> tuple[float, float]:
    return domain_of(jem).bounds()


def save_sample_grids(
    jem: JEM,
    out_dir: str | Path,
    num_samples: int = 64,
    per_class: int = 8,
    fresh_steps: int | None = None,
    value_range: tuple[float, float] | None = None,
    suffix: str = "",
    data: Tensor | None = None,
) -> dict[str, Path]:
    """Draw samples and save pictures that fit the input's shape (see the module docstring); ``data`` (real inputs)
    are drawn beside signals and tabular samples. Small images are enlarged to :data:`MIN_IMAGE_PIXELS`;
    ``value_range`` (default: the input domain's box) maps to black..white or bounds the landscape. Returns
    ``{name: path}``; warns, and saves nothing, for shapes no picture fits."""
    shape = jem.buffer.input_shape
    kind = picture_kind(shape)
    if kind is None:
        warnings.warn(
            f"no sample pictures for inputs shaped {shape}: jemkit draws images [C, H, W], 2-D points [2], signals "
            "[C, L] and tabular rows [D]",
            UserWarning,
            stacklevel=2,
        )
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    value_range = value_range if value_range is not None else _domain_range(jem)
    samples = draw_samples(jem, num_samples, per_class, fresh_steps)
    tag = f"_{suffix}" if suffix else ""
    paths: dict[str, Path] = {}
    if kind == "points":
        figure = energy_landscape(jem, torch.cat(list(samples.values())), value_range)
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
