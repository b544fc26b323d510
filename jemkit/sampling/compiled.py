"""Opt-in ``torch.compile`` of the sampler's inner loop, the bulk of a JEM step.

Two scopes:

- ``"energy"``: the energy function ``E(x, y)`` is compiled; its input-gradient backward is compiled through
  AOTAutograd, and the sampler's update stays in eager PyTorch. Works with any sampler and any classifier.
- ``"step"``: one whole sampler update ``x -> x'`` (forward, input gradient, update and noise) becomes a single graph.
  The input gradient is taken with ``torch.func.grad``, which differentiates with respect to ``x`` only and which
  Dynamo traces without a graph break; the sampler must expose its update as ``update(x, grad)`` (SGLD does).

A compile ``mode`` of ``"reduce-overhead"`` (or ``"max-autotune"``) captures the compiled graph as a CUDA graph on a
GPU: a replay launches the whole step at once, removing per-kernel launch overhead. The outputs of a CUDA graph live
in memory that the next replay reuses, so each call marks a new step and returns a copy, as cudagraph trees require.
On the CPU these modes compile without graph capture.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from jemkit.adapters import SamplingMode, has_batchnorm
from jemkit.sampling.amp import energy_for_sampling, sampling_grad_scale
from jemkit.sampling.langevin import EnergyFn, Sampler

__all__ = ["COMPILE_MODES", "CompileScope", "CompiledSampling", "resolve_compile_scope"]

CompileScope = Literal["energy", "step"]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

ConditionalEnergy = Callable[[Tensor, Tensor | None], Tensor]
"""``energy(x, y) -> [B]``: ``E(x)`` when ``y`` is ``None``, else ``E(x, y)``."""


def has_update_step(sampler: Sampler) -> bool:
    """Whether the sampler's update is a pure function ``update(x, grad) -> x'`` that can be compiled whole."""
    return callable(getattr(sampler, "update", None))


def resolve_compile_scope(
    compile: bool | str,
    sampler: Sampler,
    classifier: nn.Module,
    sampling_mode: SamplingMode,
) -> CompileScope | None:
    """Which part of sampling to compile: ``None`` (eager), ``"energy"`` or ``"step"``.

    ``True`` picks the widest scope that works: ``"step"`` for samplers with an ``update`` (SGLD) unless BatchNorm
    layers would update their statistics while sampling (``sampling_mode="train"``), otherwise ``"energy"``.
    """
    if compile is False or compile is None:
        return None
    if compile not in (True, "energy", "step"):
        raise ValueError(f"compile must be False, True, 'energy' or 'step', got {compile!r}")
    # torch.func transforms forbid in-place updates of captured tensors such as BatchNorm's running statistics.
    mutates_statistics = sampling_mode == "train" and has_batchnorm(classifier)
    if compile is True:
        return "step" if has_update_step(sampler) and not mutates_statistics else "energy"
    if compile == "step":
        if not has_update_step(sampler):
            raise ValueError(
                f"compile='step' needs a sampler whose update is `update(x, grad)` (such as SGLD); "
                f"{type(sampler).__name__} has none: use compile='energy'"
            )
        if mutates_statistics:
            raise ValueError(
                "compile='step' cannot trace BatchNorm layers that update their running statistics while sampling "
                "(sampling_mode='train'): use sampling_mode='eval' or compile='energy'"
            )
    return compile


def check_compile_mode(mode: str | None) -> str | None:
    """``None`` or one of ``torch.compile``'s modes."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be None or one of {COMPILE_MODES}, got {mode!r}")
    return mode


class CompiledSampling:
    """Compiled versions of a conditional energy ``energy(x, y)`` and of a sampler step built on it.

    Each compiled function is made once and reused; Dynamo recompiles only for new dtypes or autocast states, and
    for new shapes once: the training batch gets static-shape kernels, and a second batch size (sampling a grid,
    evaluating) makes the batch dimension dynamic (``dynamic=None``). Beyond Dynamo's recompile limit (say, many
    models in one process) a call runs eagerly rather than failing, so ``fullgraph`` is left off; that the step
    traces as one graph without breaks is a test of its own.
    """

    def __init__(self, energy: ConditionalEnergy, mode: str | None = None) -> None:
        self.energy = energy
        self.mode = check_compile_mode(mode)
        self.uses_cuda_graphs = mode in _CUDA_GRAPH_MODES
        self._energy: Callable[[Tensor, Tensor | None], Tensor] | None = None
        self._steps: dict[int, tuple[Sampler, Callable[[Tensor, Tensor | None], Tensor]]] = {}

    def _compile(self, fn: Callable) -> Callable:
        return torch.compile(fn, mode=self.mode)

    def _run(self, fn: Callable[[Tensor, Tensor | None], Tensor], x: Tensor, y: Tensor | None) -> Tensor:
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return fn(x, y).clone()
        return fn(x, y)

    def energy_fn(self, y: Tensor | None) -> EnergyFn:
        """The compiled ``x -> E(x, y)``; differentiable, for samplers that take input gradients themselves."""
        if self._energy is None:
            self._energy = self._compile(partial(energy_for_sampling, self.energy))
        compiled = self._energy
        return lambda x: self._run(compiled, x, y)

    def make_step(self, sampler: Sampler) -> Callable[[Tensor, Tensor | None], Tensor]:
        """The function that is compiled: ``(x, y) -> sampler.update(x, dE(x, y)/dx)``, eager until compiled."""
        energy = self.energy

        def step(x: Tensor, y: Tensor | None) -> Tensor:
            # Under float16 autocast the backward runs `scale` times larger (see jemkit.sampling.amp); the gradient
            # arrives at the float32 input and is unscaled there, exactly.
            scale = sampling_grad_scale(x.device.type)
            grad = torch.func.grad(lambda z: energy(z, y).sum() * scale)(x)
            return sampler.update(x, grad / scale if scale != 1.0 else grad)

        return step

    def step_fn(self, sampler: Sampler, y: Tensor | None) -> Callable[[Tensor], Tensor]:
        """The compiled ``x -> sampler.update(x, dE(x, y)/dx)``: one whole sampler step as one graph."""
        if not has_update_step(sampler):
            raise ValueError(f"{type(sampler).__name__} has no `update(x, grad)` step to compile")
        cached = self._steps.get(id(sampler))
        if cached is None or cached[0] is not sampler:
            cached = self._steps[id(sampler)] = (sampler, self._compile(self.make_step(sampler)))
        compiled = cached[1]

        def run(x: Tensor) -> Tensor:
            # Under no_grad the outer autograd records nothing (no graph through the weights); torch.func.grad still
            # differentiates with respect to x, because a function transform ignores the surrounding no_grad.
            with torch.no_grad():
                return self._run(compiled, x, y)

        return run
