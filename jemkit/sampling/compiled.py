"""Opt-in ``torch.compile`` of one whole sampler step, the bulk of a JEM step. Experimental until measured on a GPU.

One sampler update ``x -> x'`` (the classifier's forward, the input gradient, the update, noise and clipping) becomes
a single graph. The input gradient is taken with ``torch.func.grad`` (``energy_and_grad(..., functional=True)``),
which differentiates with respect to ``x`` only and which Dynamo traces without a graph break; the sampler must expose
its update as ``update(x, grad)`` (SGLD does). A compiled ``torch.func.grad`` ignores the backward of custom
``torch.autograd.Function``s (torch 2.14), which some classifiers contain (straight-through estimators, gradient
reversal): the first compiled step is therefore checked against autograd once, and a mismatch warns and falls back to
eager sampling.

A compile mode of ``"reduce-overhead"`` (or ``"max-autotune"``) captures the compiled step as a CUDA graph on a GPU: a
replay launches the whole step at once, removing per-kernel launch overhead. The outputs of a CUDA graph live in
memory that the next replay reuses, so each call marks a new step and returns a copy, as cudagraph trees require. On
the CPU these modes compile without graph capture.

A second scope that compiled only the energy function was measured 2x slower than eager on the CPU and never on a GPU;
it was removed rather than kept unmeasured.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from jemkit.classifier import SamplingMode, has_batchnorm
from jemkit.sampling.langevin import Sampler, energy_and_grad

__all__ = ["COMPILE_MODES", "CompiledStep", "ConditionalEnergy", "resolve_compile_mode"]

_MAX_STEP_GRAD_ERROR = 0.1
"""Largest relative difference between the first compiled step's input gradient and autograd's that passes the
one-time check: generous for bfloat16 rounding, far below the factor-of-two errors of a dropped custom backward."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

ConditionalEnergy = Callable[[Tensor, Tensor | None], Tensor]
"""``energy(x, y) -> [B]``: ``E(x)`` when ``y`` is ``None``, else ``E(x, y)``."""


def resolve_compile_mode(
    compile: bool | str, sampler: Sampler, classifier: nn.Module, sampling_mode: SamplingMode
) -> str | None:
    """``torch.compile``'s mode for the sampler step (``"default"`` for ``True``), or ``None`` for eager sampling.

    Raises ``ValueError`` where the step cannot be compiled: samplers without ``update(x, grad)`` (MALA), and BatchNorm
    layers that update their running statistics while sampling (``torch.func`` forbids the in-place update).
    """
    if compile is False or compile is None:
        return None
    mode = "default" if compile is True else compile
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be a bool or one of {COMPILE_MODES}, got {compile!r}")
    if sampler.steps_through_first_layer:
        raise ValueError("compile does not take PYLD's inner (YOPO) steps: use inner_steps=1 or compile=False")
    if not sampler.has_pure_step:
        raise ValueError(
            f"compile needs a sampler whose update is `update(x, grad)` (such as SGLD); {type(sampler).__name__} has "
            "none: sample eagerly (compile=False)"
        )
    if sampling_mode == "train" and has_batchnorm(classifier):
        raise ValueError(
            "compile cannot trace BatchNorm layers that update their running statistics while sampling "
            "(sampling_mode='train'; 'auto' picks 'train' for BatchNorm): use sampling_mode='eval' or compile=False"
        )
    return mode


class CompiledStep:
    """``step(x, y) -> sampler.update(x, dE(x, y)/dx)`` compiled as one graph, for one energy and one sampler.

    Dynamo recompiles only for new dtypes or autocast states, and for new shapes once: the training batch gets
    static-shape kernels, and a second batch size (sampling a grid, evaluating) makes the batch dimension dynamic.
    Beyond Dynamo's recompile limit (say, many models in one process) a call runs eagerly rather than failing, so
    ``fullgraph`` is left off; that the step traces as one graph without breaks is a test of its own.

    Args:
        energy: the conditional energy ``energy(x, y) -> [B]``.
        sampler: a sampler with ``update(x, grad)``.
        mode: ``torch.compile``'s mode.
    """

    def __init__(self, energy: ConditionalEnergy, sampler: Sampler, mode: str = "default") -> None:
        if not sampler.has_pure_step:
            raise ValueError(f"{type(sampler).__name__} has no `update(x, grad)` step to compile")
        self.energy, self.sampler, self.mode = energy, sampler, mode
        self.uses_cuda_graphs = mode in _CUDA_GRAPH_MODES
        self.compiled = torch.compile(self.step, mode=mode)
        self.checked = False  # the first compiled result is compared with autograd once
        self.fallback = False  # the comparison failed: run eagerly from then on

    def step(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """The function that is compiled: ``(x, y) -> (sampler.update(x, g), g)`` with ``g = dE(x, y)/dx``."""
        grad = energy_and_grad(lambda z: self.energy(z, y), x, functional=True)[1]
        return self.sampler.update(x, grad), grad

    def _eager_grad(self, x: Tensor, y: Tensor | None) -> Tensor:
        return energy_and_grad(lambda z: self.energy(z, y), x)[1]

    def __call__(self, x: Tensor, y: Tensor | None) -> Tensor:
        if self.fallback:
            return self.sampler.update(x, self._eager_grad(x, y))
        # Under no_grad the outer autograd records nothing (no graph through the weights); torch.func.grad still
        # differentiates with respect to x, because a function transform ignores the surrounding no_grad.
        with torch.no_grad():
            if self.uses_cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            new_x, grad = self.compiled(x, y)
            if not self.checked:
                self.checked = True
                reference = self._eager_grad(x, y)
                if not _agrees_with_autograd(grad, reference):
                    self.fallback = True
                    return self.sampler.update(x, reference)
        return new_x.clone() if self.uses_cuda_graphs else new_x


def _agrees_with_autograd(grad: Tensor, reference: Tensor) -> bool:
    """One-time check of the compiled step (one host sync): warn and return False on a mismatch."""
    scale = reference.float().norm().clamp_min(torch.finfo(torch.float32).tiny)
    error = float((grad.float() - reference.float()).norm() / scale)
    if error <= _MAX_STEP_GRAD_ERROR:
        return True
    warnings.warn(
        f"the compiled sampler step's input gradients differ from autograd's (relative error {error:.3g}); the "
        "classifier probably contains a custom torch.autograd.Function, whose backward a compiled torch.func.grad "
        "ignores. Sampling falls back to eager PyTorch.",
        RuntimeWarning,
        stacklevel=4,
    )
    return False
