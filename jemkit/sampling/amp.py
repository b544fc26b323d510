"""Input gradients under float16 autocast (``precision="16-mixed"``): keep the sampler's backward in range.

float16 holds magnitudes from about 6e-5 (6e-8 with lost precision) to 65504. The backward of an energy starts at
softmax probabilities, at most 1 per sample, and is often much smaller inside the network, so under float16 autocast
the sampler's input gradients lose their precision or vanish. Lightning's ``GradScaler`` scales the loss, so it
protects the weight gradients but not these. The sampler's backward gets the same treatment: the summed energy is
multiplied by a power of two before the backward and the gradient divided by it at the float32 input (exactly), so
the energies and their input gradients are unchanged and only the float16 gradients in between are moved into range.
Every sampler, and the unrolled refinement of :mod:`jemkit.sampling.unrolled`, takes its input gradient through
:func:`jemkit.sampling.langevin.energy_and_grad`, so the scaling lives there only.
bfloat16 has float32's exponent range and is left alone.
"""

from __future__ import annotations

import torch

__all__ = ["FP16_SAMPLING_GRAD_SCALE", "is_fp16_autocast", "sampling_grad_scale"]

FP16_SAMPLING_GRAD_SCALE = 2.0**10
"""Per-sample energy gradients start at most at 1; 1024 lifts gradients down to 6e-8 into float16's normal range
while leaving a factor of 60 below its maximum for gradients that grow on their way through the network."""


def is_fp16_autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` with float16 (Lightning's ``"16-mixed"``)."""
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16


def sampling_grad_scale(device_type: str) -> float:
    """The factor the sampler's backward is scaled by: ``FP16_SAMPLING_GRAD_SCALE`` under float16 autocast, else 1."""
    return FP16_SAMPLING_GRAD_SCALE if is_fp16_autocast(device_type) else 1.0
