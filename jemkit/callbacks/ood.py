"""Out-of-distribution detection during validation: how well the JEM's scores tell data from other inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from jemkit.adapters import sampling_context
from jemkit.callbacks._logging import log_to_tensorboard, run_dir
from jemkit.checks import check_integer
from jemkit.data.ood import check_ood_dataset, make_ood_dataset
from jemkit.detectors import POSTHOC_DETECTORS
from jemkit.evaluate.plots import save_figure, score_histogram
from jemkit.scores import FUSED_PARTS, SCORES, FusedScore, PostHocScores, compare_scores, reversed_scores, score_sets

__all__ = ["OODMonitor"]


class OODMonitor(Callback):
    """Score in-distribution validation inputs against OOD sets; log AUROC, AUPR and FPR95 per score and set.

    In-distribution inputs are the datamodule's ``val_dataset`` (the positive class); OOD sets are jemkit's built-in
    offline sets (uniform, gaussian, constant, shuffled, interp; see :mod:`jemkit.data.ood`), the noise sets drawn in
    the JEM's input domain, and any datasets you add.
    Logs ``val/ood/<set>/<score>/{auroc,aupr_in,aupr_out,fpr95}`` and writes a score histogram per score
    (``<log_dir>/ood/<score>_epoch=NNNN.png``, rank zero). Under DDP each rank scores its own share of every set and
    the metrics gather all ranks' scores (torchmetrics ``cat`` states), so every rank logs the same values.

    Args:
        ood_sets: names of built-in OOD sets.
        extra_sets: more OOD sets ``{name: Dataset}`` returning ``(input, label)`` pairs of the model's input shape.
        scores: which scores to compute (see :data:`jemkit.scores.SCORES`).
        every_n_epochs: validation epochs between measurements.
        max_samples: inputs per set (in-distribution and each OOD set).
        batch_size: scoring batch size.
        save_histograms: write score histograms.
        detectors: post-hoc detectors (pytorch-ood's, see :mod:`jemkit.detectors`) refitted at each measurement on
            the features of the first ``fit_samples`` training inputs and logged beside the JEM's scores, so a run
            shows whether its training beats what the classifier's features give without it (``()``: none).
        features: the classifier's layer whose output is the feature (default: the input of its last linear layer).
        fit_samples: training inputs the detectors are fitted on (the same ones on every rank).
        fused: also log the fused score (:class:`~jemkit.scores.FusedScore`), standardised on the validation inputs.

    Raises:
        ValueError: an OOD set is empty or its inputs' shape differs from the validation data's.

    Example::

        >>> trainer = pl.Trainer(callbacks=[OODMonitor(ood_sets=["uniform", "interp"], every_n_epochs=5)])
    """

    def __init__(
        self,
        ood_sets: Sequence[str] = ("uniform", "constant", "shuffled", "interp"),
        extra_sets: dict[str, Dataset] | None = None,
        scores: Sequence[str] = SCORES,
        every_n_epochs: int = 1,
        max_samples: int = 512,
        batch_size: int = 128,
        save_histograms: bool = True,
        detectors: Sequence[str] = POSTHOC_DETECTORS,
        features: str | None = None,
        fit_samples: int = 2000,
        fused: bool = True,
    ) -> None:
        if every_n_epochs < 1 or max_samples < 1 or batch_size < 1:
            raise ValueError(
                f"every_n_epochs, max_samples and batch_size must be >= 1, got {every_n_epochs}, {max_samples}, "
                f"{batch_size}"
            )
        if not ood_sets and not extra_sets:
            raise ValueError("OODMonitor needs at least one OOD set (ood_sets or extra_sets)")
        unknown = [s for s in scores if s not in SCORES]
        if unknown:
            raise ValueError(f"unknown OOD score(s) {unknown}; expected some of {list(SCORES)}")
        self.ood_sets = tuple(ood_sets)
        self.extra_sets = dict(extra_sets or {})
        self.scores = tuple(scores)
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.save_histograms = save_histograms
        unknown = [d for d in detectors if d not in POSTHOC_DETECTORS]
        if unknown:
            raise ValueError(f"unknown post-hoc detector(s) {unknown}; expected some of {list(POSTHOC_DETECTORS)}")
        self.detectors = tuple(detectors)
        self.features = features
        self.fit_samples = check_integer("fit_samples", fit_samples)
        self.fused = fused
        self.last: dict[str, dict[str, dict[str, float]]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ood_sets=self.ood_sets, scores=self.scores)

    def _reference(self, trainer: pl.Trainer) -> Dataset:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "val_dataset", None) if datamodule is not None else None
        if dataset is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError("OODMonitor needs validation data: a datamodule with val_dataset or a val dataloader")
        return dataset

    def _shard(self, dataset: Dataset, trainer: pl.Trainer) -> DataLoader:
        """This rank's share of the first ``max_samples`` inputs."""
        n = min(len(dataset), self.max_samples)
        indices = range(trainer.global_rank, n, trainer.world_size)
        return DataLoader(Subset(dataset, indices), batch_size=self.batch_size, shuffle=False)

    def _fit_detectors(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PostHocScores | None:
        """The post-hoc detectors on the first ``fit_samples`` training inputs (every rank fits the same ones)."""
        if not self.detectors:
            return None
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "train_dataset", None) if datamodule is not None else None
        if dataset is None:
            loader = trainer.train_dataloader
            dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            rank_zero_warn("OODMonitor: no training dataset to fit the post-hoc detectors on; they are skipped")
            return None
        n = min(len(dataset), self.fit_samples)
        loader = DataLoader(Subset(dataset, range(n)), batch_size=self.batch_size, shuffle=False)
        return PostHocScores.fit(pl_module, loader, self.detectors, self.features, n, pl_module.device)

    def _fused(self, trainer: pl.Trainer, in_scores: dict[str, Tensor]) -> FusedScore | None:
        """The fused score, standardised on the in-distribution validation inputs of every rank (moments summed
        across ranks, so every rank fuses with the same statistics); ``None`` without its parts."""
        if not self.fused or not all(part in in_scores for part in FUSED_PARTS):
            return None
        stats = {}
        for part in FUSED_PARTS:
            values = in_scores[part].double()
            moments = torch.stack(
                [torch.tensor(float(len(values)), dtype=torch.float64), values.sum(), (values**2).sum()]
            )
            n, total, squares = trainer.strategy.reduce(moments, reduce_op="sum").tolist()
            if n < 2:
                return None
            mean = total / n
            sd = math.sqrt(max(squares / n - mean**2, 0.0) * n / (n - 1))
            stats[part] = (mean, sd if sd > 0 else 1.0)
        return FusedScore(FUSED_PARTS, stats)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs != 0:
            return
        reference = self._reference(trainer)
        input_shape = tuple(reference[0][0].shape)
        domain = getattr(pl_module, "domain", None)  # synthetic sets are drawn where the data lives
        n = min(len(reference), self.max_samples)
        sets = {name: make_ood_dataset(name, reference, n, domain=domain) for name in self.ood_sets}
        sets |= self.extra_sets
        for name, dataset in sets.items():
            check_ood_dataset(dataset, input_shape, name)
        with sampling_context(pl_module, "eval"):  # every submodule's own train/eval flag comes back after
            posthoc = self._fit_detectors(trainer, pl_module)
            in_scores, out_scores = score_sets(
                pl_module,
                self._shard(reference, trainer),
                {name: self._shard(dataset, trainer) for name, dataset in sets.items()},
                self.scores,
                getattr(pl_module, "temperature", 1.0),
                pl_module.device,
                posthoc=posthoc,
            )
        fused = self._fused(trainer, in_scores)
        if fused is not None:
            in_scores = fused.add_to(in_scores)
            out_scores = {name: fused.add_to(values) for name, values in out_scores.items()}
        results = compare_scores(in_scores, out_scores)
        for message in reversed_scores(results):
            rank_zero_warn(f"OODMonitor: {message}")
        for name, by_score in results.items():
            for score, values in by_score.items():
                for key, value in values.items():
                    pl_module.log(f"val/ood/{name}/{score}/{key}", value, on_epoch=True)
        histograms = {
            s: {"in-distribution": in_scores[s]} | {n: o[s] for n, o in out_scores.items()} for s in in_scores
        }
        self.last = results
        if self.save_histograms:
            self._save(trainer, histograms, run_dir(trainer))

    @rank_zero_only
    def _save(self, trainer: pl.Trainer, histograms: dict[str, dict[str, Tensor]], log_dir: Path) -> None:
        for score, groups in histograms.items():
            extra = {name: f"AUROC {self.last[name][score]['auroc']:.3f}" for name in self.last}
            figure = score_histogram(
                {k: v.cpu() for k, v in groups.items()}, title=f"OOD score {score}", xlabel=score, legend_extra=extra
            )
            log_to_tensorboard(trainer, f"ood/{score}", figure=figure)
            save_figure(figure, log_dir / "ood" / f"{score}_epoch={trainer.current_epoch:04d}.png")
