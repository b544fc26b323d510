"""Opt-in ``torch.compile`` of the sampler's inner loop, the bulk of a JEM step.

Two scopes:

- ``"energy"``: the energy function ``E(x, y)`` is compiled; its input-gradient backward is compiled through
  AOTAutograd, and the sampler's update stays in eager PyTorch. Works with any sampler and any classifier. The
  energy it is given must take its weights detached (see ``JEM._input_energy``): AOTAutograd differentiates a whole
  graph at once and would otherwise compute weight gradients that sampling throws away.
- ``"step"``: one whole sampler update ``x -> x'`` (forward, input gradient, update and noise) becomes a single graph.
  The input gradient is taken with ``torch.func.grad``, which differentiates with respect to ``x`` only and which
  Dynamo traces without a graph break; the sampler must expose its update as ``update(x, grad)`` (SGLD does).
  A compiled ``torch.func.grad`` ignores the backward of custom ``torch.autograd.Function``s (torch 2.14), which some
  classifiers contain (straight-through estimators, gradient reversal): the first compiled step is therefore checked
  against autograd once, and a mismatch warns and falls back to eager sampling.

A compile ``mode`` of ``"reduce-overhead"`` (or ``"max-autotune"``) captures the compiled step as a CUDA graph on a
GPU: a replay launches the whole step at once, removing per-kernel launch overhead. The outputs of a CUDA graph live
in memory that the next replay reuses, so each call marks a new step and returns a copy, as cudagraph trees require.
Only the ``"step"`` scope allows it: with ``"energy"`` the sampler would keep gradients that the next replay
overwrites (MALA does). On the CPU these modes compile without graph capture.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from jemkit.adapters import SamplingMode, has_batchnorm
from jemkit.sampling.amp import energy_for_sampling, sampling_grad_scale
from jemkit.sampling.langevin import EnergyFn, Sampler, energy_and_grad

__all__ = ["COMPILE_MODES", "CompileScope", "CompiledSampling", "resolve_compile_scope"]

_MAX_STEP_GRAD_ERROR = 0.1
"""Largest relative difference between the first compiled step's input gradient and autograd's that passes the
one-time check: generous for bfloat16 rounding, far below the factor-of-two errors of a dropped custom backward."""

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
    mode: str | None = None,
) -> CompileScope | None:
    """Which part of sampling to compile: ``None`` (eager), ``"energy"`` or ``"step"``.

    ``True`` picks the widest scope that works: ``"step"`` for samplers with an ``update`` (SGLD) unless BatchNorm
    layers would update their statistics while sampling (``sampling_mode="train"``), otherwise ``"energy"``. A mode
    that captures CUDA graphs needs the ``"step"`` scope.
    """
    check_compile_mode(mode)
    if compile is False or compile is None:
        return None
    if compile not in (True, "energy", "step"):
        raise ValueError(f"compile must be False, True, 'energy' or 'step', got {compile!r}")
    # torch.func transforms forbid in-place updates of captured tensors such as BatchNorm's running statistics.
    mutates_statistics = sampling_mode == "train" and has_batchnorm(classifier)
    if compile is True:
        scope = "step" if has_update_step(sampler) and not mutates_statistics else "energy"
    elif compile == "step" and not has_update_step(sampler):
        raise ValueError(
            f"compile='step' needs a sampler whose update is `update(x, grad)` (such as SGLD); "
            f"{type(sampler).__name__} has none: use compile='energy'"
        )
    elif compile == "step" and mutates_statistics:
        raise ValueError(
            "compile='step' cannot trace BatchNorm layers that update their running statistics while sampling "
            "(sampling_mode='train'): use sampling_mode='eval' or compile='energy'"
        )
    else:
        scope = compile
    if scope == "energy" and mode in _CUDA_GRAPH_MODES:
        raise ValueError(
            f"compile_mode={mode!r} captures CUDA graphs, which only the 'step' scope supports (here the scope is "
            f"'energy', for {type(sampler).__name__} with sampling_mode={sampling_mode!r}): use compile_mode="
            "'max-autotune-no-cudagraphs' or None, or an SGLD sampler with sampling_mode='eval'"
        )
    return scope


def check_compile_mode(mode: str | None) -> str | None:
    """``None`` or one of ``torch.compile``'s modes."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be None or one of {COMPILE_MODES}, got {mode!r}")
    return mode


class _CompiledStep:
    """One sampler's compiled step, and whether its first result agreed with autograd."""

    def __init__(self, sampler: Sampler, compiled: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]) -> None:
        self.sampler, self.compiled = sampler, compiled
        self.checked = False
        self.fallback = False


class CompiledSampling:
    """Compiled versions of a conditional energy ``energy(x, y)`` and of a sampler step built on it.

    Each compiled function is made once and reused; Dynamo recompiles only for new dtypes or autocast states, and
    for new shapes once: the training batch gets static-shape kernels, and a second batch size (sampling a grid,
    evaluating) makes the batch dimension dynamic (``dynamic=None``). Beyond Dynamo's recompile limit (say, many
    models in one process) a call runs eagerly rather than failing, so ``fullgraph`` is left off; that the step
    traces as one graph without breaks is a test of its own.

    Compiled functions are dropped when the owner is copied or pickled (they close over the original's energy) and
    rebuilt on first use.
    """

    def __init__(self, energy: ConditionalEnergy, mode: str | None = None) -> None:
        self.energy = energy
        self.mode = check_compile_mode(mode)
        self.uses_cuda_graphs = mode in _CUDA_GRAPH_MODES
        self._energy: Callable[[Tensor, Tensor | None], Tensor] | None = None
        self._steps: dict[int, _CompiledStep] = {}

    def __getstate__(self) -> dict[str, object]:
        return {"energy": self.energy, "mode": self.mode}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["energy"], state["mode"])

    def __deepcopy__(self, memo: dict[int, object]) -> CompiledSampling:
        return CompiledSampling(copy.deepcopy(self.energy, memo), self.mode)

    def _compile(self, fn: Callable) -> Callable:
        return torch.compile(fn, mode=self.mode)

    def energy_fn(self, y: Tensor | None) -> EnergyFn:
        """The compiled ``x -> E(x, y)``; differentiable, for samplers that take input gradients themselves."""
        if self.uses_cuda_graphs:
            raise ValueError(f"compile_mode={self.mode!r} captures CUDA graphs, which only the 'step' scope supports")
        if self._energy is None:
            self._energy = self._compile(partial(energy_for_sampling, self.energy))
        compiled = self._energy
        return lambda x: compiled(x, y)

    def make_step(self, sampler: Sampler) -> Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]:
        """The function that is compiled: ``(x, y) -> (sampler.update(x, g), g)`` with ``g = dE(x, y)/dx``."""
        energy = self.energy

        def step(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
            # Under float16 autocast the backward runs `scale` times larger (see jemkit.sampling.amp); the gradient
            # arrives at the float32 input and is unscaled there, exactly.
            scale = sampling_grad_scale(x.device.type)
            grad = torch.func.grad(lambda z: energy(z, y).sum() * scale)(x)
            if scale != 1.0:
                grad = grad / scale
            return sampler.update(x, grad), grad

        return step

    def step_fn(self, sampler: Sampler, y: Tensor | None) -> Callable[[Tensor], Tensor]:
        """The compiled ``x -> sampler.update(x, dE(x, y)/dx)``: one whole sampler step as one graph."""
        if not has_update_step(sampler):
            raise ValueError(f"{type(sampler).__name__} has no `update(x, grad)` step to compile")
        entry = self._steps.get(id(sampler))
        if entry is None or entry.sampler is not sampler:
            entry = self._steps[id(sampler)] = _CompiledStep(sampler, self._compile(self.make_step(sampler)))

        def eager_grad(x: Tensor) -> Tensor:
            return energy_and_grad(lambda z: energy_for_sampling(self.energy, z, y), x)[1]

        def run(x: Tensor) -> Tensor:
            if entry.fallback:
                return sampler.update(x, eager_grad(x))
            # Under no_grad the outer autograd records nothing (no graph through the weights); torch.func.grad still
            # differentiates with respect to x, because a function transform ignores the surrounding no_grad.
            with torch.no_grad():
                if self.uses_cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                new_x, grad = entry.compiled(x, y)
                if not entry.checked:
                    entry.checked = True
                    reference = eager_grad(x)
                    if not self._agrees_with_autograd(grad, reference):
                        entry.fallback = True
                        return sampler.update(x, reference)
            return new_x.clone() if self.uses_cuda_graphs else new_x

        return run

    @staticmethod
    def _agrees_with_autograd(grad: Tensor, reference: Tensor) -> bool:
        """One-time check of the compiled step (one host sync): warn and return False on a mismatch."""
        scale = reference.float().norm().clamp_min(torch.finfo(torch.float32).tiny)
        error = float((grad.float() - reference.float()).norm() / scale)
        if error <= _MAX_STEP_GRAD_ERROR:
            return True
        warnings.warn(
            f"the compiled SGLD step's input gradients differ from autograd's (relative error {error:.3g}); the "
            "classifier probably contains a custom torch.autograd.Function, whose backward a compiled "
            "torch.func.grad ignores. Sampling falls back to eager PyTorch; compile='energy' keeps it compiled.",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
