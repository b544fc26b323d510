"""``JEM``: the LightningModule that turns any classifier into a Joint Energy-based Model.

The classifier stays the user's and is only called. The module wires a :class:`~jemkit.sampling.Chains` (sampler,
replay buffer, sampling mode) to the losses and trains

    loss = ce_weight * CE(f(x), y)
         + px_weight  * (E(x_data).mean() - E(x_sample).mean())              # log p(x)
         + pxy_weight * (E(x_data, y).mean() - E(x_sample_y, y_q).mean())    # log p(x | y), optional
         + energy_l2_weight * (E(x_data)^2 + E(x_sample)^2).mean()          # optional regulariser

where the samples come from SGLD chains continued from the buffer (Grathwohl et al. 2020). Policies live elsewhere:
divergence handling in :class:`~jemkit.callbacks.DivergenceGuard`, which reads :attr:`JEM.step_stats`.
"""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from jemkit._config import from_config, save_hparams_as_configs
from jemkit.adapters import (
    OutputKey,
    can_share_forward,
    resolve_sampling_mode,
    sampling_context,
    select_logits,
    split_outliers,
    unpack_batch,
)
from jemkit.callbacks.divergence import DivergenceGuard
from jemkit.checkpoint import (
    check_finite_parameters,
    check_jemkit_section,
    is_unreadable_checkpoint,
    jemkit_section,
)
from jemkit.checks import check_first_batch, check_input_shape, warn_if_outside_range
from jemkit.divergence import DivergenceError
from jemkit.energy import energy_matrix, joint_energy, marginal_energy
from jemkit.losses import classification_loss as classification_loss_fn
from jemkit.losses import contrastive_divergence_loss, energy_l2_regularization, energy_margin_loss
from jemkit.metrics.calibration import CalibrationMetrics
from jemkit.optim import configure_optimizer, scaled_learning_rates
from jemkit.presets import resolve_preset
from jemkit.sampling import PYLD, Chains, GaussianInit, InitialDistribution, ReplayBuffer, Sampler

__all__ = ["JEM", "DivergenceError"]

_CONFIG_OBJECTS = (Sampler, InitialDistribution, ReplayBuffer)  # recorded in hparams as class_path/init_args configs


class JEM(pl.LightningModule):
    """Wrap a classifier ``f(x) -> logits [B, C]`` as a JEM and train it with ``cross-entropy + log p(x)``.

    ``forward`` returns the classifier's logits, so a JEM drops in wherever the classifier was used. The defaults are
    chosen on ``benchmarks/quality.py`` (README, "Quality"): JEM++'s proximal Langevin sampler with 5 steps
    (``PYLD(n_steps=5, step_size=0.2)``), chains restarted from per-class Gaussians fitted to the data
    (``GaussianInit``), a ``log p(x)`` term of weight 0.1, data noise 0.03, Adam with learning rate 1e-3. They keep
    the classifier's accuracy and calibration and add OOD detection at about 4-5 times a plain step's cost. The
    papers' settings are presets: ``preset="jem"`` (SGLD 20 steps, Adam 1e-4), ``"jempp"``, ``"sada"``.

    Args:
        classifier: any ``nn.Module`` mapping a batch of inputs to logits (see ``output_key`` for tuple/dict outputs).
        preset: named settings of a published method (``"jem"``, ``"jempp"``, ``"sada"``, see :mod:`jemkit.presets`)
            for every argument left at its default; the resolved values are recorded in ``hparams``. An argument
            passed with its default value counts as left at its default (the preset's value wins).
        num_classes: number of classes; inferred from the first batch's logits when ``None``.
        classification_loss: the classification term on the energies ``E(x, .)``: ``"ce"`` (cross-entropy,
            ``-log p(y|x)`` at the module's temperature; logged as ``train/ce``), or an EBM loss of
            :mod:`jemkit.losses` by name (``"hinge"``, ``"log"``, ``"square_square"``, ...) or as
            ``{"name": "hinge", "margin": 0.5}``.
        ce_weight: weight of the classification term.
        px_weight: weight of the unconditional generative term (``log p(x)``); 0 trains a plain classifier. 0.1
            (default) keeps the classifier's calibration; 1.0 (the papers') gives a stronger density model at the
            cost of under-confident predictions on small data.
        pxy_weight: weight of the class-conditional generative term (``log p(x|y)``), sampled with random labels
            from a class-conditional buffer.
        energy_l2_weight: weight of the L2 regulariser on data and sample energies (keeps energies near 0).
        margin_weight: weight of the energy-margin term of Liu et al. 2020 (:func:`jemkit.losses.energy_margin_loss`,
            paper: 0.1): data energies below ``margins[0]``, outliers' above ``margins[1]``. Outliers come with the
            training batch (``{"data": (x, y), "outliers": x_out}``, e.g. :class:`jemkit.data.WithOutliers`), or
            else are this step's samples from the replay buffer.
        margins: ``(margin_in, margin_out)`` of the energy-margin term (paper, CIFAR-10: ``(-23, -5)``).
        data_noise: std of the Gaussian noise added to training inputs (JEM: 0.03).
        temperature: temperature ``T`` of the energies (``beta = 1/T``); 1 is the classifier's own softmax.
        sampler: the sampler; default ``PYLD(n_steps=5, step_size=0.2)`` (samples clamped to [-1, 1]).
        buffer: the replay buffer; default ``ReplayBuffer(init=GaussianInit())`` (10,000 chains, 5% restarts from
            per-class Gaussians fitted to the first training batches), class-conditional when ``pxy_weight > 0``.
        sampling_mode: how BatchNorm/Dropout behave while sampling and in the p(x) contrast: ``"train"`` (batch
            statistics, the reference code's behaviour; running statistics are protected and see only data),
            ``"eval"`` (running statistics, no Dropout) or ``"auto"`` (default: ``"train"`` with BatchNorm, ``"eval"``
            otherwise; see :func:`jemkit.adapters.resolve_sampling_mode` for the measurement behind it).
        output_key: how to read logits from a classifier returning a tuple/dict: a key, an index or a callable.
        lr: learning rate of the default Adam optimiser (ignored when ``optimizer`` is given).
        optimizer: optimiser factory ``params -> Optimizer`` (LightningCLI: ``class_path`` in YAML).
        lr_scheduler: optional scheduler factory ``optimizer -> LRScheduler``, stepped every epoch
            (``ReduceLROnPlateau`` watches ``val/nll``).
        lr_warmup_steps: scale the learning rate by ``(step + 1) / lr_warmup_steps`` over the first optimiser steps
            (JEM: 1000), on top of any schedule: early full-size steps are a common cause of divergence.
        compile: experimental, unmeasured on GPUs: compile each SGLD step into one graph, ``True`` or a
            ``torch.compile`` mode (``"reduce-overhead"`` captures CUDA graphs). See :class:`~jemkit.sampling.Chains`.
        channels_last: run 4-D inputs and the classifier in channels-last memory format (faster convolutions).

    Example::

        >>> from torchvision.models import resnet18
        >>> jem = JEM(resnet18(num_classes=10))
        >>> # lightning.Trainer().fit(jem, datamodule)
    """

    def __init__(
        self,
        classifier: nn.Module,
        preset: str | None = None,
        num_classes: int | None = None,
        classification_loss: str | dict[str, Any] = "ce",
        ce_weight: float = 1.0,
        px_weight: float = 0.1,
        pxy_weight: float = 0.0,
        energy_l2_weight: float = 0.0,
        margin_weight: float = 0.0,
        margins: tuple[float, float] = (-23.0, -5.0),
        data_noise: float = 0.03,
        temperature: float = 1.0,
        sampler: Sampler | None = None,
        buffer: ReplayBuffer | None = None,
        sampling_mode: str = "auto",
        output_key: OutputKey = None,
        lr: float = 1e-3,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_warmup_steps: int = 0,
        compile: bool | str = False,
        channels_last: bool = False,
    ) -> None:
        if preset is not None:  # fill in what the caller left at its default, then build as if it had been given
            args = {k: v for k, v in locals().items() if k not in ("self", "__class__", "preset")}
            resolved = resolve_preset(preset, args, _DEFAULTS)
            self.__init__(**resolved)
            self.preset = preset
            # the classifier stays as Lightning recorded it (under LightningCLI: its config, so checkpoints load alone)
            settings = {k: v for k, v in resolved.items() if k != "classifier"}
            save_hparams_as_configs(self, inspect.currentframe(), _CONFIG_OBJECTS, settings | {"preset": preset})
            return
        super().__init__()
        self.preset = None
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        nonnegative = dict(ce_weight=ce_weight, px_weight=px_weight, pxy_weight=pxy_weight)
        nonnegative |= dict(energy_l2_weight=energy_l2_weight, data_noise=data_noise)
        for name, value in nonnegative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        if isinstance(lr_warmup_steps, bool) or not isinstance(lr_warmup_steps, int) or lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be an integer >= 0, got {lr_warmup_steps!r}")
        save_hparams_as_configs(self, inspect.currentframe(), _CONFIG_OBJECTS)
        sampler = from_config(sampler, Sampler) if isinstance(sampler, dict) else sampler
        buffer = from_config(buffer, ReplayBuffer) if isinstance(buffer, dict) else buffer
        if sampler is None:
            sampler = PYLD(n_steps=5, step_size=0.2)
        if buffer is None:
            buffer = ReplayBuffer(init=GaussianInit(), num_classes=num_classes, conditional=pxy_weight > 0)
        elif pxy_weight > 0 and not buffer.conditional:
            raise ValueError("pxy_weight > 0 samples per class: pass buffer=ReplayBuffer(conditional=True, ...)")
        buffer.num_classes = buffer.num_classes or num_classes

        self.classifier = classifier
        self.buffer = buffer  # registered here, so that checkpoints carry it as `buffer.*`
        sampling_mode = resolve_sampling_mode(sampling_mode, classifier)
        self.chains = Chains(classifier, sampler, buffer, sampling_mode, compile)
        self.num_classes = num_classes
        self.classification_loss = classification_loss_fn(classification_loss)
        self.ce_weight, self.px_weight, self.pxy_weight = ce_weight, px_weight, pxy_weight
        self.energy_l2_weight = energy_l2_weight
        self.margin_weight, self.margins = margin_weight, (float(margins[0]), float(margins[1]))
        if self.margins[0] >= self.margins[1]:
            raise ValueError(f"margins must be (margin_in, margin_out) with margin_in < margin_out, got {margins}")
        self.data_noise = data_noise
        self.temperature = temperature
        self.output_key = output_key
        self.lr = lr
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_scale = 1.0  # a multiplier on every learning rate, lowered by DivergenceGuard's rollbacks
        self.channels_last = channels_last
        self.share_forward = can_share_forward(classifier, sampling_mode)  # data and samples in one forward
        self.step_stats: dict[str, Tensor] = {}  # the last training step's loss terms and energies (detached)
        self.val_metrics, self.test_metrics = CalibrationMetrics(), CalibrationMetrics()
        self._checked_stages: set[str] = set()
        self._drawn: tuple[tuple[int, int], tuple[Tensor | None, ...]] | None = None  # this step's data and samples

    @property
    def sampler(self) -> Sampler:
        return self.chains.sampler

    # ------------------------------------------------------------------ energies and samples
    def forward(self, x: Tensor) -> Tensor:
        """The classifier's logits ``[B, C]``."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return select_logits(self.classifier(x), self.output_key)

    def energy(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``E(x)`` (``y=None``) or ``E(x, y)`` at the module's temperature: ``[B]``."""
        logits = self(x)
        return marginal_energy(logits, self.temperature) if y is None else joint_energy(logits, y, self.temperature)

    def sample(self, n: int, y: Tensor | None = None, n_steps: int | None = None, from_buffer: bool = True) -> Tensor:
        """Draw ``n`` samples ``[n, *input_shape]`` (class-conditional when ``y [n]`` is given).

        Chains start from the replay buffer (``from_buffer=True``, conditional buffers only for ``y``) or from the
        initial distribution; the buffer is left unchanged. Works inside validation/inference mode as well.
        """
        y = y.to(self.device).long() if y is not None else None
        return self.chains.refine(self.energy, self.chains.start(n, y, from_buffer), y, n_steps)

    def purify(self, x: Tensor, n_steps: int) -> Tensor:
        """JEM's defence: ``n_steps`` of the sampler on ``log p(x)`` started at the inputs ``x``, before classifying."""
        return self.chains.refine(self.energy, x, None, n_steps)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch, x_out = split_outliers(batch)
        x, y = unpack_batch(batch)
        self._check_batch(x, y, "train")
        if x_out is not None and x_out.shape[1:] != x.shape[1:]:
            raise ValueError(f"outlier inputs have shape {tuple(x_out.shape[1:])}, the data {tuple(x.shape[1:])}")
        n, temperature = x.shape[0], self.temperature

        # 1. Sample: continue chains from the replay buffer (unconditional, and class-conditional with random labels).
        #    The energy-margin term without outliers in the batch uses the unconditional samples as outliers.
        #    An optimiser that evaluates a step twice (SAM) gets the same noisy data and samples again.
        if self._drawn is None or self._drawn[0] != (self.global_step, batch_idx):
            x_data = x + self.data_noise * torch.randn_like(x) if self.data_noise > 0 else x
            need_samples = self.px_weight > 0 or (self.margin_weight > 0 and x_out is None)
            x_q = self.chains.draw(self.energy, n) if need_samples else None
            y_q = torch.randint(0, self.num_classes, (n,), device=x.device) if self.pxy_weight > 0 else None
            x_qy = self.chains.draw(self.energy, n, y_q) if y_q is not None else None
            self._drawn = ((self.global_step, batch_idx), (x_data, x_q, y_q, x_qy))
        x_data, x_q, y_q, x_qy = self._drawn[1]
        if self.margin_weight <= 0:
            x_out = None

        # 2. Logits of data and samples, each half of a contrast computed by the same function of its input.
        logits_data, logits_contrast, logits_q, logits_qy, logits_out = self._logits(x_data, x_q, x_qy, x_out)

        # 3. Losses (in float32 whatever the autocast precision).
        e_data = marginal_energy(logits_contrast, temperature)
        ce = self.classification_loss(energy_matrix(logits_data, temperature), y)  # cross-entropy unless chosen
        stats = {"ce": ce, "energy_data": e_data.mean()}
        loss = self.ce_weight * stats["ce"]
        if logits_q is not None:
            e_q = marginal_energy(logits_q, temperature)
            stats["px"] = contrastive_divergence_loss(e_data, e_q)
            stats |= {"energy_sample": e_q.mean(), "energy_gap": -stats["px"]}
            stats["sample_norm"] = x_q.flatten(1).norm(dim=1).mean()
            if self.px_weight > 0:
                loss = loss + self.px_weight * stats["px"]
                if self.energy_l2_weight > 0:
                    loss = loss + self.energy_l2_weight * energy_l2_regularization(e_data, e_q)
        if self.margin_weight > 0:
            e_out = marginal_energy(logits_out, temperature) if logits_out is not None else e_q
            stats["margin"] = energy_margin_loss(e_data, e_out, *self.margins)
            stats["energy_outlier"] = e_out.mean()
            loss = loss + self.margin_weight * stats["margin"]
        if logits_qy is not None:
            e_joint = joint_energy(logits_contrast, y, temperature), joint_energy(logits_qy, y_q, temperature)
            stats["pxy"] = contrastive_divergence_loss(*e_joint)
            loss = loss + self.pxy_weight * stats["pxy"]
        stats["loss"] = loss

        # 4. Report (DivergenceGuard judges these) and log: tensors only, so no per-step host sync.
        self.step_stats = {name: value.detach() for name, value in stats.items()}
        self.log_dict({f"train/{k}": v for k, v in self.step_stats.items()}, on_step=True, on_epoch=False, batch_size=n)
        acc = (logits_data.argmax(1) == y).float().mean()
        self.log("train/acc", acc, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/acc_epoch", acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _logits(self, x_data: Tensor, *samples: Tensor | None) -> list[Tensor | None]:
        """Float32 logits: of the data in train mode (the classification term, BatchNorm statistics), then of the
        data and of each batch of samples for the generative contrasts (``None`` stays ``None``).

        Both halves of a contrast are normalised alike. Eval sampling mode: data and samples go through the eval-mode
        classifier (running statistics). Train mode: each batch is normalised by its own statistics, the data by the
        training forward, the samples untracked (measured on digits with a BatchNorm CNN, 300 steps: 0.90 test
        accuracy, against 0.54 when data and samples share one batch). Without BatchNorm or Dropout one forward
        serves all.
        """
        present = [s for s in samples if s is not None]
        sizes = [x_data.shape[0], *(s.shape[0] for s in present)]  # outlier batches may differ in size
        if self.share_forward:
            logits = list(self(torch.cat([x_data, *present])).split(sizes))
            logits.insert(0, logits[0])
        else:
            logits = [self(x_data)]
            with sampling_context(self.classifier, self.chains.sampling_mode):
                if self.chains.sampling_mode == "eval":
                    logits += list(self(torch.cat([x_data, *present])).split(sizes)) if present else [logits[0]]
                else:
                    logits += [logits[0], *(self(s) for s in present)]
        found = iter(logits[2:])
        sample_logits = [next(found).float() if s is not None else None for s in samples]
        return [logits[0].float(), logits[1].float(), *sample_logits]

    def _evaluation_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        x, y = unpack_batch(batch)
        self._check_batch(x, y, stage)
        logits = self(x).float()
        (self.val_metrics if stage == "val" else self.test_metrics).update(logits, y)
        energies = marginal_energy(logits, self.temperature)
        self.log(f"{stage}/energy", energies.mean(), on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        return {"logits": logits.detach(), "y": y}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Accumulates accuracy, NLL, Brier, ECE, MCE; returns the logits so that callbacks need no second forward."""
        return self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluation_step(batch, "test")

    def _log_calibration(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if metrics.update_called:  # CalibrationMetrics reduces across DDP ranks itself
            self.log_dict({f"{stage}/{k}": v for k, v in metrics.compute().items()})
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_calibration("val")

    def on_test_epoch_end(self) -> None:
        self._log_calibration("test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities ``[B, C]`` at the module's temperature."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x).float() / self.temperature, dim=1)

    # ------------------------------------------------------------------ set-up and checks
    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.classifier.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        # Under DDP every rank starts from the same seed; the chains of different ranks must differ, or each rank's
        # buffer shard would repeat the others'. Give each rank its own random stream for sampling and data noise.
        if self.trainer.world_size > 1:
            torch.manual_seed((torch.initial_seed() + 1_000_003 * self.global_rank) % 2**63)

    def on_train_start(self) -> None:
        # An initial distribution that learns from data (GaussianInit) is fitted before the first chains start.
        # With outlier exposure the Trainer's train loaders are {"data": ..., "outliers": ...}: fit on the data only.
        loaders = self.trainer.train_dataloader
        labelled = loaders["data"] if isinstance(loaders, dict) and "data" in loaders else loaders
        self.buffer.init.fit_loader(labelled, self.num_classes, self.device)

    def configure_callbacks(self) -> list[pl.Callback]:
        """A raising :class:`DivergenceGuard` unless the Trainer has one: a diverged run always stops by name."""
        has_guard = any(isinstance(c, DivergenceGuard) for c in self.trainer.callbacks)
        return [] if has_guard else [DivergenceGuard()]

    def _check_batch(self, x: Tensor, y: Tensor, stage: str) -> None:
        """Check every batch's input shape; check the first batch of each stage fully and size the buffer from it."""
        check_input_shape(x, self.buffer.input_shape, stage)
        if stage in self._checked_stages:
            return
        with torch.no_grad(), sampling_context(self.classifier, "eval"):  # a probe: touches no statistics
            self.num_classes = check_first_batch(x, y, self(x[:2]), self.num_classes)
        self.buffer.num_classes = self.num_classes
        if stage == "train":
            warn_if_outside_range(x, self.buffer.init.low, self.buffer.init.high)
        world_size = self.trainer.world_size if self._trainer is not None else 1
        self.buffer.ensure_initialized(x.shape[1:], x.device, world_size)  # this rank's shard
        self._checked_stages.add(stage)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        return configure_optimizer(
            self.classifier.parameters(), self.lr, self.optimizer_factory, self.lr_scheduler_factory
        )

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        warmup = min(1.0, (self.trainer.global_step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps else 1.0
        with scaled_learning_rates(optimizer, warmup * self.lr_scale):  # this step only, on top of the schedule
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank runs this hook; the file is written by rank zero, so it gets all ranks' buffer shards.
        checkpoint["state_dict"].update({f"buffer.{k}": v for k, v in self.buffer.gather_shards().items()})
        check_finite_parameters(self.classifier)
        checkpoint["jemkit"] = jemkit_section(self.classifier, self.num_classes, self.buffer.input_shape)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = check_jemkit_section(checkpoint, self.classifier, self.num_classes)
        if saved is not None and self.num_classes is None:
            self.num_classes = self.buffer.num_classes = saved

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
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            if not is_unreadable_checkpoint(checkpoint_path):
                raise
            raise ValueError(f"{checkpoint_path} is truncated or corrupted: it cannot be read as a checkpoint") from err
        except KeyError as err:
            raise ValueError(
                f"{checkpoint_path} is not a Lightning checkpoint of a JEM (missing key {err}); expected a file "
                "written by Trainer.fit / ModelCheckpoint or `jemkit fit`"
            ) from err


_DEFAULTS = {k: p.default for k, p in inspect.signature(JEM.__init__).parameters.items() if k != "self"}
