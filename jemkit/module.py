"""``JEM``: the LightningModule that turns any classifier into a Joint Energy-based Model.

The classifier stays the user's and is only called. The module wires a :class:`~jemkit.sampling.Chains` (sampler,
replay buffer, input domain, sampling mode) to :func:`~jemkit.losses.jem_objective`, which trains

    loss = ce * CE(f(x), y) + px * (E(x_data) - E(x_sample)) + ...        (see jem_objective for every term)

where the samples come from Langevin chains continued from the buffer (Grathwohl et al. 2020). Policies live
elsewhere: divergence handling in :class:`~jemkit.callbacks.DivergenceGuard`, which reads :attr:`JEM.step_stats`.
"""

from __future__ import annotations

import inspect
import itertools
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from jemkit._config import from_config, hparams_record
from jemkit.batches import split_outliers, unpack_batch
from jemkit.checkpoint import (
    check_finite_parameters,
    check_finite_state,
    check_jemkit_section,
    check_writable,
    jemkit_section,
    load_with_clear_errors,
)
from jemkit.checks import check_first_batch, check_input_scale, check_input_shape, check_jem_arguments
from jemkit.classifier import OutputKey, can_share_forward, sampling_context, select_logits
from jemkit.divergence import DivergenceError
from jemkit.energy import joint_energy, marginal_energy
from jemkit.losses import DEFAULT_WEIGHTS, DrawnInputs, JEMLogits, jem_objective, margins_from_energies
from jemkit.losses import classification_loss as classification_loss_fn
from jemkit.metrics.calibration import CalibrationMetrics
from jemkit.ood.scores import score_batches
from jemkit.optim import configure_optimizer, scaled_learning_rates
from jemkit.presets import resolve_settings
from jemkit.sampling import Chains, InitialDistribution, InputDomain, ReplayBuffer, Sampler

__all__ = ["JEM", "DivergenceError"]

_CONFIG_OBJECTS = (Sampler, InitialDistribution, ReplayBuffer, InputDomain)  # recorded as class_path/init_args
_LEGACY_WEIGHTS = {f"{name}_weight": name for name in DEFAULT_WEIGHTS}  # checkpoints of jemkit 0.1: px_weight=...


class JEM(pl.LightningModule):
    """Wrap a classifier ``f(x) -> logits [B, C]`` as a JEM and train it with ``cross-entropy + log p(x)``.

    ``forward`` returns the classifier's logits, so a JEM drops in wherever the classifier was used (a one-logit
    binary head ``g(x)`` is read as the two logits ``[-g(x) / 2, g(x) / 2]``). Settings left at ``None`` come from
    ``preset``, else from jemkit's defaults (:func:`jemkit.presets.default_settings`, chosen on
    ``benchmarks/quality.py``): proximal Langevin steps of a fixed size ``PYLD(n_steps=5, step_size=0.05,
    scale="rms")``, chains restarted 80% from per-class Gaussians and 20% from the input domain's box (from the box
    only when the classifier has BatchNorm: :func:`jemkit.presets.default_restarts`), ``log p(x)`` at weight 0.05
    with an energy regulariser of 0.01, data noise 0.03, Adam at 1e-3. An explicit argument always wins over the
    preset.

    Args:
        classifier: any ``nn.Module`` mapping a batch of inputs to logits (see ``output_key`` for tuple/dict outputs).
        preset: named settings of a published method (``"jem"``, ``"jempp"``, ``"sada"``) or jemkit's own
            (``"finetune"``, ``"rows"``; see :mod:`jemkit.presets`) for the arguments left at ``None``; resolved
            values are recorded in ``hparams``.
        num_classes: number of classes; inferred from the first batch's logits when ``None``.
        classification_loss: the classification term on the energies ``E(x, .)``: ``"ce"`` (cross-entropy at the
            module's temperature) or an EBM loss of :mod:`jemkit.losses` by name or as ``{"name": ..., **params}``.
        weights: the objective's weights by term, merged over the preset's and the defaults
            (:data:`~jemkit.losses.DEFAULT_WEIGHTS`): ``ce``, ``px`` (``log p(x)``; 0 trains a plain classifier),
            ``pxy`` (``log p(x|y)``, from a class-conditional buffer), ``energy_l2`` (keeps energies near 0),
            ``margin`` (the energy-margin term of Liu et al. 2020; paper: 0.1), e.g. ``weights={"px": 1.0}``.
        margins: ``(margin_in, margin_out)`` of the energy-margin term; ``None`` derives them from the classifier's own
            energies on the training data when training starts (the 10% quantile, and the 90% quantile plus the
            spread between the two): the paper's ``(-23, -5)`` only fit CIFAR WideResNets.
        data_noise: std of the Gaussian noise added to training inputs, in half-ranges of the input domain (JEM: 0.03).
        temperature: temperature ``T`` of the energies (``beta = 1/T``); 1 is the classifier's own softmax.
        sampler: the sampler, in the domain's unit coordinates (the data's box is ``[-1, 1]`` there).
        buffer: the replay buffer (class-conditional when ``weights["pxy"] > 0``).
        domain: where inputs live (:class:`~jemkit.sampling.InputDomain`): chains start, move and are clamped in its
            box. Default: fitted on the training data when training starts.
        sampling_mode: how BatchNorm/Dropout behave while sampling and in the p(x) contrast: ``"train"``, ``"eval"``
            or ``"auto"`` (default: ``"train"`` with BatchNorm, else ``"eval"``; see
            :func:`jemkit.classifier.resolve_sampling_mode`).
        output_key: how to read logits from a classifier returning a tuple/dict: a key, an index or a callable.
        lr: learning rate of the default Adam optimiser (ignored when ``optimizer`` is given).
        optimizer: optimiser factory ``params -> Optimizer`` (LightningCLI: ``class_path`` in YAML).
        lr_scheduler: optional scheduler factory ``optimizer -> LRScheduler``, stepped every epoch
            (``ReduceLROnPlateau`` watches ``val/nll``).
        lr_warmup_steps: scale the learning rate by ``(step + 1) / lr_warmup_steps`` over the first optimiser steps
            (JEM: 1000), on top of any schedule.
        compile: experimental, unmeasured on GPUs: compile each sampler step into one graph, ``True`` or a
            ``torch.compile`` mode (``"reduce-overhead"`` captures CUDA graphs). See :class:`~jemkit.sampling.Chains`.
        channels_last: run 4-D inputs and the classifier in channels-last memory format (faster convolutions).
        **legacy_weights: ``ce_weight``, ``px_weight``, ... as checkpoints of jemkit 0.1 record them; folded into
            ``weights``.

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
        weights: dict[str, float] | None = None,
        margins: tuple[float, float] | None = None,
        data_noise: float | None = None,
        temperature: float = 1.0,
        sampler: Sampler | None = None,
        buffer: ReplayBuffer | None = None,
        domain: InputDomain | None = None,
        sampling_mode: str = "auto",
        output_key: OutputKey = None,
        lr: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_warmup_steps: int | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
        **legacy_weights: float,
    ) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        unknown = sorted(set(legacy_weights) - set(_LEGACY_WEIGHTS))
        if unknown:
            raise TypeError(f"JEM got unexpected keyword argument(s) {unknown}")
        weights = {_LEGACY_WEIGHTS[k]: v for k, v in legacy_weights.items()} | dict(weights or {})
        sampler = from_config(sampler, Sampler) if isinstance(sampler, dict) else sampler
        buffer = from_config(buffer, ReplayBuffer) if isinstance(buffer, dict) else buffer
        domain = from_config(domain, InputDomain) if isinstance(domain, dict) else domain
        given = dict(sampler=sampler, buffer=buffer, weights=weights, data_noise=data_noise, lr=lr)
        given |= dict(lr_warmup_steps=lr_warmup_steps, optimizer=optimizer)
        settings = resolve_settings(preset, given, classifier)
        check_jem_arguments(settings, temperature, num_classes, margins)
        buffer = settings["buffer"]
        if settings["weights"]["pxy"] > 0 and not buffer.conditional:
            if given["buffer"] is not None or preset is not None:
                raise ValueError("weights['pxy'] > 0 samples per class: pass buffer=ReplayBuffer(conditional=True)")
            buffer.conditional = True  # jemkit's default buffer, made class-conditional
        buffer.num_classes = buffer.num_classes or num_classes
        domain = domain if domain is not None else InputDomain()
        record = settings | {"domain": domain, "margins": list(margins) if margins is not None else None}
        self.save_hyperparameters(hparams_record(inspect.currentframe(), _CONFIG_OBJECTS, record))

        self.classifier = classifier
        self.chains = Chains(classifier, settings["sampler"], buffer, domain, sampling_mode, compile)
        self.buffer, self.domain = buffer, domain  # registered here, so that checkpoints carry them
        self.preset, self.num_classes = preset, num_classes
        self.classification_loss = classification_loss_fn(classification_loss)
        self.weights = settings["weights"]
        self.margins = None if margins is None else (float(margins[0]), float(margins[1]))
        self.data_noise, self.temperature, self.output_key = settings["data_noise"], temperature, output_key
        self.lr, self.optimizer_factory, self.lr_scheduler_factory = settings["lr"], settings["optimizer"], lr_scheduler
        self.lr_warmup_steps = settings["lr_warmup_steps"]
        self.lr_scale = 1.0  # a multiplier on every learning rate, lowered by DivergenceGuard's rollbacks
        self.channels_last = channels_last
        self.share_forward = can_share_forward(classifier, self.chains.sampling_mode)  # one forward for all
        self.step_stats: dict[str, Tensor] = {}  # the last training step's loss terms and energies (detached)
        self.val_metrics, self.test_metrics = CalibrationMetrics(), CalibrationMetrics()
        self._checked_stages: set[str] = set()
        self._drawn: DrawnInputs | None = None
        self._probe: Tensor | None = None  # a few training inputs: a checkpoint's weights must give finite outputs
        self._epoch_acc: tuple[Tensor | float, int] = (0.0, 0)  # the epoch's sum of accuracy x batch size, and size

    @property
    def sampler(self) -> Sampler:
        return self.chains.sampler

    # ------------------------------------------------------------------ energies and samples
    def forward(self, x: Tensor) -> Tensor:
        """The classifier's logits ``[B, C]`` (``[B, 2]`` for a one-logit binary head)."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return select_logits(self.classifier(x), self.output_key)

    def energy(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``E(x)`` (``y=None``) or ``E(x, y)`` at the module's temperature: ``[B]``."""
        logits = self(x)
        return marginal_energy(logits, self.temperature) if y is None else joint_energy(logits, y, self.temperature)

    def sample(self, n: int, y: Tensor | None = None, n_steps: int | None = None, source: str = "buffer") -> Tensor:
        """Draw ``n`` samples ``[n, *input_shape]`` (class-conditional when ``y [n]`` is given).

        ``source="buffer"`` continues the chains the replay buffer holds (conditional buffers only for ``y``) for the
        sampler's steps; ``"fresh"`` starts new chains from the buffer's initial distribution and runs five times as
        many (:meth:`Chains.steps_for <jemkit.sampling.Chains.steps_for>`); ``n_steps`` overrides either; ``"init"``
        draws from that distribution without a step. The buffer is left unchanged. Works inside validation/inference
        mode as well.
        """
        y = y.to(self.device).long() if y is not None else None
        return self.chains.sample(self.energy, n, y, source, n_steps)

    def purify(self, x: Tensor, n_steps: int) -> Tensor:
        """JEM's defence: ``n_steps`` of the sampler on ``log p(x)`` started at the inputs ``x``, before classifying.

        Its exact gradient, for attacks through the defence, is :func:`jemkit.sampling.unrolled.unrolled_refine`.
        """
        return self.chains.refine(self.energy, x, None, n_steps)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch, x_out = split_outliers(batch)
        x, y = unpack_batch(batch)
        self._check_batch(x, y, "train")
        if x_out is not None and x_out.shape[1:] != x.shape[1:]:
            raise ValueError(f"outlier inputs have shape {tuple(x_out.shape[1:])}, the data {tuple(x.shape[1:])}")
        self._probe = x[:8].detach()
        drawn = self._draw(x, x_out, batch_idx)
        logits = self._logits(drawn)
        bad_labels = (y < 0) | (y >= self.num_classes)  # named by DivergenceGuard, without a host sync here
        loss, stats = jem_objective(
            logits, y.clamp(0, self.num_classes - 1), drawn.conditional_labels, self.weights, self.temperature,
            self.margins, self.classification_loss,
        )  # fmt: skip
        stats["bad_labels"] = bad_labels.sum().float()
        if drawn.sample is not None:
            stats["sample_norm"] = self.domain.to_unit(drawn.sample).flatten(1).norm(dim=1).mean()
        self.step_stats = {name: value.detach() for name, value in stats.items()}
        self._log_step((logits.data.argmax(1) == y).float().mean(), len(x))
        return loss

    def _log_step(self, acc: Tensor, batch_size: int) -> None:
        """``train/loss`` every step; each term, energy and the step's accuracy on the steps the loggers write (every
        ``Trainer(log_every_n_steps=...)``, 50 by default) and on the first, so that every key exists from the start;
        ``train/acc_epoch`` at the epoch's end. Lightning's ``self.log`` costs about 0.4 ms a call on a CPU (10% of a
        default step on the digits for eleven calls); ``step_stats`` holds every step's statistics for whoever needs
        them all."""
        log = partial(self.log, on_step=True, on_epoch=False, batch_size=batch_size)
        log("train/loss", self.step_stats["loss"])
        total, count = self._epoch_acc  # the batch-size-weighted mean Lightning's on_epoch logging would compute
        self._epoch_acc = (total + acc * batch_size, count + batch_size)
        every = self._trainer.log_every_n_steps if self._trainer is not None else 1
        if self.global_step == 0 or (every > 0 and (self.global_step + 1) % every == 0):
            for name, value in self.step_stats.items():
                if name != "loss":
                    log(f"train/{name}", value)
            log("train/acc", acc)

    def on_train_epoch_start(self) -> None:
        self._epoch_acc = (0.0, 0)

    def on_train_epoch_end(self) -> None:
        total, count = self._epoch_acc
        if count:
            self.log("train/acc_epoch", total / count, on_step=False, on_epoch=True, batch_size=count)

    def _draw(self, x: Tensor, x_out: Tensor | None, batch_idx: int) -> DrawnInputs:
        """The step's noisy data and samples, drawn once per ``(global step, batch)``."""
        key = (self.global_step, batch_idx)
        if self._drawn is not None and self._drawn.key == key:
            return self._drawn
        weights, n = self.weights, x.shape[0]
        noise = self.data_noise * torch.randn_like(x) * self.domain.scale_like(x) if self.data_noise > 0 else None
        drawn = DrawnInputs(key, x + noise if noise is not None else x)
        drawn.outlier = x_out if weights["margin"] > 0 else None
        if weights["px"] > 0 or (weights["margin"] > 0 and x_out is None):
            drawn.sample = self.chains.draw(self.energy, n)
        if weights["pxy"] > 0:
            drawn.conditional_labels = torch.randint(0, self.num_classes, (n,), device=x.device)
            drawn.conditional_sample = self.chains.draw(self.energy, n, drawn.conditional_labels)
        self._drawn = drawn
        return drawn

    def _logits(self, drawn: DrawnInputs) -> JEMLogits:
        """Float32 logits: the data's in train mode (the classification term, BatchNorm statistics), then the data's
        and each batch of samples' for the generative contrasts, both halves computed by the same function.

        Eval sampling mode: data and samples go through the eval-mode classifier (running statistics). Train mode:
        each batch is normalised by its own statistics, the data by the training forward, the samples untracked (one
        shared batch of data and samples trains far worse; see benchmarks/RESULTS.md). Without BatchNorm or Dropout
        one forward serves all.
        """
        batches = [b for b in drawn.extra_batches() if b is not None]
        sizes = [drawn.data.shape[0], *(b.shape[0] for b in batches)]  # outlier batches may differ in size
        if self.share_forward:
            data, *rest = self(torch.cat([drawn.data, *batches])).split(sizes)
            contrast = data
        else:
            data = self(drawn.data)
            with sampling_context(self.classifier, self.chains.sampling_mode):
                if self.chains.sampling_mode == "eval" and batches:
                    contrast, *rest = self(torch.cat([drawn.data, *batches])).split(sizes)
                else:
                    contrast, rest = data, [self(b) for b in batches]
        found = iter(r.float() for r in rest)
        sample, sample_y, outlier = (next(found) if b is not None else None for b in drawn.extra_batches())
        if outlier is None and self.weights["margin"] > 0:
            outlier = sample  # no outliers in the batch: the energy-margin term pushes up the samples
        return JEMLogits(data.float(), contrast.float(), sample, sample_y, outlier)

    # ------------------------------------------------------------------ evaluation
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
        for callback in self.trainer.checkpoint_callbacks:  # fail before the first step, not at the first save
            folder = getattr(callback, "dirpath", None)
            if folder is not None and self.trainer.is_global_zero and "://" not in str(folder):
                check_writable(Path(folder))

    def on_train_start(self) -> None:
        # The input domain and an initial distribution that learns (GaussianInit) are fitted before the first chains
        # start. With outlier exposure the train loaders are {"data": ..., "outliers": ...}: fit on the data only.
        loaders = self.trainer.train_dataloader
        labelled = loaders["data"] if isinstance(loaders, dict) and "data" in loaders else loaders
        self.chains.fit(labelled, self.num_classes, self.device)
        if self.weights["margin"] > 0 and self.margins is None:
            with sampling_context(self.classifier, "eval"):  # the classifier's own energies on 20 training batches
                log_px = score_batches(self, itertools.islice(labelled, 20), ["logpx"], self.temperature, self.device)
            self.margins = margins_from_energies(-log_px["logpx"])

    def configure_callbacks(self) -> list[pl.Callback]:
        """A raising :class:`DivergenceGuard` unless the Trainer has one: a diverged run always stops by name."""
        from jemkit.callbacks.divergence import DivergenceGuard  # a policy: the core does not import it at load

        has_guard = any(isinstance(c, DivergenceGuard) for c in self.trainer.callbacks)
        return [] if has_guard else [DivergenceGuard()]

    def _check_batch(self, x: Tensor, y: Tensor, stage: str) -> None:
        """Check every batch's input shape; check the first batch of each stage fully and size the buffer from it."""
        check_input_shape(x, self.chains.input_shape, stage)
        if stage in self._checked_stages:
            return
        with torch.no_grad(), sampling_context(self.classifier, "eval"):  # a probe: touches no statistics
            self.num_classes = check_first_batch(x, y, self(x[:2]), self.num_classes)
        if stage == "train":
            check_input_scale(x)
        world_size = self.trainer.world_size if self._trainer is not None else 1
        self.chains.prepare(tuple(x.shape[1:]), self.num_classes, x.device, world_size)  # this rank's shard
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
        check_finite_parameters(self.classifier, self._probe)
        checkpoint["jemkit"] = jemkit_section(self.classifier, self.num_classes, self.buffer.input_shape)
        if self.margins is not None:
            checkpoint["jemkit"]["margins"] = list(self.margins)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_state(checkpoint.get("state_dict", {}))
        saved = check_jemkit_section(checkpoint, self.classifier, self.num_classes)
        if saved is not None and self.num_classes is None:
            self.num_classes = self.buffer.num_classes = saved
        if self.margins is None and checkpoint["jemkit"].get("margins") is not None:
            self.margins = tuple(checkpoint["jemkit"]["margins"])

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
        """Lightning's ``load_from_checkpoint``, with clear errors for files that are not JEM checkpoints; checkpoints
        of jemkit 0.1 (``px_weight=...``) load too."""
        return load_with_clear_errors(super().load_from_checkpoint, checkpoint_path, _LEGACY_WEIGHTS, *args, **kwargs)
