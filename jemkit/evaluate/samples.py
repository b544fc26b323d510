"""Draw a JEM's samples and save them as pictures: image grids, or the energy landscape for 2-D data.

Shared by the :class:`~jemkit.callbacks.SampleGrid` callback and ``jemkit evaluate``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.nn import functional as F
from torchvision.utils import make_grid, save_image

from jemkit.evaluate.plots import save_figure

__all__ = ["draw_samples", "energy_landscape", "readable_grid", "save_grid", "save_sample_grids"]

MIN_IMAGE_PIXELS = 48
"""Small images (digits are 8x8) are enlarged, nearest-neighbour, to at least this many pixels a side."""


def draw_samples(
    jem: Any, num_samples: int = 64, per_class: int = 8, fresh_steps: int | None = None
) -> dict[str, Tensor]:
    """``{"buffer": [num_samples, ...], "class": [per_class * C, ...]}``: chains continued from the replay buffer,
    and class-conditional chains from the initial distribution (``fresh_steps``, default 5x the sampler's steps),
    ordered class by class."""
    samples = {"buffer": jem.sample(num_samples, from_buffer=True)}
    if per_class > 0 and jem.num_classes:
        labels = torch.arange(jem.num_classes, device=jem.device).repeat_interleave(per_class)
        steps = fresh_steps if fresh_steps is not None else 5 * jem.sampler.n_steps
        samples["class"] = jem.sample(len(labels), y=labels, n_steps=steps, from_buffer=False)
    return samples


@torch.no_grad()
def energy_landscape(
    jem: Any,
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


def save_sample_grids(
    jem: Any,
    out_dir: str | Path,
    num_samples: int = 64,
    per_class: int = 8,
    fresh_steps: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    suffix: str = "",
) -> dict[str, Path]:
    """Draw samples and save them: image grids (``buffer_<suffix>.png``, ``class_<suffix>.png``, one labelled row
    per class; small images enlarged to :data:`MIN_IMAGE_PIXELS`) for image data, an energy landscape
    (``landscape_<suffix>.png``) for 2-D data. Returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = jem.buffer.input_shape
    samples = draw_samples(jem, num_samples, per_class, fresh_steps)
    tag = f"_{suffix}" if suffix else ""
    paths: dict[str, Path] = {}
    if shape is not None and len(shape) == 1 and shape[0] == 2:
        paths["landscape"] = save_figure(
            energy_landscape(jem, torch.cat(list(samples.values())), value_range), out / f"landscape{tag}.png"
        )
    elif shape is not None and len(shape) == 3:
        for name, images in samples.items():
            nrow = per_class if name == "class" else max(1, int(len(images) ** 0.5))
            labels = [f"class {c}" for c in range(len(images) // per_class)] if name == "class" else None
            grid = readable_grid(images, nrow, value_range)
            paths[name] = save_grid(grid, out / f"{name}{tag}.png", labels)
    return paths
