"""``JEM``: the LightningModule that turns any classifier into a Joint Energy-based Model.

The classifier stays the user's and is only called. The module owns a sampler and a replay buffer and trains

    loss = ce_weight * CE(f(x), y)
         + px_weight  * (E(x_data).mean() - E(x_sample).mean())              # log p(x)
         + pxy_weight * (E(x_data, y).mean() - E(x_sample_y, y_q).mean())    # log p(x | y), optional
         + energy_l2_weight * (E(x_data)^2 + E(x_sample)^2).mean()          # optional regulariser

where the samples come from SGLD chains continued from the buffer (Grathwohl et al. 2020).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from jemkit._config import from_config, is_plain, to_config
from jemkit.adapters import (
    OutputKey,
    SamplingMode,
    has_batchnorm,
    is_mode_sensitive,
    sampling_context,
    select_logits,
    unpack_batch,
)
from jemkit.energy import check_logits, joint_energy, marginal_energy
from jemkit.losses import contrastive_divergence_loss, energy_l2_regularization
from jemkit.sampling import SGLD, InitialDistribution, ReplayBuffer, Sampler, UniformInit
from jemkit.sampling.amp import energy_for_sampling
from jemkit.sampling.compiled import CompiledSampling, CompileScope, resolve_compile_scope

__all__ = ["JEM", "DivergenceError"]


class DivergenceError(RuntimeError):
    """Training produced a non-finite (or exploding) loss or energy: the run diverged."""


class JEM(pl.LightningModule):
    """Wrap a classifier ``f(x) -> logits [B, C]`` as a JEM and train it with ``cross-entropy + log p(x)``.

    ``forward`` returns the classifier's logits, so a JEM drops in wherever the classifier was used. Defaults are the
    JEM paper's: SGLD with 20 steps of size 1.0 and noise 0.01, a 10,000-sample replay buffer with 5% re-initialisation
    from uniform noise on [-1, 1], data noise 0.03, Adam with learning rate 1e-4.

    Args:
        classifier: any ``nn.Module`` mapping a batch of inputs to logits (see ``output_key`` for tuple/dict outputs).
        num_classes: number of classes; inferred from the first batch's logits when ``None``.
        input_shape: shape of one input (e.g. ``(3, 32, 32)``); taken from the first batch when ``None``.
        ce_weight: weight of the cross-entropy term ``-log p(y|x)``.
        px_weight: weight of the unconditional generative term (``log p(x)``); 0 trains a plain classifier.
        pxy_weight: weight of the class-conditional generative term (``log p(x|y)``), sampled with random labels.
        energy_l2_weight: weight of the L2 regulariser on data and sample energies (keeps energies near 0).
        data_noise: std of the Gaussian noise added to training inputs (JEM: 0.03).
        temperature: temperature ``T`` of the energies (``beta = 1/T``); 1 is the classifier's own softmax.
        sampler: the sampler; default ``SGLD(n_steps=20, step_size=1.0, noise_std=0.01)``.
        buffer_size: replay buffer capacity.
        reinit_prob: probability of restarting a chain from ``init``.
        init: initial distribution of chains; default ``UniformInit(-1, 1)``.
        conditional_buffer: keep the buffer per class (needed for class-conditional start points).
        sampling_mode: how BatchNorm/Dropout behave while sampling: ``"eval"`` (running statistics, default) or
            ``"train"`` (batch statistics, the reference code's behaviour; running statistics are protected).
        output_key: how to read logits from a classifier returning a tuple/dict: a key, an index or a callable.
        lr: learning rate of the default Adam optimiser (ignored when ``optimizer`` is given).
        optimizer: optimiser factory ``params -> Optimizer`` (LightningCLI: ``class_path`` in YAML).
        lr_scheduler: optional scheduler factory ``optimizer -> LRScheduler``, stepped every epoch
            (``ReduceLROnPlateau`` watches ``val/nll``).
        lr_warmup_steps: scale the learning rate by ``(step + 1) / lr_warmup_steps`` over the first optimiser steps
            (JEM: 1000); an early full-size step on a young energy landscape is a common cause of divergence. The
            factor is applied inside each optimiser step on top of whatever the scheduler set, so it works with any
            scheduler (``LearningRateMonitor`` shows the scheduled rate).
        check_finite: stop with :class:`DivergenceError` as soon as the loss or an energy is non-finite.
        calibration_bins: number of equal-width bins of the validation/test ECE.
        compile: ``torch.compile`` the sampling loop, the bulk of a JEM step. ``"energy"`` compiles the energy
            function (its forward and, through AOTAutograd, its input-gradient backward); ``"step"`` compiles each
            whole sampler update (energy, input gradient, update, noise) into one graph (SGLD; not with BatchNorm
            in ``sampling_mode="train"``); ``True`` picks ``"step"`` where it works, else ``"energy"``. Opt-in:
            compiling takes a while the first time, and pays off on GPUs rather than CPUs.
        compile_mode: ``torch.compile``'s ``mode``; ``"reduce-overhead"`` also captures the compiled step as a CUDA
            graph on GPUs (one launch per step).
        channels_last: run 4-D inputs and the classifier in channels-last memory format (faster convolutions on
            recent GPUs with mixed precision).
        init_fit_batches: training batches used to fit an initial distribution that learns from data
            (``init=GaussianInit()``, the informative initialisation of JEM++) when training starts.

    Example::

        >>> from torchvision.models import resnet18
        >>> jem = JEM(resnet18(num_classes=10))
        >>> # lightning.Trainer().fit(jem, datamodule)
    """

    def __init__(
        self,
        classifier: nn.Module,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        ce_weight: float = 1.0,
        px_weight: float = 1.0,
        pxy_weight: float = 0.0,
        energy_l2_weight: float = 0.0,
        data_noise: float = 0.03,
        temperature: float = 1.0,
        sampler: Sampler | None = None,
        buffer_size: int = 10_000,
        reinit_prob: float = 0.05,
        init: InitialDistribution | None = None,
        conditional_buffer: bool = False,
        sampling_mode: SamplingMode = "eval",
        output_key: OutputKey = None,
        lr: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_warmup_steps: int = 0,
        check_finite: bool = True,
        calibration_bins: int = 15,
        compile: bool | Literal["energy", "step"] = False,
        compile_mode: str | None = None,
        channels_last: bool = False,
        init_fit_batches: int = 50,
    ) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        for name, value in [
            ("ce_weight", ce_weight),
            ("px_weight", px_weight),
            ("pxy_weight", pxy_weight),
            ("energy_l2_weight", energy_l2_weight),
            ("data_noise", data_noise),
        ]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        if isinstance(lr_warmup_steps, bool) or not isinstance(lr_warmup_steps, int) or lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be an integer >= 0, got {lr_warmup_steps!r}")
        if sampling_mode not in ("eval", "train"):
            raise ValueError(f"sampling_mode must be 'eval' or 'train', got {sampling_mode!r}")
        self._save_hparams()
        if isinstance(sampler, dict):
            sampler = from_config(sampler, Sampler)
        if isinstance(init, dict):
            init = from_config(init, InitialDistribution)

        self.classifier = classifier
        self.num_classes = num_classes
        self.ce_weight, self.px_weight, self.pxy_weight = ce_weight, px_weight, pxy_weight
        self.energy_l2_weight = energy_l2_weight
        self.data_noise = data_noise
        self.temperature = temperature
        self.sampler = sampler if sampler is not None else SGLD()
        self.sampling_mode = sampling_mode
        self.output_key = output_key
        self.lr = lr
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_warmup_steps = lr_warmup_steps
        self.check_finite = check_finite
        self.compile_sampler = compile  # not `self.compile`: that would shadow nn.Module.compile()
        self.compile_mode = compile_mode
        self._compiled = CompiledSampling(self._input_energy, compile_mode)
        resolve_compile_scope(compile, self.sampler, classifier, sampling_mode, compile_mode)  # fail early
        self.channels_last = channels_last
        self.init_fit_batches = init_fit_batches
        self.buffer_size = buffer_size  # across all ranks; each DDP rank keeps a shard
        self._share_forward: bool | None = None
        self.calibration_bins = calibration_bins
        self.buffer = ReplayBuffer(
            capacity=buffer_size,
            reinit_prob=reinit_prob,
            init=init if init is not None else UniformInit(-1.0, 1.0),
            input_shape=None,
            num_classes=num_classes,
            conditional=conditional_buffer or pxy_weight > 0,
        )
        self._input_shape = tuple(input_shape) if input_shape is not None else None
        self._checked_stages: set[str] = set()
        # Divergence handling, configured by the DivergenceGuard callback: limits on logged quantities (by name,
        # e.g. "energy_gap") and what to do: "raise" a DivergenceError, or "skip" the step and record the reason.
        self.divergence_limits: dict[str, float] = {}
        self.on_divergence: str = "raise"
        self.divergence_reason: str | None = None
        self.val_metrics: MetricCollection | None = None
        self.test_metrics: MetricCollection | None = None
        if num_classes is not None:
            self._build_metrics(num_classes)

    def _save_hparams(self) -> None:
        # Under LightningCLI the classifier arrives as a config (class_path/init_args), which is what makes
        # ``JEM.load_from_checkpoint(path)`` work without arguments; a module object passed from Python is left out
        # (its weights are in the state dict) and must be passed again when loading, as are optimiser factories.
        # Objects become plain configs (or are left out) so that checkpoints load with weights_only=True.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters(frame=inspect.currentframe().f_back)
        for key, value in list(self.hparams.items()):
            if isinstance(value, (Sampler, InitialDistribution)):
                self.hparams[key] = to_config(value)
            elif value is None or not is_plain(value):
                # None is every such argument's default: dropping it loses nothing, and avoids a clash with a
                # datamodule's hparams (e.g. its num_classes) when Lightning merges them for the logger.
                del self.hparams[key]
        self._hparams_initial = copy.deepcopy(self._hparams)  # what loggers and checkpoints record

    def _build_metrics(self, num_classes: int) -> None:
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "ece": MulticlassCalibrationError(num_classes, n_bins=self.calibration_bins, norm="l1"),
                "nll": MeanMetric(),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/").to(self.device)
        self.test_metrics = metrics.clone(prefix="test/").to(self.device)

    # ------------------------------------------------------------------ energies
    def forward(self, x: Tensor) -> Tensor:
        """The classifier's logits ``[B, C]``."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return select_logits(self.classifier(x), self.output_key)

    def energy(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``E(x)`` (``y=None``) or ``E(x, y)`` at the module's temperature: ``[B]``."""
        return self._energy_of(self(x), y)

    def _energy_of(self, logits: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            return marginal_energy(logits, self.temperature)
        return joint_energy(logits, y, self.temperature)

    def _input_energy(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``E(x, y)`` differentiable with respect to ``x`` only: the weights enter detached, so that a compiled
        backward (AOTAutograd differentiates a whole graph at once) computes no weight gradients."""
        weights = {name: p.detach() for name, p in self.named_parameters()}
        return self._energy_of(torch.func.functional_call(self, weights, (x,)), y)

    def _compile_scope(self) -> CompileScope | None:
        return resolve_compile_scope(
            self.compile_sampler, self.sampler, self.classifier, self.sampling_mode, self.compile_mode
        )

    def _energy_fn(self, y: Tensor | None, scope: CompileScope | None = None) -> Callable[[Tensor], Tensor]:
        """The sampler's ``x -> E(x, y)``; ``scope`` is :meth:`_compile_scope`'s answer when the caller has it."""
        if (scope or self._compile_scope()) == "energy":
            return self._compiled.energy_fn(y)
        return lambda x: energy_for_sampling(self.energy, x, y)

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.classifier.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ sampling
    def _refine(self, x0: Tensor, y: Tensor | None = None, n_steps: int | None = None) -> Tensor:
        """Run the sampler from ``x0``; works in training and inside validation/inference mode alike."""
        with torch.inference_mode(False), torch.enable_grad(), sampling_context(self.classifier, self.sampling_mode):
            if y is not None:
                y = y.clone()  # an inference-mode tensor cannot be saved for backward
            scope = self._compile_scope()  # resolved once per chain, not once per use
            if scope == "step":
                step = self._compiled.step_fn(self.sampler, y)
                return self.sampler.sample(self._energy_fn(y, scope), x0, n_steps=n_steps, step=step).detach()
            return self.sampler.sample(self._energy_fn(y, scope), x0, n_steps=n_steps).detach()

    def sample(
        self,
        n: int,
        y: Tensor | None = None,
        n_steps: int | None = None,
        from_buffer: bool = True,
    ) -> Tensor:
        """Draw ``n`` samples ``[n, *input_shape]`` (class-conditional when ``y [n]`` is given).

        Chains start from the replay buffer (``from_buffer=True``, conditional buffers only for ``y``) or from the
        initial distribution; the buffer is left unchanged. Works inside validation/inference mode as well.
        """
        if not self.buffer.is_initialized:
            raise RuntimeError("the JEM has not seen data yet: train it, load a checkpoint, or pass input_shape=")
        if y is not None:
            y = y.to(self.device).long()
        if from_buffer and (y is None or self.buffer.conditional):
            x0, _ = self.buffer.sample(n, y)
        else:
            x0 = self.buffer.init.sample(n, self.buffer.input_shape, device=self.device, y=y)
        return self._refine(x0, y, n_steps)

    def purify(self, x: Tensor, n_steps: int) -> Tensor:
        """JEM's defence: ``n_steps`` of the sampler on ``log p(x)`` started at the inputs ``x``, before classifying."""
        return self._refine(x, None, n_steps)

    def _draw_samples(self, batch_size: int, y: Tensor | None) -> Tensor:
        """Continue ``batch_size`` chains from the buffer, write them back, return them."""
        x0, idx = self.buffer.sample(batch_size, y)
        x = self._refine(x0, y)
        self.buffer.update(idx, x)
        return x

    def on_train_start(self) -> None:
        # An initial distribution fitted to data (GaussianInit, JEM++'s informative init) is fitted once, before the
        # first chains start, on up to `init_fit_batches` training batches; a resumed run keeps its fitted state.
        init = self.buffer.init
        if hasattr(init, "fit") and not getattr(init, "is_fitted", True):
            xs, ys = [], []
            for i, batch in enumerate(self.trainer.train_dataloader):
                if i >= self.init_fit_batches:
                    break
                x, y = unpack_batch(batch)
                xs.append(x.to(self.device))
                ys.append(y.to(self.device))
            if xs:
                y_all = torch.cat(ys)
                num_classes = self.num_classes or int(y_all.max()) + 1
                init.fit(torch.cat(xs), y_all, num_classes)

    def on_fit_start(self) -> None:
        # Under DDP every rank starts from the same seed; the chains of different ranks must differ, or each rank's
        # buffer shard would repeat the others'. Give each rank its own random stream for sampling and data noise.
        if self.trainer.world_size > 1:
            torch.manual_seed((torch.initial_seed() + 1_000_003 * self.global_rank) % 2**63)

    # ------------------------------------------------------------------ checks
    def _prepare(self, x: Tensor, y: Tensor, stage: str) -> None:
        """Validate the first batch of every stage; size the buffer and metrics from it."""
        shape = tuple(x.shape[1:])
        expected = self._input_shape or self.buffer.input_shape
        if expected is not None and shape != tuple(expected):
            raise ValueError(
                f"{stage} inputs have shape {shape} per sample, expected {tuple(expected)} "
                "(the shape given as input_shape= or seen in the first batch / checkpoint buffer)"
            )
        if stage in self._checked_stages:
            return
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"expected labels of shape [{x.shape[0]}], got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TypeError(f"expected integer class labels, got dtype {y.dtype}")
        with torch.no_grad(), sampling_context(self.classifier, "eval"):  # a probe: touches no statistics
            logits = self(x[:2])
        check_logits(logits)
        num_classes = int(logits.shape[1])
        if self.num_classes is not None and num_classes != self.num_classes:
            raise ValueError(f"the classifier returns {num_classes} logits but num_classes={self.num_classes}")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) for a classifier with {num_classes} outputs, "
                f"got labels in [{low}, {high}]"
            )
        if self.num_classes is None:
            self.num_classes = num_classes
            self.buffer.num_classes = num_classes
        if self.val_metrics is None:
            self._build_metrics(num_classes)
        if stage == "train":
            self._warn_if_outside_init_range(x)
        if not self.buffer.is_initialized:
            world_size = self.trainer.world_size if self._trainer is not None else 1
            lo, hi = self.buffer.shard_bounds(self.buffer_size, 0, world_size)
            self.buffer.initialize(shape, device=x.device, capacity=hi - lo)  # this rank's shard
        self._checked_stages.add(stage)

    def _warn_if_outside_init_range(self, x: Tensor) -> None:
        """Chains start in the initial distribution's range; data far outside it (e.g. 0..255 pixels) is a mistake."""
        low, high = getattr(self.buffer.init, "low", None), getattr(self.buffer.init, "high", None)
        if low is None or high is None:
            return
        x_min, x_max = float(x.min()), float(x.max())
        margin = 0.1 * (high - low)
        if x_min < low - margin or x_max > high + margin:
            rank_zero_warn(
                f"training inputs lie in [{x_min:.3g}, {x_max:.3g}] but SGLD chains start in [{low:g}, {high:g}]: "
                "scale the data to the sampler's range (jemkit's datamodules give [-1, 1]) or pass "
                f"init=UniformInit({x_min:.3g}, {x_max:.3g})"
            )

    def _divergence(self, quantities: dict[str, Tensor]) -> str | None:
        """Why training diverged (a non-finite value, or one past ``divergence_limits``), or ``None``.

        One host sync per step, outside the sampling loop; under DDP the ranks agree on the verdict so that they all
        skip (or all take) the optimiser step together.
        """
        names = list(quantities)
        values = torch.stack([quantities[n].detach().float() for n in names])
        limits = torch.tensor([self.divergence_limits.get(n, math.inf) for n in names], device=values.device)
        bad = ~torch.isfinite(values) | (values.abs() > limits)
        local = bool(bad.any())
        diverged = local
        if self._trainer is not None and self.trainer.world_size > 1:
            diverged = self.trainer.strategy.reduce_boolean_decision(local, all=False)
        if not diverged:
            return None
        if not local:
            return f"training diverged at global step {self.global_step} on another rank"
        reasons = [
            f"{n}={v:.4g}"
            + ("" if math.isfinite(v) else " (non-finite)")
            + (f" (limit {self.divergence_limits[n]:.4g})" if math.isfinite(v) and n in self.divergence_limits else "")
            for n, v, b in zip(names, values.tolist(), bad.tolist(), strict=True)
            if b
        ]
        return f"training diverged at global step {self.global_step}: {', '.join(reasons)}"

    def _handle_divergence(self, reason: str) -> None:
        if self.on_divergence == "raise":
            raise DivergenceError(
                f"{reason}. Lower the learning rate or the SGLD step size, clip samples (SGLD(clip=(-1, 1))), add "
                "energy_l2_weight, or add the DivergenceGuard(action='rollback') callback."
            )
        self.divergence_reason = reason  # a DivergenceGuard rolls back after this (skipped) step

    def _skipped_step_loss(self) -> Tensor | None:
        """The step's return value once every rank agreed to skip it.

        One process: ``None`` (Lightning skips backward and the optimiser). Under DDP Lightning does not allow
        ``None``; a zero-gradient loss touching every parameter keeps DDP's reducer in step, and
        :meth:`on_before_optimizer_step` drops the gradients so that the optimiser does not move.
        """
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        params = [p for p in self.classifier.parameters() if p.requires_grad]
        return torch.stack([(p * 0.0).sum() for p in params]).sum()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.divergence_reason is not None:  # a skipped step: no update, and Adam's moments stay as they were
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    # ------------------------------------------------------------------ steps
    def _can_share_forward(self) -> bool:
        """One forward over data and samples is exact only if the classifier treats each sample independently."""
        if self._share_forward is None:  # the classifier's layers do not change: decide once
            if self.sampling_mode == "eval":
                self._share_forward = not is_mode_sensitive(self.classifier)
            else:
                self._share_forward = not has_batchnorm(self.classifier)
        return self._share_forward

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y = unpack_batch(batch)
        self._prepare(x, y, "train")
        batch_size = x.shape[0]
        x_data = x + self.data_noise * torch.randn_like(x) if self.data_noise > 0 else x

        # 1. Sample: continue chains from the replay buffer (unconditional, and class-conditional with random labels).
        x_q = self._draw_samples(batch_size, None) if self.px_weight > 0 else None
        y_q = x_qy = None
        if self.pxy_weight > 0:
            y_q = torch.randint(0, self.num_classes, (batch_size,), device=x.device)
            x_qy = self._draw_samples(batch_size, y_q)

        # 2. Logits of data and samples: one forward where the classifier allows it.
        samples = [s for s in (x_q, x_qy) if s is not None]
        if self._can_share_forward():
            logits = self(torch.cat([x_data, *samples])).split(batch_size)
        else:
            logits = [self(x_data)]
            with sampling_context(self.classifier, self.sampling_mode):
                logits += [self(s) for s in samples]
        logits_data, logits_samples = logits[0].float(), [s.float() for s in logits[1:]]

        # 3. Losses (in float32 whatever the autocast precision).
        ce = F.cross_entropy(logits_data, y)
        e_data = marginal_energy(logits_data, self.temperature)
        loss = self.ce_weight * ce
        logs = {"train/ce": ce, "train/energy_data": e_data.mean()}
        if x_q is not None:
            e_sample = marginal_energy(logits_samples.pop(0), self.temperature)
            px = contrastive_divergence_loss(e_data, e_sample)
            loss = loss + self.px_weight * px
            if self.energy_l2_weight > 0:
                loss = loss + self.energy_l2_weight * energy_l2_regularization(e_data, e_sample)
            logs |= {"train/px": px, "train/energy_sample": e_sample.mean(), "train/energy_gap": -px}
        if x_qy is not None:
            ej_data = joint_energy(logits_data, y, self.temperature)
            ej_sample = joint_energy(logits_samples.pop(0), y_q, self.temperature)
            pxy = contrastive_divergence_loss(ej_data, ej_sample)
            loss = loss + self.pxy_weight * pxy
            logs["train/pxy"] = pxy
        logs["train/loss"] = loss
        if x_q is not None:
            logs["train/sample_norm"] = x_q.flatten(1).norm(dim=1).mean()
        if self.check_finite:
            reason = self._divergence({k.removeprefix("train/"): v for k, v in logs.items()})
            if reason is not None:
                self._handle_divergence(reason)
                return self._skipped_step_loss()

        # 4. Log (tensors only: Lightning reduces them without a per-step host sync).
        logs["train/acc"] = (logits_data.argmax(1) == y).float().mean()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/acc_epoch", logs["train/acc"], on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def _evaluation_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        x, y = unpack_batch(batch)
        self._prepare(x, y, stage)
        logits = self(x).float()
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics["acc"].update(logits, y)
        metrics["ece"].update(logits.softmax(1), y)
        metrics["nll"].update(F.cross_entropy(logits, y, reduction="none"))
        energies = marginal_energy(logits, self.temperature)
        self.log(f"{stage}/energy", energies.mean(), on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.log_dict(metrics, on_epoch=True, on_step=False, batch_size=x.shape[0])
        return {"logits": logits.detach(), "y": y}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Logs accuracy, NLL, ECE; returns the logits so that callbacks need no second forward pass."""
        return self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluation_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities ``[B, C]`` at the module's temperature."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x).float() / self.temperature, dim=1)

    # ------------------------------------------------------------------ optimisation & checkpoints
    def configure_optimizers(self) -> Any:
        params = self.classifier.parameters()
        optimizer = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.Adam(params, lr=self.lr)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/nll"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # Warm-up scales the scheduled learning rate for this step only and restores it afterwards, so it composes
        # with every scheduler, also those that set the rate outright (LambdaLR, OneCycleLR, ...).
        factor = min(1.0, (self.trainer.global_step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps else 1.0
        if factor == 1.0:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        scheduled = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
                group["lr"] = lr

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from jemkit import __version__

        # Every rank runs this hook; the file is written by rank zero, so it gets all ranks' buffer shards.
        if self._trainer is not None and self.trainer.world_size > 1 and self.buffer.is_initialized:
            for name in ("samples", "labels"):
                local = getattr(self.buffer, name)
                if local.numel() > 0:
                    checkpoint["state_dict"][f"buffer.{name}"] = self.all_gather(local).flatten(0, 1)
        bad = [name for name, p in self.classifier.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise DivergenceError(f"refusing to write a checkpoint with non-finite parameters: {bad[:5]}")

        checkpoint["jemkit"] = {
            "version": __version__,
            "num_classes": self.num_classes,
            "input_shape": self.buffer.input_shape,
            "classifier": type(self.classifier).__qualname__,
        }

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            raise ValueError(
                "the checkpoint's weights do not fit this JEM's classifier (a different architecture or number of "
                f"classes?): {str(err).splitlines()[0]} ... see the cause below for every mismatch"
            ) from err

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> JEM:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``, with a clear error for files that are not Lightning checkpoints."""
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except KeyError as err:
            raise ValueError(
                f"{checkpoint_path} is not a Lightning checkpoint of a JEM (missing key {err}); expected a file "
                "written by Trainer.fit / ModelCheckpoint or `jemkit fit`"
            ) from err

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("jemkit")
        if info is None:
            raise ValueError("this checkpoint was not written by a jemkit JEM (it has no 'jemkit' section)")
        saved_classifier = info.get("classifier")
        if saved_classifier is not None and saved_classifier != type(self.classifier).__qualname__:
            raise ValueError(
                f"the checkpoint holds a {saved_classifier} classifier but this JEM wraps a "
                f"{type(self.classifier).__qualname__}: build the JEM with the same architecture"
            )
        saved = info.get("num_classes")
        if saved is not None and self.num_classes is not None and saved != self.num_classes:
            raise ValueError(f"the checkpoint has {saved} classes but this JEM was built with {self.num_classes}")
        if saved is not None and self.num_classes is None:
            self.num_classes = saved
            self.buffer.num_classes = saved
            self._build_metrics(saved)
