"""Quality benchmark: does a JEM keep its classifier's accuracy, improve its calibration, and recognise OOD inputs?

Trains, in one run and with equal optimiser steps, batches and seeds, the plain classifier (cross-entropy only, same
architecture, Adam) and a list of JEM configurations (the defaults, each preset, anything registered in ``CONFIGS``)
in scenarios that differ in data, units and architecture (``SCENARIOS``), all offline:

- ``digits``: scikit-learn's 8x8 digits in [-1, 1], SmallCNN; ``openset``: digits 0-4 only, 5-9 held out as near-OOD;
- ``digits-standard``: the digits normalised like ImageNet images ((x - mean) / std, about [-0.8, 1.9]), SmallCNN;
- ``digits-resnet``: the digits with a second image architecture (a small residual network);
- ``wine``: scikit-learn's wine, 13 features standardised with the train split's statistics, an MLP;
- ``cancer-binary``: breast cancer, 30 standardised features, an MLP with one output logit and 0/1 float labels;
- ``signals`` / ``signals-bn``: a synthetic 40-step 1-D signal set in raw amplitudes, a Conv1d classifier without
  and with BatchNorm1d;
- ``wine-bn``: wine with an MLP with BatchNorm1d;
- ``wine-open`` / ``signals-open``: wine's classes 0-1 (class 2 held out) and signals 0-4 (5-9 held out), near-OOD
  like ``openset``.

For every run it reports test accuracy, NLL and ECE (15 bins) before and after temperature scaling (``T`` fitted on
the validation split), and the AUROC of each OOD score (in-distribution positive) against uniform noise over the
training data's box (per feature for tabular rows, per channel otherwise), test inputs with their values permuted
(pixels, features or time steps), mixtures of two test inputs and (open sets) the held-out classes, plus the time per
training step. The scores: the classifier's own (``logpx``, ``msp``, ``max_logit``, ``grad_norm``) and the post-hoc
toolbox a user gets without training, pytorch-ood's Mahalanobis, RMD, KNN and ViM on the run's own features
(:mod:`jemkit.ood.detectors`, fitted on its training split): so every JEM is set beside the plain classifier plus the
toolbox, and the toolbox on the JEM's features shows what the JEM's representation is worth. Over seeds it gives mean
and standard deviation, as markdown tables and JSON, and checks each JEM against the plain classifier of the same run
(``TARGETS``; with ``--finetune``, against the pre-trained classifier).

    python benchmarks/quality.py --seeds 0 1 2 --steps 1500 --out benchmarks/results/quality
    python benchmarks/quality.py --configs plain default jempp --scenarios digits --seeds 0 --steps 300   # quick look
    python benchmarks/quality.py --configs plain default --scenarios wine signals --seeds 0 1 2

Runs are spread over ``--workers`` processes with one torch thread each (2 CPU cores: 2 workers).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmark_trainer import quiet_trainer  # noqa: E402

from jemkit import JEM, PYLD, SGLD, DigitsDataModule, GaussianInit, InputDomain, ReplayBuffer, UniformInit  # noqa: E402
from jemkit.batches import class_labels  # noqa: E402
from jemkit.data import FashionMNISTDataModule, SignalsDataModule, TabularDataModule  # noqa: E402
from jemkit.data.ood import InDomain, Interpolated, Mirrored, PixelShuffled, UniformNoise  # noqa: E402
from jemkit.loading import PlainClassifier  # noqa: E402
from jemkit.metrics import CalibrationMetrics, ood_metrics  # noqa: E402
from jemkit.metrics.generative import generative_metrics  # noqa: E402
from jemkit.metrics.temperature import fit_temperature  # noqa: E402
from jemkit.models import MLP, SignalCNN, SmallCNN, SmallResNet  # noqa: E402
from jemkit.ood.detectors import POSTHOC_DETECTORS  # noqa: E402
from jemkit.ood.pipeline import datamodule_ood_sets  # noqa: E402
from jemkit.ood.scores import FUSED_PARTS, FUSED_RULES, INPUT_PARTS, SCORES, PostHocScores, score_batches  # noqa: E402
from jemkit.optim import SAM  # noqa: E402
from jemkit.pictures import sample_pictures  # noqa: E402
from jemkit.sampling import SOURCES  # noqa: E402

OOD_SETS = ("noise", "shuffled", "mixtures", "vflip", "invert", "digits", "heldout")
NEAR_SETS = ("mixtures", "vflip", "invert", "digits", "heldout")  # near-OOD: where a density must beat the energy score
ALL_SCORES = (*SCORES, *POSTHOC_DETECTORS)  # the classifier's own scores, then pytorch-ood's detectors on its features
TOOLBOX_SETS = ("noise", "shuffled", "heldout")  # issue 26's targets against the post-hoc toolbox

# Score rules a JEM could recommend (issue 26, item 4), fused from the per-sample scores of the same forwards: each
# part standardised with its mean and standard deviation on the in-distribution *validation* inputs (never a test or
# OOD set), then summed ("a+b") or the smallest taken ("min(a,b)": an input is as in-distribution as its most doubtful
# score says). name -> (how, parts).
FUSIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "logpx+mahalanobis": ("sum", ("logpx", "mahalanobis")),
    "logpx+rmd": ("sum", ("logpx", "rmd")),
    "logpx+knn": ("sum", ("logpx", "knn")),
    "logpx+vim": ("sum", ("logpx", "vim")),
    "logpx+mahalanobis+knn": ("sum", ("logpx", "mahalanobis", "knn")),
    "logpx+mahalanobis+knn+rmd": ("sum", ("logpx", "mahalanobis", "knn", "rmd")),
    "logpx+mahalanobis+knn+rmd+vim": ("sum", ("logpx", "mahalanobis", "knn", "rmd", "vim")),
    "mahalanobis+knn": ("sum", ("mahalanobis", "knn")),  # the control: the same fusion without the JEM's density
    "logpx_ic": ("sum", FUSED_RULES["logpx_ic"]),  # the density corrected for input complexity (Serra et al. 2020)
    "min(logpx,mahalanobis,knn)": ("min", ("logpx", "mahalanobis", "knn")),
}
RULE_CANDIDATES = ("logpx", *POSTHOC_DETECTORS, *FUSIONS)  # one rule each, the same for every scenario


def _hold_out(dm: Any, kept: tuple[int, ...]) -> Any:
    """Train on the classes ``kept`` only (relabelled ``0..k-1``): the other classes' test inputs become
    ``dm.heldout_dataset``, near-OOD inputs, as ``DigitsDataModule(classes=...)`` does for the digits. The data module
    is set up here (its standardisation statistics, if any, come from the full training split)."""
    dm.setup("fit")
    keep = torch.tensor(kept)
    relabel = torch.full((int(dm.num_classes),), -1, dtype=torch.long)
    relabel[keep] = torch.arange(len(kept))

    def split(dataset: Any, held: bool) -> torch.utils.data.TensorDataset:
        x, y = dataset.tensors
        mask = torch.isin(class_labels(y), keep)
        if held:
            return torch.utils.data.TensorDataset(x[~mask], y[~mask])
        return torch.utils.data.TensorDataset(x[mask], relabel[y[mask]])

    dm.heldout_dataset = split(dm.test_dataset, held=True)
    dm.train_dataset, dm.val_dataset, dm.test_dataset = (
        split(d, held=False) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)
    )
    dm.num_classes = len(kept)
    return dm


def _cnn(dm: Any, batchnorm: bool, width: int) -> torch.nn.Module:
    return SmallCNN(num_classes=dm.num_classes, in_channels=1, width=width, norm="batch" if batchnorm else None)


FASHION_WIDTH = 16
"""Fashion-MNIST's classifier, whatever ``--width`` says: ``SmallCNN(width=16, pooled_size=4)`` (a 4x4 grid into
the head: global pooling reached 73.9% there, the grid 86.3%). A default step costs about 0.13 s on one core (0.32 s
at width 32), so 3 seeds of the from-scratch and fine-tuning scenarios fit in about an hour on 2 cores."""

EVAL_CAP = {"fashion": 2000, "fashion-open": 2000}
"""Test inputs per OOD set (and real and held-out inputs of FID/IS) for the large sets; accuracy and ECE use the
whole test split."""

SAMPLE_COUNT = 1000
"""Samples per source for FID/IS (capped by the scenario's test inputs)."""


def _fashion(classes: tuple[int, ...] | None = None) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(batch_size=64, val_size=5000, classes=classes)


def _fashion_cnn(dm: Any, batchnorm: bool, width: int) -> torch.nn.Module:
    norm = "batch" if batchnorm else None
    return SmallCNN(num_classes=dm.num_classes, in_channels=1, width=FASHION_WIDTH, norm=norm, pooled_size=4)


SCENARIOS: dict[str, tuple[Callable[[], Any], Callable[[Any, bool, int], torch.nn.Module]]] = {
    # name -> (datamodule factory, classifier factory(datamodule, batchnorm, width)); --batchnorm/--width: SmallCNN
    "digits": (lambda: DigitsDataModule(batch_size=64), _cnn),
    "openset": (lambda: DigitsDataModule(batch_size=64, classes=(0, 1, 2, 3, 4)), _cnn),
    "digits-standard": (lambda: DigitsDataModule(batch_size=64, normalization="standard"), _cnn),
    "digits-resnet": (
        lambda: DigitsDataModule(batch_size=64),
        lambda dm, bn, width: SmallResNet(num_classes=10, in_channels=1, norm="batch" if bn else None),
    ),
    "wine": (
        lambda: TabularDataModule(dataset="wine", batch_size=64),
        lambda dm, bn, width: MLP(dm.input_shape[0], dm.num_classes),
    ),
    "cancer-binary": (
        lambda: TabularDataModule(dataset="breast_cancer", batch_size=64, label_dtype="float"),
        lambda dm, bn, width: MLP(dm.input_shape[0], 1),
    ),
    "wine-open": (
        lambda: _hold_out(TabularDataModule(dataset="wine", batch_size=64), (0, 1)),
        lambda dm, bn, width: MLP(dm.input_shape[0], dm.num_classes),
    ),
    "signals": (lambda: SignalsDataModule(batch_size=64), lambda dm, bn, width: SignalCNN(dm.num_classes)),
    "signals-open": (
        lambda: _hold_out(SignalsDataModule(batch_size=64), (0, 1, 2, 3, 4)),
        lambda dm, bn, width: SignalCNN(dm.num_classes),
    ),
    "signals-bn": (
        lambda: SignalsDataModule(batch_size=64),
        lambda dm, bn, width: SignalCNN(dm.num_classes, norm="batch"),
    ),
    "wine-bn": (
        lambda: TabularDataModule(dataset="wine", batch_size=64),
        lambda dm, bn, width: MLP(dm.input_shape[0], dm.num_classes, norm="batch"),
    ),
    # real 28x28 images (Debian's dataset-fashion-mnist): all ten classes, and an open set of six (four held out)
    "fashion": (lambda: _fashion(), _fashion_cnn),
    "fashion-open": (lambda: _fashion((0, 1, 2, 3, 4, 5)), _fashion_cnn),
}
DIGITS_SCENARIOS = ("digits", "openset")  # the scenarios of earlier results files, the default of --scenarios

TARGETS = {
    "acc": "accuracy within 1 point of the plain classifier's",
    "ece": "ECE at most max(plain, 1%) + 0.5 point",
    "noise": "log p(x) AUROC >= 0.95 against noise in the data's box",
    "shuffled": "log p(x) AUROC >= 0.90 against permuted inputs",
    "beats_plain": "log p(x) AUROC above the plain classifier's own on noise and permuted inputs",
    "stable": "no run diverged",
    "ece_ts": "ECE after temperature scaling at most max(plain's after it, 1%) + 0.25 point",
    "toolbox": "log p(x) AUROC >= the best post-hoc score on the plain classifier - 0.005 (noise, permuted, held out)",
}


def _adam(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return partial(torch.optim.Adam, lr=lr)


# name -> JEM keyword arguments (built afresh for every run). "plain" is the classifier trained with cross-entropy only.
CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "plain": lambda: {"weights": {"px": 0.0}, "data_noise": 0.0, "lr": 1e-3},
    "default": lambda: {},
    "jem": lambda: {"preset": "jem"},
    "jempp": lambda: {"preset": "jempp"},
    "sada": lambda: {"preset": "sada"},
    # candidates measured while choosing the defaults (screens in benchmarks/results/screens/; written out in full
    # so that they keep their meaning when the defaults change)
    "jem-lr1e-3": lambda: _jem_lr1e3(),
    "jem-lr1e-3-l2": lambda: _jem_lr1e3() | {"weights": {"px": 1.0, "energy_l2": 0.1}},
    "jem-lr1e-3-clip": lambda: _jem_lr1e3() | {"sampler": SGLD(n_steps=20, noise_std=0.01, clip=(-1, 1))},
    "pyld5-gauss-lr1e-3": lambda: _pyld5() | {"weights": {"px": 1.0}},
    "pyld10-gauss-lr1e-3": lambda: _pyld5() | {"weights": {"px": 1.0}, "sampler": PYLD(n_steps=10, step_size=0.2)},
    "sgld10-gauss-lr1e-3": lambda: (
        _pyld5() | {"weights": {"px": 1.0}, "sampler": SGLD(n_steps=10, step_size=1.0, noise_std=0.01, clip=(-1, 1))}
    ),
    "sam-lr1e-3": lambda: _jem_lr1e3() | {"optimizer": partial(SAM, base="adam", rho=0.05, lr=1e-3)},
    "pyld5-px0.3": lambda: _pyld5() | {"weights": {"px": 0.3}},
    "pyld5-px0.1": lambda: _pyld5() | {"weights": {"px": 0.1}},
    "pyld5-px0.03": lambda: _pyld5() | {"weights": {"px": 0.03}},
    "pyld5-clean": lambda: _pyld5() | {"weights": {"px": 1.0}, "data_noise": 0.0},
    "pyld5-px0.3-clean": lambda: _pyld5() | {"weights": {"px": 0.3}, "data_noise": 0.0},
    "default-evalmode": lambda: {"sampling_mode": "eval"},
    # restarts of the chains (issue 27: box-only restarts for BatchNorm classifiers), written out in full
    "mix-restarts": lambda: {"buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.5))},
    "uniform-restarts": lambda: {"buffer": ReplayBuffer(init=UniformInit())},
    "box-l2-0.1": lambda: {"buffer": ReplayBuffer(init=UniformInit()), "weights": {"energy_l2": 0.1}},
    # candidates for data beyond digits (issue 20)
    "default-l2": lambda: {"weights": {"energy_l2": 0.01}},
    "l2-mix": lambda: {"weights": {"energy_l2": 0.01}, "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.5))},
    "l2-mix-px0.3": lambda: {
        "weights": {"px": 0.3, "energy_l2": 0.01},
        "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.5)),
    },
    "default-l2-0.1": lambda: {"weights": {"energy_l2": 0.1}},
    "default-px0.3": lambda: {"weights": {"px": 0.3}},
    "default-pyld10": lambda: {
        "sampler": PYLD(n_steps=10, step_size=0.2)
    },  # BatchNorm: the sampling mode "auto" does not choose
    # fine-tuning candidates (--finetune): start from the pre-trained classifier
    "finetune": lambda: {"preset": "finetune"},
    "ft-mix": lambda: {"preset": "finetune", "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.5))},
    "ft-box": lambda: {"preset": "finetune", "buffer": ReplayBuffer(init=UniformInit())},
    "ft-l2": lambda: {"preset": "finetune", "weights": {"energy_l2": 0.01}},
    "ft-mix-l2": lambda: {
        "preset": "finetune",
        "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.5)),
        "weights": {"energy_l2": 0.01},
    },
    "ft-mix-px0.1": lambda: {
        "preset": "finetune",
        "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.5)),
        "weights": {"px": 0.1},
    },
    "ft-default-lr1e-4": lambda: {"lr": 1e-4},
    "ft-px1-lr1e-4": lambda: {"lr": 1e-4, "weights": {"px": 1.0}},
    "ft-margin-samples": lambda: {"lr": 1e-4, "weights": {"px": 0.0, "margin": 0.1}},
    "ft-margin-px": lambda: {"lr": 1e-4, "weights": {"margin": 0.1}},
    "ft-px0.03": lambda: {"weights": {"px": 0.03}},
    "ft-clean": lambda: {"data_noise": 0.0},
    "ft-lr3e-4": lambda: {"lr": 3e-4},
    "ft-clean-lr3e-4": lambda: {"lr": 3e-4, "data_noise": 0.0},
    "ft-margin0.01": lambda: {"weights": {"margin": 0.01}},
    "ft-px0.03-margin0.01": lambda: {"weights": {"px": 0.03, "margin": 0.01}},
    "ft-rms": lambda: {"preset": "finetune", "sampler": PYLD(n_steps=5, step_size=0.05, scale="rms")},
    "ft-rms-mix": lambda: {
        "preset": "finetune",
        "sampler": PYLD(n_steps=5, step_size=0.05, scale="rms"),
        "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.2)),
    },
    # issue 33: samples that look like the data (Gaussian restarts only, heavier generative weight), written out
    "gauss-px0.1": lambda: {"buffer": ReplayBuffer(init=GaussianInit())},
    "gauss-px0.3": lambda: {"buffer": ReplayBuffer(init=GaussianInit()), "weights": {"px": 0.3}},
    "gauss-px1": lambda: {"buffer": ReplayBuffer(init=GaussianInit()), "weights": {"px": 1.0}},
    "gauss-px1-l2-0.1": lambda: {"buffer": ReplayBuffer(init=GaussianInit()), "weights": {"px": 1.0, "energy_l2": 0.1}},
    "mix-cap2000": lambda: {"buffer": ReplayBuffer(capacity=2000, init=GaussianInit(uniform_fraction=0.5))},
    "gauss-cap2000": lambda: {"buffer": ReplayBuffer(capacity=2000, init=GaussianInit())},
    "gauss-px0.3-cap2000": lambda: {"buffer": ReplayBuffer(capacity=2000, init=GaussianInit()), "weights": {"px": 0.3}},
    # sign-like proximal steps: every coordinate moves 0.2 a step once |dE/dx| > 0.001, whatever the energy's scale
    "mix-sign": lambda: {"sampler": PYLD(n_steps=5, step_size=200.0, eps=0.001)},
    "gauss-sign": lambda: {
        "sampler": PYLD(n_steps=5, step_size=200.0, eps=0.001),
        "buffer": ReplayBuffer(init=GaussianInit()),
    },
    "mix-sign-cap2000": lambda: {
        "sampler": PYLD(n_steps=5, step_size=200.0, eps=0.001),
        "buffer": ReplayBuffer(capacity=2000, init=GaussianInit(uniform_fraction=0.5)),
    },
    "mix-sign0.05": lambda: {"sampler": PYLD(n_steps=5, step_size=50.0, eps=0.001)},
    "mix-rms0.05": lambda: {"sampler": PYLD(n_steps=5, step_size=0.05, scale="rms")},
    "mix-rms0.1": lambda: {"sampler": PYLD(n_steps=5, step_size=0.1, scale="rms")},
    "gauss-rms0.05": lambda: {
        "sampler": PYLD(n_steps=5, step_size=0.05, scale="rms"),
        "buffer": ReplayBuffer(init=GaussianInit()),
    },
    "mix0.2-rms0.05": lambda: {
        "sampler": PYLD(n_steps=5, step_size=0.05, scale="rms"),
        "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.2)),
    },
    "mix0.2-rms0.05-px0.05": lambda: {
        "sampler": PYLD(n_steps=5, step_size=0.05, scale="rms"),
        "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.2)),
        "weights": {"px": 0.05},
    },
    "mix0.2-rms0.02": lambda: {
        "sampler": PYLD(n_steps=5, step_size=0.02, scale="rms"),
        "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.2)),
    },
    "mix0.2-rms0.05-noise": lambda: {
        "sampler": PYLD(n_steps=5, step_size=0.05, noise_std=0.01, scale="rms"),
        "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.2)),
    },
    "mix0.2-rms0.05-l2-0.1": lambda: {
        "sampler": PYLD(n_steps=5, step_size=0.05, scale="rms"),
        "buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.2)),
        "weights": {"energy_l2": 0.1},
    },
}


def _jem_lr1e3() -> dict[str, Any]:
    """The JEM paper's sampler and buffer (SGLD 20 x 1.0, uniform restarts) with Adam at 1e-3, no warm-up."""
    return {
        "weights": {"px": 1.0},
        "lr": 1e-3,
        "sampler": SGLD(n_steps=20, step_size=1.0, noise_std=0.01),
        "buffer": ReplayBuffer(capacity=10_000, reinit_prob=0.05),
    }


def _pyld5() -> dict[str, Any]:
    return {"lr": 1e-3, "sampler": PYLD(n_steps=5, step_size=0.2), "buffer": ReplayBuffer(init=GaussianInit())}


def _capped(dataset: Any, cap: int | None) -> Any:
    """The first ``cap`` items of a ``TensorDataset`` (all of them without a cap), as a ``TensorDataset``."""
    if cap is None or len(dataset) <= cap:
        return dataset
    return torch.utils.data.TensorDataset(*(t[:cap] for t in dataset.tensors))


def _ood_sets(dm: Any, seed: int, test: Any) -> dict[str, torch.utils.data.Dataset]:
    """Noise over the training data's box, the test inputs with their values permuted, mixtures; images also upside
    down and inverted; and the datamodule's own near-OOD sets (held-out classes, MNIST-style digits beside
    Fashion-MNIST)."""
    box = InputDomain().fit(dm.train_dataset.tensors[0][:10_000])
    shape = tuple(test.tensors[0].shape[1:])
    sets = {
        "noise": InDomain(UniformNoise(len(test), shape, seed=seed), box),
        "shuffled": PixelShuffled(test, seed=seed),
        "mixtures": Interpolated(test, seed=seed),
    }
    if len(shape) == 3:
        sets |= {"vflip": Mirrored(test, "vflip"), "invert": Mirrored(test, "invert", box)}
    return sets | datamodule_ood_sets(dm)


def _pretrained_path(cache: Path, scenario: str, seed: int, batchnorm: bool, width: int, steps: int) -> Path:
    """The plain classifier's weights of one scenario and seed, trained for ``steps``: pre-trained for fine-tuning,
    and the judge of the JEMs' samples."""
    return cache / f"{scenario}-seed{seed}-{'bn' if batchnorm else 'nonorm'}-w{width}-{steps}steps.pt"


def run_one(
    scenario: str,
    config: str,
    seed: int,
    steps: int,
    batchnorm: bool,
    width: int,
    pretrained: Path | None = None,
    save_to: Path | None = None,
    dump: Path | None = None,
    judge: Path | None = None,
) -> dict[str, Any]:
    """Train one configuration with one seed and measure it; one torch thread, no logger, no checkpoints.

    ``pretrained``: start from these classifier weights (the fine-tuning scenario; ``steps=0`` measures them as they
    are). ``save_to``: write the trained classifier's weights there. ``dump``: a folder where the per-sample scores
    of every split and the validation and test logits are saved (``<scenario>-<config>-seed<seed>.pt``), for
    analyses beyond the tables. ``judge``: the weights of the plain classifier of the same scenario and seed, which
    judges the samples of image scenarios (FID in its features, IS on its softmax); without one, the run's own
    classifier judges (the plain run itself).
    """
    import lightning.pytorch as pl

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    pl.seed_everything(seed, workers=True, verbose=False)
    make_data, make_model = SCENARIOS[scenario]
    dm = make_data()
    dm.setup("fit")
    dm.setup("test")  # a no-op for the modules that build every split at once
    classifier = make_model(dm, batchnorm, width)
    if pretrained is not None:
        classifier.load_state_dict(torch.load(pretrained, map_location="cpu"))
    jem = JEM(classifier, **CONFIGS[config]())
    start = time.perf_counter()
    if steps > 0:
        quiet_trainer(steps).fit(jem, dm)
    seconds = time.perf_counter() - start
    if save_to is not None:
        torch.save(classifier.state_dict(), save_to)
    jem.eval()
    x_test, y_test = dm.test_dataset.tensors
    y_test = class_labels(y_test)
    with torch.no_grad():
        logits = jem(x_test).float()
    calibration = CalibrationMetrics()
    calibration.update(logits, y_test)
    result: dict[str, Any] = {k: float(v) for k, v in calibration.compute().items() if k in ("acc", "nll", "ece")}
    result |= _temperature_scaled(jem, dm, logits, y_test)
    loader = partial(torch.utils.data.DataLoader, batch_size=256)
    # the post-hoc toolbox on this run's own features: fitted on its training split (at most 10,000 inputs, the
    # evaluation's default), as a user would; its scores come from the same forwards as the classifier's own (a hook
    # on the last linear layer's input)
    posthoc = PostHocScores.fit(jem, loader(_capped(dm.train_dataset, 10_000)), max_samples=None)
    cap = EVAL_CAP.get(scenario)
    test = _capped(dm.test_dataset, cap)
    ood = {name: _capped(d, cap) for name, d in _ood_sets(dm, seed, test).items()}
    splits = {"val": _capped(dm.val_dataset, cap), "test": test, **ood}
    if dump is not None:
        splits = {"train": _capped(dm.train_dataset, cap), **splits}
    own = (*SCORES, *INPUT_PARTS)  # the classifier's scores, and the input statistics that logpx_ic reads
    scores = {name: score_batches(jem, loader(d), own, jem.temperature, posthoc=posthoc) for name, d in splits.items()}
    auroc = _aurocs(scores)
    if dump is not None:
        _dump(dump, scenario, config, seed, jem, dm, scores)
    if x_test.dim() == 4 and steps > 0:  # images: how far the samples moved from their start, toward held-out data
        result["samples"] = _sample_quality(jem, dm, make_model, batchnorm, width, judge, test, cap)
        if dump is not None:  # and what they look like
            grids = {source: jem.sample(64, source=source) for source in SOURCES}
            sample_pictures(grids, dump, 8, jem.domain.bounds(), f"{scenario}-{config}-seed{seed}")
    result |= {
        "auroc": auroc,
        "posthoc_skipped": posthoc.detectors.skipped,
        "ms_per_step": 1000.0 * seconds / steps if steps else 0.0,
        "diverged": not math.isfinite(result["nll"]),
    }
    return {"scenario": scenario, "config": config, "seed": seed, **result}


def _sample_quality(
    jem: Any, dm: Any, make_model: Callable, batchnorm: bool, width: int, judge: Path | None, test: Any, cap: int | None
) -> dict[str, dict[str, float]]:
    """FID and IS of the JEM's samples from every source (:data:`~jemkit.sampling.SOURCES`: the buffer's chains, fresh
    chains, their starting distribution) and of held-out data (the validation split), against test inputs, judged by
    the plain classifier of the same scenario and seed (``judge``; the run's own classifier when there is none):
    FID in its penultimate features, IS on its softmax."""
    if judge is not None:
        network = make_model(dm, batchnorm, width)
        network.load_state_dict(torch.load(judge, map_location="cpu"))
        referee: torch.nn.Module = PlainClassifier(network)
    else:
        referee = PlainClassifier(jem.classifier, jem.output_key)
    n = min(SAMPLE_COUNT, len(test))
    loader = partial(torch.utils.data.DataLoader, batch_size=250)
    section = generative_metrics(
        jem, loader(test), num_samples=n, sources=SOURCES, judge=referee, heldout=loader(_capped(dm.val_dataset, cap)),
        batch_size=250,
    )  # fmt: skip
    return {source: {k: section[source][k] for k in ("fid", "is_mean", "steps")} for source in (*SOURCES, "data")}


def _temperature_scaled(jem: Any, dm: Any, test_logits: torch.Tensor, y_test: torch.Tensor) -> dict[str, float]:
    """Temperature scaling (Guo et al. 2017), the calibration a user gets without training: ``T`` fitted by NLL on
    the validation split (never the test set), then the test NLL and ECE of ``logits / T``."""
    x_val, y_val = dm.val_dataset.tensors
    with torch.no_grad():
        val_logits = jem(x_val).float()
    temperature = fit_temperature(val_logits, class_labels(y_val))
    scaled = CalibrationMetrics()
    scaled.update(test_logits / temperature, y_test)
    values = scaled.compute()
    return {"temperature": temperature, "nll_ts": float(values["nll"]), "ece_ts": float(values["ece"])}


def standardisation(reference: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """``{score: (mean, sd)}`` of in-distribution reference scores ``{score: [N]}`` (the validation split's): what
    :func:`fused_scores` standardises with. A constant score gets sd 1 (it then only shifts the sum)."""
    stats = {}
    for name, values in reference.items():
        values = values.double()
        sd = float(values.std()) if values.numel() > 1 else 0.0
        stats[name] = (float(values.mean()), sd if sd > 0.0 and math.isfinite(sd) else 1.0)
    return stats


def fused_scores(
    scores: dict[str, torch.Tensor], stats: dict[str, tuple[float, float]], fusions: dict | None = None
) -> dict[str, torch.Tensor]:
    """The :data:`FUSIONS` of per-sample scores ``{score: [M]}`` (higher = more in-distribution): each part
    standardised as ``(s - mean) / sd`` with ``stats`` (:func:`standardisation` of in-distribution validation
    scores), then summed or the smallest taken. Fusions whose parts are missing (ViM without a head) are left out."""
    out = {}
    for name, (how, parts) in (FUSIONS if fusions is None else fusions).items():
        if not all(p in scores and p in stats for p in parts):
            continue
        z = torch.stack([(scores[p].double() - stats[p][0]) / stats[p][1] for p in parts])
        out[name] = (z.sum(0) if how == "sum" else z.min(0).values).float()
    return out


def _aurocs(scores: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """``{OOD set: {score: AUROC}}`` from per-sample scores ``{split: {score: [M]}}`` of the ``val`` and ``test``
    splits and the OOD sets; the :data:`FUSIONS` are added to every split first (standardised on ``val``)."""
    reference = standardisation(scores["val"])
    for values in scores.values():
        values |= fused_scores(values, reference)
    return {
        name: {s: float(ood_metrics(scores["test"][s], values[s])["auroc"]) for s in scores["test"]}
        for name, values in scores.items()
        if name not in ("train", "val", "test")
    }


def _rescore(run: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``run`` with its AUROCs recomputed from its dumped per-sample scores (``--dump``) under the current
    :data:`FUSIONS`: new score rules measured on trained runs without training them again."""
    if "error" in run:
        return run
    path = folder / f"{run['scenario']}-{run['config']}-seed{run['seed']}.pt"
    if not path.exists():
        raise ValueError(f"no dumped scores for {run['scenario']} / {run['config']} / seed {run['seed']}: {path}")
    saved = torch.load(path, weights_only=True)["scores"]
    base = (*SCORES, *INPUT_PARTS, *POSTHOC_DETECTORS)
    scores = {split: {k: v for k, v in values.items() if k in base} for split, values in saved.items()}
    return run | {"auroc": _aurocs(scores)}


def _dump(folder: Path, scenario: str, config: str, seed: int, jem: Any, dm: Any, scores: dict[str, Any]) -> None:
    """Per-sample scores of every split, and validation and test logits with their labels, for later analyses."""
    folder.mkdir(parents=True, exist_ok=True)
    logits = {}
    with torch.no_grad():
        for split in ("val", "test"):
            x, y = getattr(dm, f"{split}_dataset").tensors
            logits[split] = (jem(x).float(), class_labels(y))
    torch.save({"scores": scores, "logits": logits}, folder / f"{scenario}-{config}-seed{seed}.pt")


def _run_star(args: tuple) -> dict[str, Any]:
    try:
        return run_one(*args)
    except Exception as err:  # a diverged or broken configuration is a result, not the end of the benchmark
        scenario, config, seed = args[:3]
        return {"scenario": scenario, "config": config, "seed": seed, "error": f"{type(err).__name__}: {err}"}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over seeds, per scenario and configuration."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["scenario"], run["config"]), []).append(run)
    summary: dict[str, dict[str, Any]] = {}
    for (scenario, config), group in groups.items():
        ok = [r for r in group if "error" not in r]
        entry: dict[str, Any] = {"seeds": len(group), "failed": [r["error"] for r in group if "error" in r]}
        if ok:
            for key in ("acc", "nll", "ece", "nll_ts", "ece_ts", "temperature", "ms_per_step"):
                entry[key] = _mean_sd([r[key] for r in ok])
            entry["auroc"] = {
                name: {s: _mean_sd([r["auroc"][name][s] for r in ok]) for s in scores}
                for name, scores in ok[0]["auroc"].items()
            }
            if all("samples" in r for r in ok):
                entry["samples"] = {
                    source: {k: _mean_sd([r["samples"][source][k] for r in ok]) for k in ("fid", "is_mean")}
                    for source in ok[0]["samples"]
                }
        summary.setdefault(scenario, {})[config] = entry
    return summary


def _cell(pair: tuple[float, float], scale: float = 1.0, digits: int = 3) -> str:
    mean, sd = pair
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def markdown(
    summary: dict[str, dict[str, Any]], steps: int, seeds: list[int], batchnorm: bool, pretrain_steps: int | None = None
) -> str:
    """Two tables per scenario: accuracy, NLL, ECE and log p(x) AUROC; then the best score's AUROC per OOD set."""
    what = f"{steps} steps of batch 64"
    if pretrain_steps is not None:
        what = (
            f"pre-trained with cross-entropy for {pretrain_steps} steps (row `pretrained`), then fine-tuned for " + what
        )
    lines = [
        f"{what}, seeds {seeds}{'; SmallCNN with BatchNorm' if batchnorm else ''}; mean ± sd over seeds. AUROC: "
        "in-distribution test inputs positive. Scenarios and architectures: see benchmarks/quality.py.",
        "",
    ]
    for scenario, configs in summary.items():
        sets = [s for s in OOD_SETS if any(s in c.get("auroc", {}) for c in configs.values())]
        header = (
            "| config | acc % | NLL | ECE % | ECE % after TS (T) | "
            + " | ".join(f"logpx vs {s}" for s in sets)
            + " | ms/step |"
        )
        lines += [f"**{scenario}**", "", header]
        lines.append("|---" * (6 + len(sets)) + "|")
        for name, c in configs.items():
            if "acc" not in c:
                lines.append(f"| {name} | failed: {c['failed'][0][:80]} |")
                continue
            row = [name, _cell(c["acc"], 100, 1), _cell(c["nll"]), _cell(c["ece"], 100, 1)]
            row.append(f"{_cell(c['ece_ts'], 100, 1)} ({c['temperature'][0]:.2f})")
            row += [_cell(c["auroc"][s]["logpx"]) for s in sets]
            row.append(f"{c['ms_per_step'][0]:.0f}")
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            "| config | " + " | ".join(f"best own score vs {s}" for s in sets) + " |",
            "|---" * (1 + len(sets)) + "|",
        ]
        for name, c in configs.items():
            if "acc" not in c:
                continue
            cells = []
            for s in sets:
                best = max(SCORES, key=lambda score, s=s: c["auroc"][s][score][0])
                cells.append(f"{_cell(c['auroc'][s][best])} ({best})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if any("samples" in c for c in configs.values()):
            sources = (*SOURCES, "data")
            lines += [
                "",
                "| config | " + " | ".join(f"{src} FID / IS" for src in sources) + " |",
                "|---" * (1 + len(sources)) + "|",
            ]
            for name, c in configs.items():
                if "samples" in c:
                    cells = [
                        f"{c['samples'][src]['fid'][0]:.1f} ± {c['samples'][src]['fid'][1]:.1f} / "
                        f"{c['samples'][src]['is_mean'][0]:.2f}"
                        for src in sources
                    ]
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| config + post-hoc detector (own features) | " + " | ".join(f"vs {s}" for s in sets) + " |",
            "|---" * (1 + len(sets)) + "|",
        ]
        for name, c in configs.items():
            for detector in POSTHOC_DETECTORS:
                if "acc" in c and all(detector in c["auroc"][s] for s in sets):
                    cells = [_cell(c["auroc"][s][detector]) for s in sets]
                    lines.append(f"| {name} + {detector} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _baseline(configs: dict[str, Any]) -> dict[str, Any] | None:
    """The plain classifier of a run: trained with cross-entropy only, or (fine-tuning) the pre-trained one."""
    for name in ("plain", "pretrained"):
        if "acc" in configs.get(name, {}):
            return configs[name]
    return None


def _jem_configs(summary: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, dict, dict]]:
    """``(scenario, config, its summary, the plain classifier's)`` for every trained JEM configuration of a run."""
    for scenario, configs in summary.items():
        plain = _baseline(configs)
        if plain is None:
            continue
        for name, c in configs.items():
            if name not in ("plain", "pretrained") and "acc" in c:
                yield scenario, name, c, plain


def _best(c: dict[str, Any], ood_set: str, scores: tuple[str, ...]) -> tuple[str, float]:
    """``(name, mean AUROC)`` of the best of ``scores`` against ``ood_set`` (picked per set: an oracle choice)."""
    present = [s for s in scores if s in c["auroc"][ood_set]]
    name = max(present, key=lambda s: c["auroc"][ood_set][s][0])
    return name, c["auroc"][ood_set][name][0]


def toolbox_table(summary: dict[str, dict[str, Any]]) -> str:
    """Every JEM configuration beside what its plain classifier gets without training (issue 26): calibration
    before and after temperature scaling, then per OOD set the JEM's ``log p(x)`` against the best post-hoc score
    of the plain classifier (its own scores and pytorch-ood's detectors on its features, best picked per set), and
    the same detectors on the JEM's own features."""
    cal = [
        "| scenario | config | acc % plain / JEM | ECE % plain / JEM | ECE % after TS plain / JEM | T plain / JEM |",
        "|---|---|---|---|---|---|",
    ]
    ood = [
        "| scenario | config | OOD set | plain: best own score | plain + best detector | JEM logpx "
        "| JEM + best detector | logpx >= best plain - 0.005 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario, name, c, plain in _jem_configs(summary):
        cal.append(
            f"| {scenario} | {name} | {100 * plain['acc'][0]:.1f} / {100 * c['acc'][0]:.1f} "
            f"| {100 * plain['ece'][0]:.1f} / {100 * c['ece'][0]:.1f} "
            f"| {100 * plain['ece_ts'][0]:.1f} / {100 * c['ece_ts'][0]:.1f} "
            f"| {plain['temperature'][0]:.2f} / {c['temperature'][0]:.2f} |"
        )
        for ood_set in OOD_SETS:
            if ood_set not in c["auroc"] or ood_set not in plain["auroc"]:
                continue
            own, own_auroc = _best(plain, ood_set, SCORES)
            det, det_auroc = _best(plain, ood_set, POSTHOC_DETECTORS)
            jem_det, jem_det_auroc = _best(c, ood_set, POSTHOC_DETECTORS)
            logpx = c["auroc"][ood_set]["logpx"][0]
            if ood_set in TOOLBOX_SETS:
                verdict = "yes" if logpx >= max(own_auroc, det_auroc) - 0.005 else "MISSED"
            else:
                verdict = "(no target)"
            ood.append(
                f"| {scenario} | {name} | {ood_set} | {own_auroc:.3f} ({own}) | {det_auroc:.3f} ({det}) "
                f"| {logpx:.3f} | {jem_det_auroc:.3f} ({jem_det}) | {verdict} |"
            )
    return "\n".join(
        [
            "Calibration: test ECE (15 bins) before and after temperature scaling (T fitted by NLL on the validation "
            "split).",
            "",
            *cal,
            "",
            "OOD detection, AUROC (mean over seeds; in-distribution test inputs positive). Post-hoc detectors: "
            "pytorch-ood's Mahalanobis, RMD, KNN and ViM on the input of the last linear layer, fitted on the "
            "training split; 'best' is picked per OOD set, an oracle choice no user could make in advance.",
            "",
            *ood,
            "",
        ]
    )


def verdicts(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each JEM configuration against the plain classifier of the same scenario and run, on every ``TARGETS`` item."""
    rows = []
    for scenario, configs in summary.items():
        plain = _baseline(configs)
        for name, c in configs.items():
            if name in ("plain", "pretrained") or plain is None:
                continue
            if "acc" not in c:
                rows.append({"scenario": scenario, "config": name, "checks": {"stable": False}})
                continue
            logpx = {s: c["auroc"][s]["logpx"][0] for s in ("noise", "shuffled")}
            plain_logpx = {s: plain["auroc"][s]["logpx"][0] for s in ("noise", "shuffled")}
            checks = {
                "acc": c["acc"][0] >= plain["acc"][0] - 0.01,
                "ece": c["ece"][0] <= max(plain["ece"][0], 0.01) + 0.005,
                "noise": logpx["noise"] >= 0.95,
                "shuffled": logpx["shuffled"] >= 0.90,
                "beats_plain": all(logpx[s] > plain_logpx[s] or logpx[s] >= 0.999 for s in logpx),
                "stable": not c["failed"],
                "ece_ts": c["ece_ts"][0] <= max(plain["ece_ts"][0], 0.01) + 0.0025,
                "toolbox": all(
                    c["auroc"][s]["logpx"][0] >= _best(plain, s, ALL_SCORES)[1] - 0.005
                    for s in TOOLBOX_SETS
                    if s in c["auroc"] and s in plain["auroc"]
                ),
            }
            rows.append({"scenario": scenario, "config": name, "checks": checks})
    return rows


def verdict_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per scenario and JEM configuration, one column per target (yes / MISSED)."""
    lines = ["| scenario | config | " + " | ".join(TARGETS) + " |", "|---" * (2 + len(TARGETS)) + "|"]
    for row in rows:
        marks = ["yes" if row["checks"].get(t, False) else "MISSED" for t in TARGETS]
        lines.append(f"| {row['scenario']} | {row['config']} | " + " | ".join(marks) + " |")
    legend = "; ".join(f"{k}: {v}" for k, v in TARGETS.items())
    return "\n".join(["Targets, against the plain classifier of the same run: " + legend + ".", "", *lines, ""])


def _meets(c: dict[str, Any], plain: dict[str, Any], ood_set: str, rule: str) -> bool | None:
    """Whether ``rule``'s mean AUROC reaches the plain classifier's best toolbox score - 0.005 (``None``: no rule)."""
    if rule not in c["auroc"][ood_set]:
        return None
    return c["auroc"][ood_set][rule][0] >= _best(plain, ood_set, ALL_SCORES)[1] - 0.005


def rule_table(summary: dict[str, dict[str, Any]], rules: tuple[str, ...] | None = None) -> str:
    """Each candidate score rule of a JEM (issue 26, item 4: one rule for every scenario; default ``logpx``, the
    detectors and the current :data:`FUSIONS`) against the plain classifier's best toolbox score per OOD set (its own
    scores and the detectors on its features, best picked per set), then how many targets each rule meets, on the JEM
    and, for reference, on the plain classifier."""
    rules = ("logpx", *POSTHOC_DETECTORS, *FUSIONS) if rules is None else rules
    head = "| scenario | config | OOD set | plain + toolbox (best) | " + " | ".join(rules) + " |"
    lines = [head, "|---" * (4 + len(rules)) + "|"]
    tally: dict[tuple[str, str], dict[str, list]] = {}  # (config, rule) -> {"met", "sets", "missed"}
    for scenario, configs in summary.items():
        plain = _baseline(configs)
        if plain is None:
            continue
        for name, c in configs.items():
            if "acc" not in c:
                continue
            for ood_set in TOOLBOX_SETS:
                if ood_set not in c["auroc"] or ood_set not in plain["auroc"]:
                    continue
                cells = []
                for rule in rules:
                    met = _meets(c, plain, ood_set, rule)
                    entry = tally.setdefault((name, rule), {"met": [], "sets": [], "missed": []})
                    if met is None:
                        cells.append("-")
                        continue
                    entry["sets"].append(scenario)
                    (entry["met"] if met else entry["missed"]).append((scenario, ood_set))
                    cells.append(f"{c['auroc'][ood_set][rule][0]:.3f}{'' if met else ' miss'}")
                if name in ("plain", "pretrained"):
                    continue
                best, value = _best(plain, ood_set, ALL_SCORES)
                lines.append(f"| {scenario} | {name} | {ood_set} | {value:.3f} ({best}) | " + " | ".join(cells) + " |")
    count = [
        "| config | rule | targets met (scenario x OOD set) | scenarios with every target met | missed |",
        "|---|---|---|---|---|",
    ]
    for (name, rule), entry in tally.items():
        scenarios = list(dict.fromkeys(entry["sets"]))
        failed = {sc for sc, _ in entry["missed"]}
        missed = ", ".join(f"{sc} {ood_set}" for sc, ood_set in entry["missed"]) or "-"
        count.append(
            f"| {name} | {rule} | {len(entry['met'])} / {len(entry['sets'])} "
            f"| {len([sc for sc in scenarios if sc not in failed])} / {len(scenarios)} | {missed} |"
        )
    return "\n".join(
        [
            "Score rules, AUROC (mean over seeds; in-distribution positive) against the plain classifier plus the "
            "post-hoc toolbox (best of its own scores and pytorch-ood's detectors on its features, picked per OOD "
            "set); 'miss': below that - 0.005. Fusions: each part standardised with its mean and sd on the "
            "in-distribution validation inputs, then summed ('a+b') or the smallest taken ('min(a,b)').",
            "",
            *lines,
            "",
            "Targets met per rule (the same rule on the plain classifier, for reference: what the rule gets without a "
            "JEM):",
            "",
            *count,
            "",
        ]
    )


DENSITY_SCORES = ("logpx", "logpx_ic")  # the JEM's density, and the same corrected for input complexity
RECOMMENDED = "+".join(FUSED_PARTS)  # the report's `fused` score, as FUSIONS names it
RECOMMENDED_SETS = ("noise", "vflip", "digits", "heldout")  # issue 33: against the best single detector


def density_table(summary: dict[str, dict[str, Any]]) -> str:
    """Issue 33's targets, per JEM configuration against the plain classifier of the same run: its density scores
    against the plain classifier's energy (its ``logpx``) on every OOD set; the recommended score against the plain
    classifier's best single score or detector (picked per set); samples against where their chains start and
    held-out data; and a step's cost in plain steps."""
    ood = [
        "| scenario | config | OOD set | plain energy | JEM logpx | JEM logpx_ic | recommended (fused) "
        "| plain's best single score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    samples = [
        "| scenario | config | buffer FID / init FID | fresh FID / init FID | buffer IS / data IS "
        "| fresh IS / data IS | step cost (plain steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, name, c, plain in _jem_configs(summary):
        for ood_set in OOD_SETS:
            if ood_set not in c["auroc"] or ood_set not in plain["auroc"]:
                continue
            energy = plain["auroc"][ood_set]["logpx"][0]
            cells = []
            for score in DENSITY_SCORES:
                value = c["auroc"][ood_set].get(score, (float("nan"),))[0]
                cells.append(f"{value:.3f}{'' if value >= energy - 0.005 else ' miss'}")
            best, best_auroc = _best(plain, ood_set, ALL_SCORES)
            fused = c["auroc"][ood_set].get(RECOMMENDED, (float("nan"),))[0]
            mark = "" if ood_set not in RECOMMENDED_SETS or fused >= best_auroc - 0.005 else " miss"
            ood.append(
                f"| {scenario} | {name} | {ood_set} | {energy:.3f} | {' | '.join(cells)} | {fused:.3f}{mark} "
                f"| {best_auroc:.3f} ({best}) |"
            )
        if "samples" not in c:
            continue
        cost = c["ms_per_step"][0] / plain["ms_per_step"][0] if plain["ms_per_step"][0] else float("nan")
        q = {source: {k: v[0] for k, v in values.items()} for source, values in c["samples"].items()}
        fid = [q[source]["fid"] / q["init"]["fid"] for source in ("buffer", "fresh")]
        inception = [q[source]["is_mean"] / q["data"]["is_mean"] for source in ("buffer", "fresh")]
        samples.append(
            f"| {scenario} | {name} "
            + "".join(f"| {r:.2f}{'' if r <= 1 / 3 else ' miss'} " for r in fid)
            + "".join(f"| {r:.2f}{'' if r >= 0.7 else ' miss'} " for r in inception)
            + (f"| {cost:.1f} |" if math.isfinite(cost) else "| - |")
        )
    return "\n".join(
        [
            "Density and samples (issue 33), means over seeds. OOD AUROC: the JEM's density scores against the plain "
            "classifier's energy ('miss': below it - 0.005, on every set); the recommended score against the plain "
            "classifier's best single score or detector, picked per set ('miss' on noise, vflip, digits, held-out "
            "classes: below it - 0.005).",
            "",
            *ood,
            "",
            "Samples, judged by the plain classifier of the same run (FID in its features, IS on its softmax): FID as "
            "a fraction of the chains' starting distribution's ('miss' above 1/3), IS as a fraction of held-out "
            "data's ('miss' below 0.7); the cost of a step in plain steps (ms/step ratio, same run).",
            "",
            *samples,
            "",
        ]
    )


def _map(fn: Callable[[tuple], dict[str, Any]], jobs: list[tuple], workers: int) -> list[dict[str, Any]]:
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            return pool.map(fn, jobs, chunksize=1)
    return [fn(job) for job in jobs]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["plain", "default", "jem", "jempp", "sada"])
    parser.add_argument("--scenarios", nargs="+", default=list(DIGITS_SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps for every configuration")
    parser.add_argument("--width", type=int, default=32, help="SmallCNN width (the digits recipe's: 32)")
    parser.add_argument("--batchnorm", action="store_true", help="the classifier with BatchNorm after each conv")
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="pre-train the plain classifier for --steps, then fine-tune each config for --finetune_steps from it",
    )
    parser.add_argument("--finetune_steps", type=int, help="fine-tuning steps (default: a fifth of --steps)")
    parser.add_argument(
        "--cache", type=Path, default=Path("benchmarks/results/.pretrained"), help="pre-trained weights"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    parser.add_argument("--dump", type=Path, help="save every run's per-sample scores and logits in this folder")
    parser.add_argument(
        "--from_json",
        type=Path,
        nargs="+",
        help="train nothing: rebuild the tables from the runs of these result files (several runs merge)",
    )
    parser.add_argument(
        "--rescore",
        type=Path,
        help="with --from_json: recompute every AUROC (and the current FUSIONS) from the runs' scores dumped here",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        return _tables_from(args.from_json, args.out, args.rescore)
    if args.rescore is not None:
        parser.error("--rescore reads the runs of --from_json files")
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {sorted(CONFIGS)}")
    common = (args.batchnorm, args.width)
    args.cache.mkdir(parents=True, exist_ok=True)
    paths = {
        (sc, seed): _pretrained_path(args.cache, sc, seed, *common, args.steps)
        for sc in args.scenarios
        for seed in args.seeds
    }
    if args.finetune:  # pre-train once per scenario and seed (cached), then fine-tune every config from it
        pretrain = [(sc, "plain", seed, args.steps, *common, None, path) for (sc, seed), path in paths.items()]
        _map(_run_star, [job for job in pretrain if not job[7].exists()], args.workers)
        steps = args.finetune_steps or args.steps // 5
        jobs = [
            (sc, "plain", seed, 0, *common, paths[sc, seed], None, args.dump, paths[sc, seed])
            for sc in args.scenarios
            for seed in args.seeds
        ]
        jobs += [
            (sc, config, seed, steps, *common, paths[sc, seed], None, args.dump, paths[sc, seed])
            for seed in args.seeds
            for sc in args.scenarios
            for config in args.configs
        ]
        runs = _map(_run_star, jobs, args.workers)
    else:  # the plain classifiers first: each judges the samples of the JEMs of its scenario and seed
        steps = args.steps
        first = [
            (sc, "plain", seed, steps, *common, None, paths[sc, seed], args.dump)
            for seed in args.seeds
            for sc in args.scenarios
            if "plain" in args.configs
        ]
        then = [
            (sc, config, seed, steps, *common, None, None, args.dump, paths[sc, seed] if first else None)
            for seed in args.seeds
            for sc in args.scenarios
            for config in args.configs
            if config != "plain"
        ]
        runs = _map(_run_star, first, args.workers) + _map(_run_star, then, args.workers)
    if args.finetune:
        for run in runs[: len(args.scenarios) * len(args.seeds)]:
            run["config"] = "pretrained"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["trained_steps"] = steps
    return _report(runs, settings, args.out)


def _report(runs: list[dict[str, Any]], settings: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Summarise runs, print the tables and write ``<out>.json`` / ``<out>.md``."""
    summary = summarise(runs)
    seeds = sorted({r["seed"] for r in runs})
    pretrain_steps = settings["steps"] if settings.get("finetune") else None
    table = markdown(summary, settings["trained_steps"], seeds, settings.get("batchnorm", False), pretrain_steps)
    checks = verdicts(summary)
    if checks:
        table += "\n" + verdict_table(checks) + "\n" + toolbox_table(summary) + "\n" + rule_table(summary)
        table += "\n" + density_table(summary)
    print(table)
    result = {"settings": settings, "summary": summary, "verdicts": checks, "runs": runs}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        # appended, not with_suffix: a name such as "px0.03" keeps its dot
        Path(f"{out}.json").write_text(json.dumps(result, indent=1))
        Path(f"{out}.md").write_text(table + "\n")
    return result


def _tables_from(files: list[Path], out: Path | None, rescore: Path | None = None) -> dict[str, Any]:
    """The tables of the runs saved in earlier result files, merged (e.g. scenarios run in separate invocations);
    with ``rescore``, their AUROCs recomputed from the per-sample scores dumped there."""
    saved = [json.loads(Path(f).read_text()) for f in files]
    settings = [r["settings"] for r in saved]
    steps = {s.get("trained_steps", s.get("finetune_steps") or s["steps"]) for s in settings}
    if len(steps) > 1:
        raise ValueError(
            f"the result files trained for different numbers of steps {sorted(steps)}: merge like with like"
        )
    merged = dict(settings[0]) | {"from_json": [str(f) for f in files], "trained_steps": steps.pop()}
    runs = [run for r in saved for run in r["runs"]]
    if rescore is not None:
        merged["rescore"] = str(rescore)
        runs = [_rescore(run, rescore) for run in runs]
    return _report(runs, merged, out)


if __name__ == "__main__":
    main()
