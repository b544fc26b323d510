"""Draw a JEM's samples and save them as pictures: image grids, or the energy landscape for 2-D data.

Shared by the :class:`~jemkit.callbacks.SampleGrid` callback and ``jemkit evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import save_image

from jemkit.evaluate.plots import save_figure

__all__ = ["draw_samples", "energy_landscape", "save_sample_grids"]


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


def save_sample_grids(
    jem: Any,
    out_dir: str | Path,
    num_samples: int = 64,
    per_class: int = 8,
    fresh_steps: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    suffix: str = "",
) -> dict[str, Path]:
    """Draw samples and save them: image grids (``buffer_<suffix>.png``, ``class_<suffix>.png``, one row per class)
    for image data, an energy landscape (``landscape_<suffix>.png``) for 2-D data. Returns ``{name: path}``."""
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
            paths[name] = out / f"{name}{tag}.png"
            save_image(images.float().cpu(), paths[name], nrow=nrow, normalize=True, value_range=value_range)
    return paths
