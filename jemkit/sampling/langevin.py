"""Langevin samplers for energy functions: ``sample(energy_fn, x0) -> x``.

A sampler only needs a function from a batch of inputs ``[B, ...]`` to energies ``[B]``; it knows nothing of the
classifier, the buffer or Lightning. Only input gradients are computed (``torch.autograd.grad`` with ``inputs=x``, so
autograd skips every weight-gradient kernel and never touches ``param.grad``), and the loop has no host
synchronisation: everything stays on the device, so a GPU runs ahead of Python.

- :class:`SGLD`: JEM's sampler, ``x <- x - step_size * dE/dx + noise_std * N(0, I)`` with step and noise decoupled
  (JEM: 20 steps, step 1.0, noise 0.01). With ``noise_std**2 == 2 * step_size`` it is the unadjusted Langevin
  algorithm, whose samples approach ``p(x) ∝ exp(-E(x))`` as the step shrinks.
- :class:`PYLD`: JEM++'s proximal step, ``x <- clamp(x - step_size * clip(dE/dx, -eps, eps), low, high)`` (noise
  optional): each coordinate moves at most ``step_size * eps`` per step and never leaves the data range, so short
  chains (JEM++: 5-10 steps) stay stable where SGLD with a unit step needs 20 or more. With ``inner_steps > 1`` it
  takes JEM++'s YOPO steps: one full backward to the first layer's output, then cheap steps through that layer only
  (:class:`FirstLayer`).
- :class:`MALA`: the Metropolis-adjusted Langevin algorithm, which corrects the discretisation bias exactly with a
  per-chain accept/reject step (used to check SGLD and where exact samples matter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from jemkit.checks import check_choice, check_integer
from jemkit.sampling.amp import sampling_grad_scale

__all__ = ["MALA", "PYLD", "SGLD", "STEP_SCALES", "EnergyFn", "FirstLayer", "Sampler", "Step", "energy_and_grad"]

STEP_SCALES = ("clip", "rms")
"""How :class:`PYLD` scales the energy's gradient into a step."""

EnergyFn = Callable[[Tensor], Tensor]
"""Maps inputs ``[B, ...]`` to energies ``[B]``."""


def energy_and_grad(
    energy_fn: EnergyFn, x: Tensor, functional: bool = False, create_graph: bool = False
) -> tuple[Tensor, Tensor]:
    """Energies ``[B]`` (float32) and their input gradient ``dE/dx`` (shaped like ``x``).

    Every sampler takes its gradient here, and so does the unrolled (differentiable) refinement of
    :mod:`jemkit.sampling.unrolled`. Under float16 autocast the backward runs
    :func:`~jemkit.sampling.amp.sampling_grad_scale` times larger and is unscaled at the float32 input, exactly.
    ``functional=True`` differentiates with ``torch.func.grad`` instead of autograd, which ``torch.compile`` traces
    into one graph with the rest of a step; the result is the same. ``create_graph=True`` keeps ``x``'s graph and
    the gradient's own graph (for attacks that differentiate through sampler steps); otherwise both results are
    detached from ``x``.
    """
    scale = sampling_grad_scale(x.device.type)

    def scaled_total(z: Tensor) -> tuple[Tensor, Tensor]:
        energy = energy_fn(z)
        if energy.shape != z.shape[:1]:
            raise ValueError(f"energy_fn must return one energy per sample [{z.shape[0]}], got {tuple(energy.shape)}")
        total = energy.sum()
        return (total * scale if scale != 1.0 else total), energy  # no multiplication by 1: one kernel less a step

    if functional:
        grad, energy = torch.func.grad(scaled_total, has_aux=True)(x)
    elif create_graph:
        with torch.enable_grad():
            total, energy = scaled_total(x)
            (grad,) = torch.autograd.grad(total, x, create_graph=True)
        return energy.float(), grad / scale if scale != 1.0 else grad
    else:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            total, energy = scaled_total(x)
            (grad,) = torch.autograd.grad(total, x)
    if scale != 1.0:
        grad = grad / scale
    return energy.detach().float(), grad


Step = Callable[[Tensor], Tensor]
"""One whole sampler update ``x -> x'`` (e.g. a compiled one)."""


class Sampler:
    """Interface of every sampler: ``sample(energy_fn, x0, n_steps=None, step=None) -> x`` shaped like ``x0``.

    What a sampler can do is declared here, once, and read by whoever needs it (compiling a step, unrolling the
    defence, EOT, YOPO's first layer) instead of being guessed from its attributes:

    - :attr:`has_pure_step`: one step is a pure function ``update(x, dE/dx) -> x'``. Such samplers accept ``step``,
      a ready-made replacement for ``x -> update(x, dE/dx)`` (a compiled one), and their refinement has an exact
      unrolled gradient; the others raise if ``step`` is given.
    - :attr:`steps_through_first_layer`: steps take cheap inner updates through the classifier's first layer (JEM++'s
      YOPO), so :meth:`sample` needs a :class:`FirstLayer`, and a step is not one ``update``.
    - :attr:`is_random`: two runs from the same start can differ (noise, an accept/reject draw).
    """

    n_steps: int

    @property
    def has_pure_step(self) -> bool:
        return False

    @property
    def steps_through_first_layer(self) -> bool:
        return False

    @property
    def is_random(self) -> bool:
        return True

    def update(self, x: Tensor, grad: Tensor) -> Tensor:
        """One step given ``dE/dx`` (samplers with :attr:`has_pure_step` only)."""
        raise TypeError(f"{type(self).__name__} has no pure step update(x, grad)")

    def sample(self, energy_fn: EnergyFn, x0: Tensor, n_steps: int | None = None, step: Step | None = None) -> Tensor:
        raise NotImplementedError

    def _steps(self, n_steps: int | None) -> int:
        return check_integer("n_steps", self.n_steps if n_steps is None else n_steps, minimum=0)


def _check_chain_steps(n_steps: int) -> int:
    """A sampler's own number of steps: an integer >= 1. A sampler with 0 steps would train a JEM on its buffer's
    restarts; 0 ("no refinement") is for one call, ``sample(..., n_steps=0)`` or ``jem.purify(x, 0)``."""
    try:
        return check_integer("n_steps", n_steps)
    except ValueError as err:
        raise ValueError(f"{err} (for no refinement in one call, pass n_steps=0 to sample() or purify())") from None


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return float(value)


class SGLD(Sampler):
    """Stochastic gradient Langevin dynamics as used by JEM.

    Args:
        n_steps: number of Langevin steps (JEM default 20).
        step_size: multiplier of the energy gradient (JEM default 1.0).
        noise_std: standard deviation of the Gaussian noise added per step (JEM default 0.01).
        clip: optional ``(low, high)`` to clamp samples into after each step (e.g. the data range); JEM does not clip.

    Example::

        >>> sampler = SGLD(n_steps=100, step_size=0.01, noise_std=0.02 ** 0.5)
        >>> x = sampler.sample(lambda x: 0.5 * (x ** 2).sum(1), torch.zeros(1000, 2))
    """

    def __init__(
        self,
        n_steps: int = 20,
        step_size: float = 1.0,
        noise_std: float = 0.01,
        clip: tuple[float, float] | None = None,
    ) -> None:
        self.n_steps = _check_chain_steps(n_steps)
        self.step_size = _check_positive("step_size", step_size)
        self.noise_std = _check_positive("noise_std", noise_std, allow_zero=True)
        if clip is not None and not clip[0] < clip[1]:
            raise ValueError(f"clip must be (low, high) with low < high, got {clip!r}")
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))

    @property
    def has_pure_step(self) -> bool:
        return True

    @property
    def is_random(self) -> bool:
        return self.noise_std > 0

    @classmethod
    def from_temperature(cls, n_steps: int, step_size: float, temperature: float = 1.0, **kwargs) -> SGLD:
        """The unadjusted Langevin algorithm targeting ``exp(-E / T)``: noise ``sqrt(2 * step_size * T)``."""
        return cls(n_steps, step_size, math.sqrt(2.0 * step_size * temperature), **kwargs)

    def update(self, x: Tensor, grad: Tensor) -> Tensor:
        """One step given ``dE/dx``: plain tensor arithmetic, so a compiler can fuse it into the energy's graph."""
        x = x - self.step_size * grad.to(x.dtype)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        if self.clip is not None:
            x = x.clamp(*self.clip)
        return x

    def sample(
        self,
        energy_fn: EnergyFn,
        x0: Tensor,
        n_steps: int | None = None,
        step: Step | None = None,
    ) -> Tensor:
        """Run the chains from ``x0``. ``step`` replaces one whole update ``x -> x'`` (e.g. a compiled one that must
        compute ``self.update(x, dE/dx)``); by default the gradient is taken with autograd here."""
        x = x0.detach().clone()
        for _ in range(self._steps(n_steps)):
            x = step(x) if step is not None else self.update(x, energy_and_grad(energy_fn, x)[1])
        return x

    def __repr__(self) -> str:
        return f"SGLD(n_steps={self.n_steps}, step_size={self.step_size}, noise_std={self.noise_std}, clip={self.clip})"


class FirstLayer:
    """A network's first layer seen from the sampler's coordinates: ``z = module(to_input(x))``, for YOPO steps.

    JEM++'s inner steps hold the gradient ``p = dE/dz`` at the layer's output fixed and move the input through the
    layer alone: ``x <- update(x, d<module(to_input(x)), p>/dx)``. That is exact at the point ``p`` was taken and a
    first-order approximation after it; it needs every path from the input to the energy to pass through ``module``,
    which :meth:`PYLD.sample` checks once (the first full gradient against the one through the layer).

    With a linear first layer (a convolution or a linear map, JEM++'s own choice) the inner gradient does not depend on
    ``x``: the inner steps repeat the outer step's gradient, and ``PYLD(n_steps=M, inner_steps=N)`` moves like
    ``PYLD(n_steps=M, step_size=N * step_size)`` at the cost of ``M`` full backward passes. A nonlinear first block
    (e.g. convolution and activation) makes the inner steps differ.

    Args:
        module: the layer; called by the network on its input exactly once per forward.
        to_input: maps the sampler's coordinates to the layer's input (a JEM's chains: the input domain's map).
        name: how to call the layer in messages.
    """

    def __init__(
        self, module: nn.Module, to_input: Callable[[Tensor], Tensor] | None = None, name: str = "first layer"
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"FirstLayer needs an nn.Module, got {type(module).__name__}")
        self.module, self.to_input, self.name = module, to_input, name
        self.checked = False  # the first inner gradient is compared with the full one once

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(self.to_input(x) if self.to_input is not None else x)

    @contextmanager
    def recording(self) -> Iterator[list[Tensor]]:
        """Collect the layer's outputs of the forward passes inside the block."""
        outputs: list[Tensor] = []
        handle = self.module.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            yield outputs
        finally:
            handle.remove()


class PYLD(SGLD):
    """Proximal Langevin dynamics of JEM++ (Yang & Ji 2021): clipped gradient steps inside the data range.

    ``x <- clamp(x - step_size * clamp(dE/dx, -eps, eps) + noise_std * N(0, I), low, high)``. Same interface as
    :class:`SGLD` (``PYLD(n_steps=5)(energy_fn, x0)`` via :meth:`sample`), compilable, and any energy will do.

    ``scale="rms"`` divides each chain's gradient by its root mean square over the chain's coordinates before the
    step (``x <- clamp(x - step_size * g / rms(g) + noise, low, high)``, as L2 PGD normalises its steps; ``eps`` is
    not used): every chain moves ``step_size`` per step on average, whatever the energy's scale. A JEM whose
    generative term is light (jemkit's ``px`` 0.05) has small input gradients, and JEM++'s clipped step then barely
    moves its chains: on Fashion-MNIST their samples stayed as far from the data as the restarts they came from
    (``benchmarks/RESULTS.md``).

    ``inner_steps > 1`` takes JEM++'s YOPO steps ("you only propagate once"): each of the ``n_steps`` outer steps runs
    one full forward and backward, keeps the gradient at the first layer's output, and makes ``inner_steps`` updates
    whose gradients go through the first layer only (see :class:`FirstLayer`); ``n_steps * inner_steps`` updates for
    ``n_steps`` full backward passes. A JEM's chains find the first layer themselves (the first module that receives
    the classifier's input) unless ``first_layer`` names it; a direct call to :meth:`sample` passes a
    :class:`FirstLayer`. Opt-in: it is not compiled, and a defence that takes YOPO steps is attacked through by BPDA
    only (a step is not one ``update``, so there is no exact unrolled gradient: :attr:`has_pure_step` is false).

    Args:
        n_steps: steps per chain (JEM++: 5 to 10); with ``inner_steps``, the full backward passes per chain.
        step_size: multiplier of the clipped gradient (JEM++ CIFAR-10: 0.2).
        eps: per-coordinate bound on the gradient (JEM++: 1.0), so no coordinate moves more than ``step_size * eps``.
        noise_std: standard deviation of the Gaussian noise per update (JEM++: none).
        clip: the data range ``(low, high)`` samples are clamped into (JEM++: ``(-1, 1)``).
        inner_steps: updates per full backward pass (JEM++'s YOPO: 5; 1 = plain proximal steps).
        scale: ``"clip"`` (JEM++: the gradient clipped at ``eps``) or ``"rms"`` (each chain's gradient divided by its
            root mean square: steps of ``step_size`` whatever the energy's scale).
        first_layer: the classifier's submodule the inner steps go through, by name (e.g. ``"features.0"``, a
            convolution with its activation); ``None``: the first module the classifier's input enters.

    Example::

        >>> x = PYLD(n_steps=5, step_size=0.2).sample(lambda x: 0.5 * (x ** 2).sum(1), torch.rand(16, 2) * 2 - 1)
    """

    def __init__(
        self,
        n_steps: int = 5,
        step_size: float = 0.2,
        eps: float = 1.0,
        noise_std: float = 0.0,
        clip: tuple[float, float] = (-1.0, 1.0),
        inner_steps: int = 1,
        first_layer: str | None = None,
        scale: str = "clip",
    ) -> None:
        if clip is None:
            raise ValueError("PYLD is proximal: it needs the data range clip=(low, high)")
        super().__init__(n_steps, step_size, noise_std, clip)
        self.eps = _check_positive("eps", eps)
        self.scale = check_choice("scale", scale, STEP_SCALES)
        self.inner_steps = check_integer("inner_steps", inner_steps)
        if first_layer is not None and not isinstance(first_layer, str):
            raise TypeError(f"first_layer must be a submodule's name or None, got {type(first_layer).__name__}")
        self.first_layer = first_layer

    @property
    def has_pure_step(self) -> bool:
        return self.inner_steps == 1  # YOPO's inner steps go through the first layer: a step is not one update

    @property
    def steps_through_first_layer(self) -> bool:
        return self.inner_steps > 1

    def update(self, x: Tensor, grad: Tensor) -> Tensor:
        """One proximal step given ``dE/dx``: plain tensor arithmetic, compilable with the energy."""
        if self.scale == "rms":
            rms = grad.float().flatten(1).square().mean(1).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
            return super().update(x, grad / rms.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype))
        return super().update(x, grad.clamp(-self.eps, self.eps))

    def sample(
        self,
        energy_fn: EnergyFn,
        x0: Tensor,
        n_steps: int | None = None,
        step: Step | None = None,
        first_layer: FirstLayer | None = None,
    ) -> Tensor:
        """Run the chains from ``x0``; with ``inner_steps > 1``, YOPO steps through ``first_layer`` (required then)."""
        if not self.steps_through_first_layer:
            return super().sample(energy_fn, x0, n_steps, step)
        if step is not None:
            raise ValueError("PYLD with inner_steps > 1 takes no compiled step: sample eagerly (compile=False)")
        if first_layer is None:
            raise ValueError(
                "PYLD(inner_steps > 1) steps through the network's first layer: pass first_layer=FirstLayer(module) "
                "(a JEM's chains find it themselves), or use inner_steps=1"
            )
        x = x0.detach().clone()
        for _ in range(self._steps(n_steps)):
            grad, held = self._outer_gradient(energy_fn, x, first_layer)
            x = self.update(x, grad)
            for _ in range(self.inner_steps - 1):
                x = self.update(x, _through_layer(first_layer, x, held))
        return x

    def _outer_gradient(self, energy_fn: EnergyFn, x: Tensor, layer: FirstLayer) -> tuple[Tensor, Tensor]:
        """One full backward: ``dE/dx`` and the gradient held at the layer's output (scaled, see ``energy_and_grad``).

        The first time for a layer, the gradient through the layer alone is compared with the full one: they differ
        when some of the input reaches the energy without passing through the layer."""
        scale = sampling_grad_scale(x.device.type)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            with layer.recording() as outputs:
                energy = energy_fn(x)
            if len(outputs) != 1:
                raise ValueError(
                    f"{layer.name} ran {len(outputs)} times in one forward of the energy; YOPO steps need a layer "
                    "that runs exactly once on the input: name it with PYLD(first_layer=...)"
                )
            total = energy.sum()
            grad, held = torch.autograd.grad(total * scale if scale != 1.0 else total, [x, outputs[0]])
        if not layer.checked:
            through = _through_layer(layer, x, held)
            if not torch.allclose(through * scale, grad, rtol=1e-3, atol=1e-5 * float(grad.abs().max())):
                raise ValueError(
                    f"the input reaches the energy other than through {layer.name} (or an in-place operation "
                    "changes its output): the gradient through it alone differs from the full one, so YOPO steps "
                    "would follow a wrong gradient. Name the layer all of the input goes through with "
                    "PYLD(first_layer=...), or use inner_steps=1"
                )
            layer.checked = True
        return (grad / scale if scale != 1.0 else grad), held

    def __repr__(self) -> str:
        yopo = f", inner_steps={self.inner_steps}, first_layer={self.first_layer!r}" if self.inner_steps > 1 else ""
        scale = f", scale={self.scale!r}" if self.scale != "clip" else ""
        return (
            f"PYLD(n_steps={self.n_steps}, step_size={self.step_size}, eps={self.eps}, noise_std={self.noise_std}, "
            f"clip={self.clip}{yopo}{scale})"
        )


def _through_layer(layer: FirstLayer, x: Tensor, held: Tensor) -> Tensor:
    """``d<layer(x), held>/dx``, unscaled: one YOPO inner step's gradient (``held`` as scaled by the outer step)."""
    scale = sampling_grad_scale(x.device.type)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        z = layer(x)
        (grad,) = torch.autograd.grad(z, x, grad_outputs=held.to(z.dtype))
    return grad / scale if scale != 1.0 else grad


class MALA(Sampler):
    """Metropolis-adjusted Langevin: exact samples from ``exp(-E(x) / T)`` in the limit of many steps.

    Proposal ``x' = x - step_size * dE/dx + sqrt(2 * step_size * T) * N(0, I)``, accepted per chain with the
    Metropolis-Hastings probability. One energy-and-gradient evaluation per step, as SGLD. The running acceptance
    rate is kept on the device in ``acceptance_rate`` (read it when you want; reading it synchronises).

    Args:
        n_steps: number of steps.
        step_size: Langevin step size.
        temperature: target temperature ``T``.
    """

    def __init__(self, n_steps: int = 20, step_size: float = 0.01, temperature: float = 1.0) -> None:
        self.n_steps = _check_chain_steps(n_steps)
        self.step_size = _check_positive("step_size", step_size)
        self.temperature = _check_positive("temperature", temperature)
        self.acceptance_rate: Tensor | None = None

    def _log_proposal(self, to: Tensor, frm: Tensor, grad_frm: Tensor) -> Tensor:
        mean = frm - self.step_size * grad_frm
        return -((to - mean) ** 2).flatten(1).sum(1) / (4.0 * self.step_size * self.temperature)

    def sample(self, energy_fn: EnergyFn, x0: Tensor, n_steps: int | None = None, step: Step | None = None) -> Tensor:
        if step is not None:
            raise ValueError("MALA's accept/reject step has no `update(x, grad)` form: it takes no compiled step")
        x = x0.detach().clone()
        energy, grad = energy_and_grad(energy_fn, x)
        accepted = torch.zeros((), device=x.device)
        steps = self._steps(n_steps)
        noise_std = math.sqrt(2.0 * self.step_size * self.temperature)
        for _ in range(steps):
            proposal = x - self.step_size * grad.to(x.dtype) + noise_std * torch.randn_like(x)
            energy_p, grad_p = energy_and_grad(energy_fn, proposal)
            log_ratio = (energy - energy_p) / self.temperature + (
                self._log_proposal(x, proposal, grad_p) - self._log_proposal(proposal, x, grad)
            )
            accept = torch.rand_like(log_ratio).log() < log_ratio
            mask = accept.view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(mask, proposal, x)
            grad = torch.where(mask, grad_p, grad)
            energy = torch.where(accept, energy_p, energy)
            accepted = accepted + accept.float().mean()
        self.acceptance_rate = accepted / max(steps, 1)
        return x

    def __repr__(self) -> str:
        return f"MALA(n_steps={self.n_steps}, step_size={self.step_size}, temperature={self.temperature})"
