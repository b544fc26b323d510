"""``Chains``: the object that runs a JEM's sampler chains, so that the module only asks for samples.

It owns what decides how a chain runs: the sampler, the replay buffer the chains continue from (its size, its shards
under DDP, its initial distribution and the fitting of it), the input domain the chains live in, how the classifier
behaves while sampling (``sampling_mode``) and whether the sampler step is compiled. The energy is passed in by the
caller, so the same chains serve training (``draw``), free sampling and purification (``start`` + ``refine``).

Chains run in the domain's unit coordinates (:class:`~jemkit.sampling.InputDomain`), where the data's box is
``[-1, 1]``: the buffer stores them, the initial distributions draw them and the sampler's settings are in their
units, so one setting fits data of any scale. Inputs and outputs of every public method are in the data's units.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from jemkit.batches import class_labels, unpack_batch
from jemkit.checks import check_choice, check_integer, check_label_count
from jemkit.classifier import resolve_sampling_mode, sampling_context
from jemkit.sampling.buffer import ReplayBuffer
from jemkit.sampling.compiled import CompiledStep, ConditionalEnergy, resolve_compile_mode
from jemkit.sampling.domain import InputDomain
from jemkit.sampling.langevin import SGLD, EnergyFn, FirstLayer, Sampler, Step

__all__ = ["FRESH_STEPS_FACTOR", "SOURCES", "Chains"]

SOURCES = ("buffer", "fresh", "init")
"""Where samples come from: the chains the replay buffer holds, continued (``"buffer"``), new chains from its initial
distribution (``"fresh"``), or that initial distribution itself, no step taken (``"init"``: where sampling starts,
the reference that shows how far it moved)."""

FRESH_STEPS_FACTOR = 5
"""Fresh chains run this many times the sampler's steps by default (:meth:`Chains.steps_for`)."""


class Chains:
    """Runs Langevin chains on a classifier's energy: start points from a replay buffer, refined by a sampler.

    The classifier runs as ``sampling_mode`` says while sampling (see :func:`jemkit.classifier.sampling_context`) and is
    left exactly as it was; only input gradients are computed. Works inside ``torch.inference_mode`` too (validation
    callbacks sample).

    Args:
        classifier: the module whose train/eval mode (BatchNorm, Dropout) is switched while sampling.
        sampler: the sampler; default ``SGLD()`` (JEM's settings).
        buffer: the replay buffer; default ``ReplayBuffer()`` (JEM's settings).
        domain: where inputs live; default ``InputDomain()`` (fitted by :meth:`fit`; the unit box ``[-1, 1]``
            until then).
        sampling_mode: ``"eval"`` (running statistics, no Dropout), ``"train"`` (batch statistics, running ones
            protected) or ``"auto"`` (see :func:`jemkit.classifier.resolve_sampling_mode`).
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
        domain: InputDomain | None = None,
        sampling_mode: str = "eval",
        compile: bool | str = False,
    ) -> None:
        self.classifier = classifier
        self.sampler = sampler if sampler is not None else SGLD()
        self.buffer = buffer if buffer is not None else ReplayBuffer()
        self.domain = domain if domain is not None else InputDomain()
        self.sampling_mode = resolve_sampling_mode(sampling_mode, classifier)  # the one check of the mode
        self.compile_mode = resolve_compile_mode(compile, self.sampler, classifier, self.sampling_mode)  # resolved once
        self._compiled: CompiledStep | None = None
        self._first_layer: tuple[str, FirstLayer] | None = None  # the layer YOPO steps go through, by name

    @property
    def compiled(self) -> bool:
        """Whether sampler steps run as one compiled graph."""
        return self.compile_mode is not None

    # ------------------------------------------------------------------ the buffer's life
    @torch.no_grad()
    def fit(self, loader: Iterable[Any], num_classes: int | None, device: torch.device | str | None = None) -> None:
        """Before the first chain starts: fit the input domain and the initial distribution on training batches.

        Reads ``max(domain.fit_batches, init's fit_batches)`` batches once; what is already fitted (a resumed run)
        is kept. Labels may be integers or 0/1 floats (one-logit binary classifiers).
        """
        init_batches = getattr(self.buffer.init, "fit_batches", 0) if not self.buffer.init.is_fitted else 0
        batches = max(0 if self.domain.is_fitted else self.domain.fit_batches, init_batches)
        if batches == 0:
            return
        xs, ys = [], []
        for batch in itertools.islice(loader, batches):
            x, y = unpack_batch(batch)
            check_label_count(x, y)  # before any mask of labels over inputs
            xs.append(x.to(device))
            ys.append(class_labels(y).to(device))
        if not xs:
            return
        x, y = torch.cat(xs), torch.cat(ys)
        finite = torch.isfinite(x.flatten(1)).all(dim=1)  # a NaN row is named by the training step, not here
        x, y = x[finite], y[finite]
        if not self.domain.is_fitted:
            self.domain.fit(x[: self.domain.fit_batches * xs[0].shape[0]])
        keep = y >= 0  # -1: a float label that is not a whole number
        if init_batches and keep.any():  # no valid label: the first training batch's check names them
            self.buffer.init.fit(self.domain.to_unit(x[keep]), y[keep], num_classes or int(y.max()) + 1)

    def prepare(
        self, input_shape: tuple[int, ...], num_classes: int | None, device: torch.device, world_size: int
    ) -> None:
        """Size the buffer for inputs of ``input_shape``: fill this rank's shard unless it holds one (a checkpoint)."""
        self.buffer.num_classes = self.buffer.num_classes or num_classes
        self.buffer.ensure_initialized(input_shape, device, world_size)

    def reset(self) -> None:
        """Start every chain afresh (after a divergence)."""
        self.buffer.reset()

    def reinit_nonfinite(self) -> int:
        """Restart the chains that went NaN/inf; returns how many (a host sync)."""
        return self.buffer.reinit_nonfinite()

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self.buffer.input_shape

    # ------------------------------------------------------------------ sampling
    def steps_for(self, source: str, n_steps: int | None = None) -> int:
        """Sampler steps run for chains from ``source`` unless ``n_steps`` says: the sampler's own for ``"buffer"``
        chains (one more training step's worth), five times that for ``"fresh"`` ones, which start far from the data,
        none for ``"init"``."""
        check_choice("sample source", source, SOURCES)
        if source == "init":
            return 0
        if n_steps is not None:
            return check_integer("n_steps", n_steps, minimum=0)
        return self.sampler.n_steps * (FRESH_STEPS_FACTOR if source == "fresh" else 1)

    def start(self, n: int, y: Tensor | None = None, source: str = "buffer") -> Tensor:
        """``n`` start points in data units: the chains the buffer holds (``"buffer"``, without random restarts; for
        labels ``y [n]`` only if it is conditional) or draws from its initial distribution (``"fresh"``, ``"init"``).
        The buffer is left unchanged."""
        check_choice("sample source", source, SOURCES)
        self._check_ready()
        if source == "buffer" and (y is None or self.buffer.conditional):
            units = self.buffer.sample(n, y, restarts=False)[0]
        else:
            units = self.buffer.init.sample(n, self.buffer.input_shape, device=self.buffer.samples.device, y=y)
        return self.domain.from_unit(units)

    def sample(
        self,
        energy: ConditionalEnergy,
        n: int,
        y: Tensor | None = None,
        source: str = "buffer",
        n_steps: int | None = None,
    ) -> Tensor:
        """``n`` samples in data units, the one way samples are drawn for pictures, FID/IS and ``JEM.sample``: chains
        from ``source`` (:meth:`start`) run for :meth:`steps_for` steps on ``energy(., y)``. The buffer is left
        unchanged."""
        return self.refine(energy, self.start(n, y, source), y, self.steps_for(source, n_steps))

    def _check_ready(self) -> None:
        if not self.buffer.is_initialized:
            raise RuntimeError(
                "the replay buffer has no input shape yet: train the JEM, load a checkpoint, or pass "
                "buffer=ReplayBuffer(input_shape=...)"
            )

    def draw(self, energy: ConditionalEnergy, n: int, y: Tensor | None = None) -> Tensor:
        """Continue ``n`` chains from the buffer (of classes ``y [n]`` if given), write them back, return them in
        data units."""
        u0, idx = self.buffer.sample(n, y)
        u = self._run(energy, u0, y, None)
        self.buffer.update(idx, u)
        return self.domain.from_unit(u)

    def refine(
        self, energy: ConditionalEnergy, x0: Tensor, y: Tensor | None = None, n_steps: int | None = None
    ) -> Tensor:
        """Run the sampler from ``x0`` (data units) for ``n_steps`` (default: the sampler's own) on ``energy(., y)``."""
        return self.domain.from_unit(self._run(energy, self.domain.to_unit(x0), y, n_steps))

    def _run(self, energy: ConditionalEnergy, u0: Tensor, y: Tensor | None, n_steps: int | None) -> Tensor:
        unit_energy = UnitEnergy(energy, self.domain)
        with self._sampling(unit_energy, y) as (y, step):

            def energy_fn(u: Tensor) -> Tensor:
                return unit_energy(u, y)

            if self.sampler.steps_through_first_layer:  # YOPO steps (PYLD): through the classifier's first layer
                layer = self._yopo_layer(energy_fn, u0)
                return self.sampler.sample(energy_fn, u0, n_steps=n_steps, step=step, first_layer=layer).detach()
            return self.sampler.sample(energy_fn, u0, n_steps=n_steps, step=step).detach()

    def _yopo_layer(self, energy_fn: EnergyFn, u0: Tensor) -> FirstLayer:
        """The classifier's layer that YOPO steps go through: the sampler's ``first_layer`` by name, else the first
        module that receives the classifier's input as it is (found once, by one forward on the start points)."""
        name = getattr(self.sampler, "first_layer", None)
        if name is None:
            name = self._first_layer[0] if self._first_layer is not None else self._find_first_layer(energy_fn, u0)
        if self._first_layer is None or self._first_layer[0] != name:
            try:
                module = self.classifier.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"PYLD(first_layer={name!r}): the classifier has no such submodule") from err
            self._first_layer = (name, FirstLayer(module, self.domain.from_unit, f"the classifier's layer {name!r}"))
        return self._first_layer[1]

    def _find_first_layer(self, energy_fn: EnergyFn, u0: Tensor) -> str:
        seen: dict[str, Any] = {}

        def remember_input(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault("input", args[0] if args else None)

        def first_to_take_it(name: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                if "layer" not in seen and args and args[0] is seen.get("input"):
                    seen["layer"] = name

            return hook

        leaves = [(n, m) for n, m in self.classifier.named_modules() if n and next(m.children(), None) is None]
        handles = [self.classifier.register_forward_pre_hook(remember_input)]
        handles += [module.register_forward_pre_hook(first_to_take_it(name)) for name, module in leaves]
        try:
            with torch.no_grad():
                energy_fn(u0)
        finally:
            for handle in handles:
                handle.remove()
        if "layer" not in seen:
            raise ValueError(
                "PYLD(inner_steps > 1) found no layer of the classifier that takes its input as it is (the classifier "
                "transforms it first): name the layer with PYLD(first_layer=...), or use inner_steps=1"
            )
        return seen["layer"]

    @contextmanager
    def _sampling(self, energy: ConditionalEnergy, y: Tensor | None) -> Iterator[tuple[Tensor | None, Step | None]]:
        """Gradients on, inference mode off, the classifier in its sampling mode; yields the labels (usable in a
        backward) and the compiled step, if any."""
        with torch.inference_mode(False), torch.enable_grad(), sampling_context(self.classifier, self.sampling_mode):
            if y is not None:
                y = y.clone()  # an inference-mode tensor cannot be saved for backward
            yield y, self._step(energy, y)

    def _step(self, energy: ConditionalEnergy, y: Tensor | None) -> Step | None:
        """The compiled ``u -> u'`` for this energy and labels, or ``None`` (the sampler's own eager step)."""
        if self.compile_mode is None:
            return None
        cached = self._compiled
        if cached is None or cached.energy != energy or cached.sampler is not self.sampler:
            cached = self._compiled = CompiledStep(energy, self.sampler, self.compile_mode)
        return lambda x: cached(x, y)

    # Compiled functions close over the original's energy: a copy or an unpickled object compiles its own on first use
    # (and finds its own first layer for YOPO steps).
    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"} | {"_compiled": None, "_first_layer": None}

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


class UnitEnergy:
    """``energy`` read in the domain's unit coordinates: ``E_u(u, y) = E(from_unit(u), y)``.

    Two of them are equal when they wrap the same energy and domain, so a compiled step is reused across calls.
    """

    def __init__(self, energy: ConditionalEnergy, domain: InputDomain) -> None:
        self.energy, self.domain = energy, domain

    def __call__(self, u: Tensor, y: Tensor | None = None) -> Tensor:
        return self.energy(self.domain.from_unit(u), y)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnitEnergy) and other.energy == self.energy and other.domain is self.domain

    def __hash__(self) -> int:
        return hash((self.energy, id(self.domain)))
