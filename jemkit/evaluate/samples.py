"""The samples section of the report: pictures of the JEM's samples (:func:`jemkit.pictures.save_sample_pictures`),
drawn by its one sampling policy (:meth:`jemkit.JEM.sample`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from jemkit.checks import check_integer
from jemkit.pictures import save_sample_pictures

__all__ = ["SampleOptions", "samples_section"]


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


def samples_section(jem: Any, test_set: Dataset, options: SampleOptions, out: Path) -> dict[str, str]:
    """The sample pictures (``{"samples_<name>": path}``) of a JEM whose buffer holds chains; none otherwise. The
    first test inputs are drawn beside signal and tabular samples."""
    buffer = getattr(jem, "buffer", None)
    if options.per_class == 0 or buffer is None or not buffer.is_initialized:
        return {}
    data = torch.stack([test_set[i][0] for i in range(min(len(test_set), 64))])
    paths = save_sample_pictures(
        jem, out, num_samples=options.num_samples, per_class=options.per_class, suffix="eval", data=data
    )
    return {f"samples_{name}": str(path) for name, path in paths.items()}
