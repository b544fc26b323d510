"""``Chains``: the object that runs a JEM's sampler chains, so that the module only asks for samples.

It owns what decides how a chain runs: the sampler, the replay buffer the chains continue from, how the classifier
behaves while sampling (``sampling_mode``) and whether the sampler step is compiled. The energy is passed in by the
caller, so the same chains serve training (``draw``), free sampling and purification (``start`` + ``refine``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from jemkit.adapters import SamplingMode, sampling_context
from jemkit.sampling.buffer import ReplayBuffer
from jemkit.sampling.compiled import CompiledStep, ConditionalEnergy, resolve_compile_mode
from jemkit.sampling.langevin import SGLD, Sampler, Step

__all__ = ["Chains"]


class Chains:
    """Runs Langevin chains on a classifier's energy: start points from a replay buffer, refined by a sampler.

    The classifier runs as ``sampling_mode`` says while sampling (see :func:`jemkit.adapters.sampling_context`) and is
    left exactly as it was; only input gradients are computed. Works inside ``torch.inference_mode`` too (validation
    callbacks sample).

    Args:
        classifier: the module whose train/eval mode (BatchNorm, Dropout) is switched while sampling.
        sampler: the sampler; default ``SGLD()`` (JEM's settings).
        buffer: the replay buffer; default ``ReplayBuffer()`` (JEM's settings).
        sampling_mode: ``"eval"`` (running statistics, no Dropout) or ``"train"`` (batch statistics, running ones
            protected).
        compile: compile each sampler step into one graph (``True`` or a ``torch.compile`` mode); experimental.

    Example::

        >>> chains = Chains(classifier, SGLD(n_steps=20), ReplayBuffer(capacity=1000, input_shape=(2,)))
        >>> x = chains.draw(energy, 64)  # continue 64 chains from the buffer and write them back
    """

    def __init__(
        self,
        classifier: nn.Module,
        sampler: Sampler | None = None,
        buffer: ReplayBuffer | None = None,
        sampling_mode: SamplingMode = "eval",
        compile: bool | str = False,
    ) -> None:
        if sampling_mode not in ("eval", "train"):
            raise ValueError(f"sampling_mode must be 'eval' or 'train', got {sampling_mode!r}")
        self.classifier = classifier
        self.sampler = sampler if sampler is not None else SGLD()
        self.buffer = buffer if buffer is not None else ReplayBuffer()
        self.sampling_mode = sampling_mode
        self.compile_mode = resolve_compile_mode(compile, self.sampler, classifier, sampling_mode)  # resolved once
        self._compiled: CompiledStep | None = None

    @property
    def compiled(self) -> bool:
        """Whether sampler steps run as one compiled graph."""
        return self.compile_mode is not None

    def start(self, n: int, y: Tensor | None = None, from_buffer: bool = True) -> Tensor:
        """``n`` start points: from the buffer (for labels ``y [n]`` only if it is conditional) or the initial
        distribution. The buffer is left unchanged."""
        if not self.buffer.is_initialized:
            raise RuntimeError(
                "the replay buffer has no input shape yet: train the JEM, load a checkpoint, or pass "
                "buffer=ReplayBuffer(input_shape=...)"
            )
        if from_buffer and (y is None or self.buffer.conditional):
            return self.buffer.sample(n, y)[0]
        return self.buffer.init.sample(n, self.buffer.input_shape, device=self.buffer.samples.device, y=y)

    def draw(self, energy: ConditionalEnergy, n: int, y: Tensor | None = None) -> Tensor:
        """Continue ``n`` chains from the buffer (of classes ``y [n]`` if given), write them back, return them."""
        x0, idx = self.buffer.sample(n, y)
        with self._sampling(energy, y) as (y, step):
            x = self.sampler.sample(lambda z: energy(z, y), x0, step=step).detach()
        self.buffer.update(idx, x)
        return x

    def refine(
        self, energy: ConditionalEnergy, x0: Tensor, y: Tensor | None = None, n_steps: int | None = None
    ) -> Tensor:
        """Run the sampler from ``x0`` for ``n_steps`` (default: the sampler's own) on ``energy(., y)``."""
        with self._sampling(energy, y) as (y, step):
            return self.sampler.sample(lambda z: energy(z, y), x0, n_steps=n_steps, step=step).detach()

    @contextmanager
    def _sampling(self, energy: ConditionalEnergy, y: Tensor | None) -> Iterator[tuple[Tensor | None, Step | None]]:
        """Gradients on, inference mode off, the classifier in its sampling mode; yields the labels (usable in a
        backward) and the compiled step, if any."""
        with torch.inference_mode(False), torch.enable_grad(), sampling_context(self.classifier, self.sampling_mode):
            if y is not None:
                y = y.clone()  # an inference-mode tensor cannot be saved for backward
            yield y, self._step(energy, y)

    def _step(self, energy: ConditionalEnergy, y: Tensor | None) -> Step | None:
        """The compiled ``x -> x'`` for this energy and labels, or ``None`` (the sampler's own eager step)."""
        if self.compile_mode is None:
            return None
        cached = self._compiled
        if cached is None or cached.energy != energy or cached.sampler is not self.sampler:
            cached = self._compiled = CompiledStep(energy, self.sampler, self.compile_mode)
        return lambda x: cached(x, y)

    # Compiled functions close over the original's energy: a copy or an unpickled object compiles its own on first use.
    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"} | {"_compiled": None}

    def __deepcopy__(self, memo: dict[int, object]) -> Chains:
        clone = Chains.__new__(Chains)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return clone

    def __repr__(self) -> str:
        return (
            f"Chains(sampler={self.sampler!r}, buffer_capacity={self.buffer.capacity}, "
            f"sampling_mode={self.sampling_mode!r}, compile_mode={self.compile_mode!r})"
        )
