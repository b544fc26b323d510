"""Input complexity: how many bits a general-purpose lossless compressor needs for an input (Serrà et al., ICLR 2020).

Densities famously rank simple inputs as likely: a model of Fashion-MNIST gives MNIST's digits, mostly black, a
higher likelihood than clothes (Nalisnick et al. 2019). Serrà et al. correct the likelihood by the input's complexity
``L(x)``, its compressed length, which needs no OOD data: an input whose likelihood is high only because it is simple
is caught. jemkit uses it as one part of the ``logpx_ic`` score (:data:`jemkit.ood.scores.FUSED_RULES`): ``log p(x)``
and ``L(x)``, each standardised on in-distribution reference inputs, summed. It helps against simpler OOD inputs and
hurts against more complex ones (blends of two inputs, noise), which ``logpx`` alone catches; both are reported.

Inputs are quantised to 256 levels across the input domain's box (:class:`~jemkit.sampling.InputDomain`), then
compressed as PNG (images of one or three channels: PNG's filters see the two dimensions) or with DEFLATE (anything
else). The compression runs on the CPU, one input at a time: about 60 microseconds for a 28x28 image.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor
from torchvision.io import encode_png

__all__ = ["input_complexity"]


def input_complexity(x: Tensor, domain: object | None = None) -> Tensor:
    """Bits per value of each input ``x [B, ...]`` compressed losslessly: float32 ``[B]`` on ``x``'s device.

    ``domain`` (an :class:`~jemkit.sampling.InputDomain`, a JEM's ``domain``) maps the inputs to its unit box before
    quantising; without one the box is ``[-1, 1]``."""
    if x.dim() < 2:
        raise ValueError(f"input_complexity expects a batch [B, ...], got shape {tuple(x.shape)}")
    units = domain.to_unit(x.detach()) if domain is not None else x.detach()
    levels = ((units.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()
    png = levels.dim() == 4 and levels.shape[1] in (1, 3)
    sizes = [
        len(encode_png(item, compression_level=9)) if png else len(zlib.compress(item.numpy().tobytes(), 9))
        for item in levels
    ]
    values = levels[0].numel()
    return (torch.tensor(sizes, dtype=torch.float32) * 8.0 / values).to(x.device)
