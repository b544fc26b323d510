"""Out-of-distribution detection during validation: how well the JEM's scores tell data from other inputs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from jemkit.callbacks._logging import log_to_tensorboard, run_dir
from jemkit.checks import check_integer
from jemkit.classifier import sampling_context
from jemkit.ood.pipeline import OODOptions, OODPipeline, OODResult, build_ood_sets, datamodule_ood_sets
from jemkit.ood.scores import reversed_scores
from jemkit.pictures import ood_histograms, save_figure

__all__ = ["OODMonitor"]


class OODMonitor(Callback):
    """Score in-distribution validation inputs against OOD sets; log AUROC, AUPR and FPR95 per score and set.

    What is measured is an :class:`~jemkit.ood.pipeline.OODOptions`, the options of ``jemkit evaluate --ood.*``, run
    through the same pipeline (:class:`~jemkit.ood.pipeline.OODPipeline`): the model's own scores, the post-hoc
    detectors fitted on the first ``options.fit_samples`` training inputs (the same on every rank) and the fused
    score, standardised on the in-distribution validation inputs. In-distribution inputs are the datamodule's
    ``val_dataset`` (the positive class); OOD sets are the built-in ones named by ``options.sets`` (noise drawn in the
    JEM's input domain), the datamodule's own near-OOD sets (``options.datamodule_sets``) and any datasets you add.
    Logs ``val/ood/<set>/<score>/{auroc,aupr_in,aupr_out,fpr95}`` and writes a score histogram per score
    (``<log_dir>/ood/<score>_epoch=NNNN.png``, rank zero). Under DDP each rank scores its own share of every set; the
    metrics and the fused score's reference are torchmetrics states gathered over all ranks, so every rank logs the
    same values.

    Args:
        options: what to measure (default :class:`~jemkit.ood.pipeline.OODOptions`: every built-in set, score and
            detector, and the fused score).
        extra_sets: more OOD sets ``{name: Dataset}`` returning ``(input, label)`` pairs of the model's input shape.
        every_n_epochs: validation epochs between measurements.
        max_samples: inputs per set (in-distribution and each OOD set), over all ranks.
        batch_size: scoring batch size.
        save_histograms: write score histograms.

    Raises:
        ValueError: an OOD set is empty or its inputs' shape differs from the validation data's.

    Example::

        >>> monitor = OODMonitor(OODOptions(sets=["uniform", "interp"], detectors=["knn"]), every_n_epochs=5)
        >>> trainer = pl.Trainer(callbacks=[monitor])
    """

    def __init__(
        self,
        options: OODOptions | None = None,
        extra_sets: dict[str, Dataset] | None = None,
        every_n_epochs: int = 1,
        max_samples: int = 512,
        batch_size: int = 128,
        save_histograms: bool = True,
    ) -> None:
        self.options = options if options is not None else OODOptions()
        self.options.check()
        self.extra_sets = dict(extra_sets or {})
        if self.options.sets == [] and not self.extra_sets and not self.options.datamodule_sets:
            raise ValueError("OODMonitor needs at least one OOD set (options.sets or extra_sets)")
        self.every_n_epochs = check_integer("every_n_epochs", every_n_epochs)
        self.max_samples = check_integer("max_samples", max_samples)
        self.batch_size = check_integer("batch_size", batch_size)
        self.save_histograms = save_histograms
        self.last: dict[str, dict[str, dict[str, float]]] = {}

    @property
    def state_key(self) -> str:
        sets = None if self.options.sets is None else tuple(self.options.sets)
        return self._generate_state_key(sets=sets, scores=tuple(self.options.scores))

    @staticmethod
    def _split(trainer: pl.Trainer, name: str) -> Dataset | None:
        """The datamodule's ``<name>_dataset``, else the dataset of the Trainer's ``<name>`` loader."""
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, f"{name}_dataset", None) if datamodule is not None else None
        if dataset is None:
            loaders = trainer.val_dataloaders if name == "val" else trainer.train_dataloader
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            dataset = getattr(loader, "dataset", None)
        return dataset if dataset is not None and hasattr(dataset, "__len__") else None

    def _shard(self, dataset: Dataset, trainer: pl.Trainer) -> DataLoader:
        """This rank's share of the first ``max_samples`` inputs."""
        n = min(len(dataset), self.max_samples)
        indices = range(trainer.global_rank, n, trainer.world_size)
        return DataLoader(Subset(dataset, indices), batch_size=self.batch_size, shuffle=False)

    def _train_loader(self, trainer: pl.Trainer) -> tuple[DataLoader | None, int]:
        """The first ``fit_samples`` training inputs (every rank fits the same detectors), and how many there are."""
        if not self.options.detectors:
            return None, 0
        dataset = self._split(trainer, "train")
        if dataset is None:
            rank_zero_warn("OODMonitor: no training dataset to fit the post-hoc detectors on; they are skipped")
            return None, 0
        n = min(len(dataset), self.options.fit_samples)
        return DataLoader(Subset(dataset, range(n)), batch_size=self.batch_size, shuffle=False), len(dataset)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs != 0:
            return
        reference = self._split(trainer, "val")
        if reference is None:
            raise ValueError("OODMonitor needs validation data: a datamodule with val_dataset or a val dataloader")
        domain = getattr(pl_module, "domain", None)  # synthetic sets are drawn where the data lives
        offered = datamodule_ood_sets(trainer.datamodule) if self.options.datamodule_sets else {}
        sets = build_ood_sets(reference, self.options.sets, self.max_samples, domain, offered | self.extra_sets)
        with sampling_context(pl_module, "eval"):  # every submodule's own train/eval flag comes back after
            pipeline = OODPipeline(pl_module, self.options).fit(*self._train_loader(trainer))
            shards = {name: self._shard(dataset, trainer) for name, dataset in sets.items()}
            result = pipeline.run(self._shard(reference, trainer), shards, fused_on="in")
        for message in reversed_scores(result.results):
            rank_zero_warn(f"OODMonitor: {message}")
        for name, by_score in result.results.items():
            for score, values in by_score.items():
                for key, value in values.items():
                    pl_module.log(f"val/ood/{name}/{score}/{key}", value, on_epoch=True)
        self.last = result.results
        if self.save_histograms:
            self._save(trainer, result, run_dir(trainer))

    @rank_zero_only
    def _save(self, trainer: pl.Trainer, result: OODResult, log_dir: Path) -> None:
        figures = ood_histograms(result.in_scores, result.out_scores, result.results, title="OOD score {score}")
        for score, figure in figures.items():
            log_to_tensorboard(trainer, f"ood/{score}", figure=figure)
            save_figure(figure, log_dir / "ood" / f"{score}_epoch={trainer.current_epoch:04d}.png")
