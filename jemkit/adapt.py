"""Test-time adaptation of a trained classifier to a shifted test distribution, with its own energy or its entropy.

A classifier read as an energy model (``E(x) = -logsumexp f(x)``) can be adapted on each unlabelled test batch by
the same contrast a JEM trains with: lower the energy of the test inputs, raise that of Langevin samples of the
model's own density. That is TEA (Yuan et al., CVPR 2024), the energy counterpart of Tent (Wang et al., ICLR 2021),
which minimises the entropy of the predictions. Both update only the normalisation layers' affine parameters
(BatchNorm, GroupNorm, LayerNorm, InstanceNorm), a small set that can move the features without forgetting the task,
and, as Tent does, let BatchNorm normalise with the test batch's own statistics.

- :class:`EnergyAdaptation`: TEA. Per batch: Langevin samples continued from a replay buffer (jemkit's
  :class:`~jemkit.sampling.Chains`, in the input domain's unit coordinates), then one Adam step on
  ``E(x_test).mean() - E(x_sample).mean()``. TEA's settings are the defaults: SGLD 20 steps of 0.1 with noise 0.01,
  a 10,000-chain buffer restarting 5% of chains uniformly, Adam at 1e-3, one update per batch.
- :class:`Tent`: one Adam step per batch on the mean prediction entropy.

Both wrap a :class:`jemkit.JEM` or any classifier, and are LightningModules whose ``forward`` adapts on the batch, then
predicts it: ``adapted(x)`` in a loop, ``Trainer.test(adapted, datamodule)`` (test metrics as a JEM logs them) or
``Trainer.predict``. Gradients are switched on inside ``forward``, so Lightning's inference mode needs no change
(``Trainer(inference_mode=False)`` works as well). ``mode="episodic"`` resets before every batch; ``"continual"``
keeps adapting until :meth:`~TestTimeAdaptation.reset`, which restores the wrapped model's adapted parameters
exactly (call it between test sets, as Tent's and TEA's protocols do).

What does the work, measured on jemkit's BatchNorm benchmark classifiers (``benchmarks/RESULTS.md``, "Under
distribution shift"): the test batch's BatchNorm statistics. Alone they give the gains of both methods (digits under
shift 83.8% -> 95.2%, Tent 95.3%, TEA 95.3%); either objective with the running statistics gives nothing at TEA's
rate and hurts at ten times it. Keep ``batch_statistics=True`` with BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from jemkit.batches import unpack_batch
from jemkit.checks import check_choice, check_integer
from jemkit.classifier import OutputKey, restored_modes, select_logits
from jemkit.energy import marginal_energy
from jemkit.metrics.calibration import CalibrationMetrics
from jemkit.sampling import SGLD, Chains, InitialDistribution, InputDomain, ReplayBuffer, Sampler, UniformInit

__all__ = [
    "ADAPT_METHODS",
    "NORM_LAYERS",
    "EnergyAdaptation",
    "Tent",
    "TestTimeAdaptation",
    "make_adapter",
    "norm_parameters",
]

NORM_LAYERS: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
"""Layers whose affine parameters are adapted: BatchNorm (any dimension, SyncBatchNorm), InstanceNorm, GroupNorm,
LayerNorm and RMSNorm."""

ADAPT_MODES = ("continual", "episodic")


def norm_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The affine parameters (``weight``, ``bias``) of every normalisation layer of ``module``, by qualified name."""
    found: dict[str, nn.Parameter] = {}
    for layer_name, layer in module.named_modules():
        if isinstance(layer, NORM_LAYERS):
            for name, parameter in layer.named_parameters(recurse=False):
                if name in ("weight", "bias"):
                    found[f"{layer_name}.{name}" if layer_name else name] = parameter
    return found


def _is_jem(model: nn.Module) -> bool:
    from jemkit.module import JEM  # the module imports the evaluation stack lazily; keep this file light too

    return isinstance(model, JEM)


class TestTimeAdaptation(pl.LightningModule):
    """Base of the adapters: which parameters move, the optimiser, the normalisation mode, reset, and the
    Lightning test/predict steps. Subclasses give :meth:`adaptation_loss`.

    Args:
        model: a :class:`jemkit.JEM` (its classifier is adapted; its temperature, domain and output key are used) or
            any classifier returning logits.
        mode: ``"continual"`` (keep adapting until :meth:`reset`) or ``"episodic"`` (reset before every batch).
        steps: optimiser updates per batch before predicting it (Tent, TEA: 1).
        lr: learning rate of the default Adam (Tent, TEA: 1e-3).
        optimizer: optimiser factory ``params -> Optimizer``, instead of Adam at ``lr``.
        batch_statistics: BatchNorm normalises with the statistics of the batch it sees, as in Tent (and its running
            statistics are neither used nor changed); ``False`` keeps the running statistics.
        temperature: temperature of the energies and predictions; default the JEM's, else 1.
        output_key: how to read logits from a classifier returning a tuple/dict (a JEM knows its own).

    Raises:
        ValueError: if the classifier has no normalisation layer with affine parameters.
    """

    __test__ = False  # not a pytest class, whatever its name

    def __init__(
        self,
        model: nn.Module,
        mode: str = "continual",
        steps: int = 1,
        lr: float = 1e-3,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        batch_statistics: bool = True,
        temperature: float | None = None,
        output_key: OutputKey = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (a classifier or a jemkit.JEM), got {type(model).__name__}")
        if mode not in ADAPT_MODES:
            raise ValueError(f"mode must be one of {ADAPT_MODES}, got {mode!r}")
        check_integer("steps", steps)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        self.model = model
        self.is_jem = _is_jem(model)
        parameters = norm_parameters(self.classifier)
        if not parameters:
            raise ValueError(
                f"{type(self.classifier).__name__} has no normalisation layer with affine parameters (BatchNorm, "
                "GroupNorm, LayerNorm, InstanceNorm(affine=True)): test-time adaptation updates only those. Use a "
                "classifier with normalisation layers, e.g. SmallCNN(norm='batch') or MLP(norm='layer')"
            )
        self.parameter_names = tuple(parameters)
        self.mode, self.steps, self.batch_statistics = mode, steps, batch_statistics
        self.temperature = float(temperature if temperature is not None else getattr(model, "temperature", 1.0))
        self.output_key = output_key
        self.optimizer_factory = optimizer if optimizer is not None else partial(torch.optim.Adam, lr=lr)
        self.adapt_optimizer = self.optimizer_factory(list(parameters.values()))
        # The state reset() restores: the adapted parameters and the normalisation layers' buffers (on the CPU, so a
        # later .to(device) leaves the copy valid).
        self._saved = {name: value.detach().cpu().clone() for name, value in self._norm_state().items()}
        self.test_metrics = CalibrationMetrics()

    @property
    def classifier(self) -> nn.Module:
        """The module whose normalisation layers are adapted (a JEM's classifier, else the model)."""
        return self.model.classifier if self.is_jem else self.model

    def adapted_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters adaptation changes, by name in the classifier (nothing else changes)."""
        return norm_parameters(self.classifier)

    def _norm_state(self) -> dict[str, Tensor]:
        state = dict(self.adapted_parameters())
        for layer_name, layer in self.classifier.named_modules():
            if isinstance(layer, NORM_LAYERS):
                for name, value in layer.named_buffers(recurse=False):
                    if value is not None:
                        state[f"{layer_name}.{name}"] = value
        return state

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def reset(self) -> None:
        """Restore the adapted parameters (and the normalisation layers' buffers) to their values when wrapped, bit
        for bit, and forget the optimiser's state."""
        current = self._norm_state()
        for name, saved in self._saved.items():
            current[name].copy_(saved)
        self.adapt_optimizer = self.optimizer_factory(list(self.adapted_parameters().values()))

    @contextmanager
    def _normalisation(self) -> Iterator[None]:
        """Eval mode everywhere (no Dropout), but BatchNorm on the batch's own statistics when ``batch_statistics``,
        without touching its running ones; every flag restored afterwards."""
        with restored_modes(self.model):
            self.model.eval()
            if self.batch_statistics:
                for m in self.classifier.modules():
                    if isinstance(m, _BatchNorm):
                        m.train()
                        m.track_running_stats = False  # batch statistics in train mode, running ones untouched
            yield

    # ------------------------------------------------------------------ adapting and predicting
    def logits(self, x: Tensor) -> Tensor:
        """The model's logits ``[B, C]`` as it is now (no adaptation, no mode change)."""
        return select_logits(self.model(x), None if self.is_jem else self.output_key)

    def energy(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``E(x) = -T logsumexp(f(x) / T)``: ``[B]`` (``y`` is ignored; the chains' interface passes it)."""
        return marginal_energy(self.logits(x), self.temperature)

    def adaptation_loss(self, x: Tensor) -> Tensor:
        """The scalar minimised on the test batch ``x``; subclasses define it."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Adapt on the batch ``x [B, ...]`` (``steps`` updates), then return its logits ``[B, C]`` (detached)."""
        with torch.inference_mode(False), torch.enable_grad(), self._normalisation():
            if self.mode == "episodic":
                self.reset()
            parameters = list(self.adapted_parameters().values())
            x = x.detach().clone()  # an inference-mode tensor cannot be saved for backward
            for _ in range(self.steps):
                loss = self.adaptation_loss(x)
                grads = torch.autograd.grad(loss, parameters)  # only these: no other parameter's .grad is touched
                for parameter, grad in zip(parameters, grads, strict=True):
                    parameter.grad = grad
                self.adapt_optimizer.step()
                for parameter in parameters:
                    parameter.grad = None
            with torch.no_grad():
                return self.logits(x).detach()

    # ------------------------------------------------------------------ Lightning
    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Adapt on the batch, predict it, and accumulate accuracy, NLL, Brier, ECE and MCE as ``test/*``."""
        x, y = unpack_batch(batch)
        logits = self(x).float() / self.temperature
        self.test_metrics.update(logits, y)
        return {"logits": logits, "y": y}

    def on_test_epoch_end(self) -> None:
        if self.test_metrics.update_called:
            self.log_dict({f"test/{k}": v for k, v in self.test_metrics.compute().items()})
        self.test_metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities ``[B, C]`` after adapting on the batch."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x).float() / self.temperature, dim=1)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, steps={self.steps}, parameters={len(self.parameter_names)}, "
            f"batch_statistics={self.batch_statistics}"
        )


class Tent(TestTimeAdaptation):
    """Tent (Wang et al., ICLR 2021): minimise the mean entropy of the test batch's predictions over the
    normalisation layers' affine parameters, BatchNorm on the batch's statistics. Arguments: see
    :class:`TestTimeAdaptation`.

    Example::

        >>> tent = Tent(classifier)  # a classifier with BatchNorm, GroupNorm or LayerNorm
        >>> logits = tent(x_shifted)  # adapts on the batch, then predicts it
        >>> tent.reset()  # back to the trained weights
    """

    def adaptation_loss(self, x: Tensor) -> Tensor:
        log_probs = torch.log_softmax(self.logits(x).float() / self.temperature, dim=1)
        return -(log_probs.exp() * log_probs).sum(dim=1).mean()

    def __repr__(self) -> str:
        return f"Tent({self.extra_repr()}, lr={_lr(self.adapt_optimizer)})"


class EnergyAdaptation(TestTimeAdaptation):
    """TEA (Yuan et al., CVPR 2024): lower the energy of the test batch against Langevin samples of the model's own
    density, ``loss = E(x_test).mean() - E(x_sample).mean()``, over the normalisation layers' affine parameters.

    The samples are chains continued from a replay buffer of ``capacity`` slots (TEA: 10,000) and refined by
    ``sampler`` (TEA: SGLD 20 steps of 0.1, noise 0.01) on the classifier's energy as it is adapted, BatchNorm on the
    samples' own batch statistics as in TEA. Chains run in the input domain's unit coordinates, where the data's box
    is ``[-1, 1]`` (the range TEA's images live in), and are clamped to it.

    Args:
        model: a :class:`jemkit.JEM` or any classifier returning logits.
        domain: where inputs live; default the JEM's domain, else the unit box ``[-1, 1]``. For a plain classifier
            on data of another scale pass ``InputDomain().fit(x_train)``.
        sampler: the Langevin sampler (default: TEA's SGLD, clamped to the box).
        capacity: replay-buffer slots (TEA: 10,000).
        reinit_prob: fraction of chains restarted from ``init`` at each draw (TEA: 0.05).
        init: where fresh chains start, in unit coordinates (default uniform over the box, as TEA).
        n_samples: Langevin samples per batch (default: as many as the test batch, as TEA).
        from_model_buffer: when the model is a trained JEM, start the chains from its own replay buffer (samples of
            its density) rather than from ``init``.
        persistent_chains: keep the chains across :meth:`reset` (TEA's buffer lives on across test sets; only the
            model is reset); ``False`` restores the buffer too.
        **kwargs: ``mode``, ``steps``, ``lr``, ``optimizer``, ``batch_statistics``, ``temperature``,
            ``output_key`` of :class:`TestTimeAdaptation`.

    Example::

        >>> tea = EnergyAdaptation(jem)  # or EnergyAdaptation(classifier, domain=InputDomain().fit(x_train))
        >>> lightning.Trainer().test(tea, datamodule)  # test/acc, test/ece, ... after adapting on each batch
    """

    def __init__(
        self,
        model: nn.Module,
        domain: InputDomain | None = None,
        sampler: Sampler | None = None,
        capacity: int = 10_000,
        reinit_prob: float = 0.05,
        init: InitialDistribution | None = None,
        n_samples: int | None = None,
        from_model_buffer: bool = False,
        persistent_chains: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        check_integer("capacity", capacity)
        if n_samples is not None:
            check_integer("n_samples", n_samples)
        domain = domain if domain is not None else (model.domain if self.is_jem else InputDomain())
        if domain is not getattr(model, "domain", None):
            self.domain = domain  # registered here (moves with .to()), unless it is the JEM's own
        self.buffer = ReplayBuffer(capacity=capacity, reinit_prob=reinit_prob, init=init or UniformInit())
        sampler = sampler if sampler is not None else SGLD(n_steps=20, step_size=0.1, noise_std=0.01, clip=(-1, 1))
        batchnorm = any(isinstance(m, _BatchNorm) for m in self.classifier.modules())
        mode = "train" if self.batch_statistics and batchnorm else "eval"  # "train": the samples' batch statistics
        self.chains = Chains(self.classifier, sampler, self.buffer, domain, sampling_mode=mode)
        self.n_samples, self.from_model_buffer, self.persistent_chains = n_samples, from_model_buffer, persistent_chains
        self._saved_chains: Tensor | None = None

    @torch.no_grad()
    def _prepare_chains(self, x: Tensor) -> None:
        """Fill the buffer on the first batch: from the JEM's own chains if asked and available, else from ``init``."""
        if self.buffer.is_initialized:
            return
        self.chains.prepare(tuple(x.shape[1:]), None, x.device, 1)
        source = getattr(self.model, "buffer", None) if self.is_jem and self.from_model_buffer else None
        if source is not None and source.is_initialized and tuple(source.samples.shape[1:]) == tuple(x.shape[1:]):
            picks = torch.randint(0, source.samples.shape[0], (self.buffer.capacity,), device=source.samples.device)
            chains = source.chains(picks) if hasattr(source, "chains") else source.samples[picks]
            self.buffer.samples = chains.to(x.device).float().clone()
        self._saved_chains = self.buffer.samples.detach().clone()

    def reset(self) -> None:
        """Restore the model (see :meth:`TestTimeAdaptation.reset`); also the chains unless ``persistent_chains``."""
        super().reset()
        if not self.persistent_chains and self._saved_chains is not None:
            self.buffer.samples = self._saved_chains.to(self.buffer.samples.device).clone()

    def energy_gap(self, x: Tensor, x_sample: Tensor) -> Tensor:
        """``E(x).mean() - E(x_sample).mean()``: the loss TEA minimises, for given samples (a scalar)."""
        return self.energy(x).float().mean() - self.energy(x_sample).float().mean()

    def adaptation_loss(self, x: Tensor) -> Tensor:
        self._prepare_chains(x)
        x_sample = self.chains.draw(self.energy, self.n_samples or x.shape[0])
        return self.energy_gap(x, x_sample)

    def __repr__(self) -> str:
        return f"EnergyAdaptation({self.extra_repr()}, lr={_lr(self.adapt_optimizer)}, sampler={self.chains.sampler!r})"


def _lr(optimizer: torch.optim.Optimizer) -> Any:
    return optimizer.param_groups[0].get("lr")


ADAPT_METHODS: dict[str, type[TestTimeAdaptation]] = {"energy": EnergyAdaptation, "tent": Tent}
"""Adapters by name, as :func:`make_adapter`, ``ShiftOptions.adapt`` and ``jemkit evaluate --shift.adapt`` take them."""


def make_adapter(method: str, model: nn.Module, domain: InputDomain | None = None, **kwargs: Any) -> TestTimeAdaptation:
    """The adapter ``method`` (``"energy"`` or ``"tent"``) around ``model``; ``domain`` is used by the energy
    adaptation only; ``kwargs`` go to the adapter's constructor."""
    check_choice("adaptation method", method, ADAPT_METHODS)
    if method == "energy":
        return EnergyAdaptation(model, domain=domain, **kwargs)
    return ADAPT_METHODS[method](model, **kwargs)
