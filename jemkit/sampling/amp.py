"""Input gradients under float16 autocast (``precision="16-mixed"``): keep the sampler's backward in range.

float16 holds magnitudes from about 6e-5 (6e-8 with lost precision) to 65504. The backward of an energy starts at
softmax probabilities, at most 1 per sample, and is often much smaller inside the network, so under float16 autocast
the sampler's input gradients lose their precision or vanish. Lightning's ``GradScaler`` scales the loss, so it
protects the weight gradients but not these. The sampler's backward gets the same treatment: it is multiplied by a
constant where it enters (at the energy) and divided where it leaves (at the float32 input), so the energies and
their input gradients are unchanged and only the float16 gradients in between are moved into range.
bfloat16 has float32's exponent range and is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FP16_SAMPLING_GRAD_SCALE",
    "energy_for_sampling",
    "is_fp16_autocast",
    "sampling_grad_scale",
    "scale_gradient",
]

FP16_SAMPLING_GRAD_SCALE = 2.0**10
"""Per-sample energy gradients start at most at 1; 1024 lifts gradients down to 6e-8 into float16's normal range
while leaving a factor of 60 below its maximum for gradients that grow on their way through the network."""


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``factor``. Written with
    ``setup_context`` so that ``torch.func.grad`` and ``torch.compile`` can trace it."""

    @staticmethod
    def forward(x: Tensor, factor: float) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float], output: Tensor) -> None:
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` itself in the forward pass; its gradient is multiplied by ``factor`` in the backward pass."""
    return _ScaleGradient.apply(x, factor)


def is_fp16_autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` with float16 (Lightning's ``"16-mixed"``)."""
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16


def sampling_grad_scale(device_type: str) -> float:
    """The factor the sampler's backward is scaled by: ``FP16_SAMPLING_GRAD_SCALE`` under float16 autocast, else 1."""
    return FP16_SAMPLING_GRAD_SCALE if is_fp16_autocast(device_type) else 1.0


def energy_for_sampling(energy: Callable[[Tensor, Tensor | None], Tensor], x: Tensor, y: Tensor | None) -> Tensor:
    """``energy(x, y)``, with the backward between the energy and ``x`` scaled by :func:`sampling_grad_scale`.

    For autograd (``torch.autograd.grad``, eager or compiled). A compiled ``torch.func.grad`` drops the backward of
    custom autograd Functions (torch 2.14), so a compiled step scales its energy and unscales its gradient itself.
    """
    scale = sampling_grad_scale(x.device.type)
    if scale == 1.0:
        return energy(x, y)
    return scale_gradient(energy(scale_gradient(x, 1.0 / scale), y), scale)
