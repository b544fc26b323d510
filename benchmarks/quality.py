"""Quality benchmark: does a JEM keep its classifier's accuracy, improve its calibration, and recognise OOD inputs?

Trains, in one run and with equal optimiser steps, batches and seeds, the plain classifier (cross-entropy only, same
architecture, Adam) and a list of JEM configurations (the defaults, each preset, anything registered in ``CONFIGS``)
on scikit-learn's digits, in two scenarios:

- ``digits``: all 10 classes;
- ``openset``: digits 0-4 only; the test images of 5-9 are held out as near-OOD inputs.

For every run it reports test accuracy, NLL and ECE (15 bins), and the AUROC of each OOD score (``logpx``, ``msp``,
``max_logit``, ``grad_norm``; in-distribution positive) against uniform noise, pixel-shuffled test digits, mixtures of
two test digits and (open set) the held-out classes, plus the time per training step. Over seeds it gives mean and
standard deviation, as a markdown table and JSON.

    python benchmarks/quality.py --seeds 0 1 2 --steps 1500 --out benchmarks/results/quality
    python benchmarks/quality.py --configs plain default jempp --scenarios digits --seeds 0 --steps 300   # quick look

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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jemkit import JEM, PYLD, SGLD, DigitsDataModule, GaussianInit, ReplayBuffer  # noqa: E402
from jemkit.data.ood import Interpolated, PixelShuffled, UniformNoise  # noqa: E402
from jemkit.metrics import CalibrationMetrics, ood_metrics  # noqa: E402
from jemkit.models import SmallCNN  # noqa: E402
from jemkit.optim import SAM  # noqa: E402
from jemkit.scores import SCORES, score_batches  # noqa: E402

SCENARIOS = {"digits": None, "openset": (0, 1, 2, 3, 4)}
OOD_SETS = ("noise", "shuffled", "mixtures", "heldout")


def _adam(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return partial(torch.optim.Adam, lr=lr)


# name -> JEM keyword arguments (built afresh for every run). "plain" is the classifier trained with cross-entropy only.
CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "plain": lambda: {"px_weight": 0.0, "data_noise": 0.0, "lr": 1e-3},
    "default": lambda: {},
    "jem": lambda: {"preset": "jem"},
    "jempp": lambda: {"preset": "jempp"},
    "sada": lambda: {"preset": "sada"},
    # candidates measured while choosing the defaults (screens in benchmarks/results/screen*.md; written out in full
    # so that they keep their meaning when the defaults change)
    "jem-lr1e-3": lambda: _jem_lr1e3(),
    "jem-lr1e-3-l2": lambda: _jem_lr1e3() | {"energy_l2_weight": 0.1},
    "jem-lr1e-3-clip": lambda: _jem_lr1e3() | {"sampler": SGLD(n_steps=20, noise_std=0.01, clip=(-1, 1))},
    "pyld5-gauss-lr1e-3": lambda: _pyld5() | {"px_weight": 1.0},
    "pyld10-gauss-lr1e-3": lambda: _pyld5() | {"px_weight": 1.0, "sampler": PYLD(n_steps=10, step_size=0.2)},
    "sgld10-gauss-lr1e-3": lambda: (
        _pyld5() | {"px_weight": 1.0, "sampler": SGLD(n_steps=10, step_size=1.0, noise_std=0.01, clip=(-1, 1))}
    ),
    "sam-lr1e-3": lambda: _jem_lr1e3() | {"optimizer": partial(SAM, base="adam", rho=0.05, lr=1e-3)},
    "pyld5-px0.3": lambda: _pyld5() | {"px_weight": 0.3},
    "pyld5-px0.1": lambda: _pyld5() | {"px_weight": 0.1},
    "pyld5-px0.03": lambda: _pyld5() | {"px_weight": 0.03},
    "pyld5-clean": lambda: _pyld5() | {"px_weight": 1.0, "data_noise": 0.0},
    "pyld5-px0.3-clean": lambda: _pyld5() | {"px_weight": 0.3, "data_noise": 0.0},
    "default-evalmode": lambda: {"sampling_mode": "eval"},  # BatchNorm: the sampling mode "auto" does not choose
    # fine-tuning candidates (--finetune): start from the pre-trained classifier
    "finetune": lambda: {"preset": "finetune"},
    "ft-default-lr1e-4": lambda: {"lr": 1e-4},
    "ft-px1-lr1e-4": lambda: {"lr": 1e-4, "px_weight": 1.0},
    "ft-margin-samples": lambda: {"lr": 1e-4, "px_weight": 0.0, "margin_weight": 0.1},
    "ft-margin-px": lambda: {"lr": 1e-4, "margin_weight": 0.1},
    "ft-px0.03": lambda: {"px_weight": 0.03},
    "ft-clean": lambda: {"data_noise": 0.0},
    "ft-lr3e-4": lambda: {"lr": 3e-4},
    "ft-clean-lr3e-4": lambda: {"lr": 3e-4, "data_noise": 0.0},
    "ft-margin0.01": lambda: {"margin_weight": 0.01},
    "ft-px0.03-margin0.01": lambda: {"px_weight": 0.03, "margin_weight": 0.01},
}


def _jem_lr1e3() -> dict[str, Any]:
    """The JEM paper's sampler and buffer (SGLD 20 x 1.0, uniform restarts) with Adam at 1e-3, no warm-up."""
    return {
        "px_weight": 1.0,
        "lr": 1e-3,
        "sampler": SGLD(n_steps=20, step_size=1.0, noise_std=0.01),
        "buffer": ReplayBuffer(capacity=10_000, reinit_prob=0.05),
    }


def _pyld5() -> dict[str, Any]:
    return {"lr": 1e-3, "sampler": PYLD(n_steps=5, step_size=0.2), "buffer": ReplayBuffer(init=GaussianInit())}


def build_model(num_classes: int, batchnorm: bool, width: int) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=1, width=width, norm="batch" if batchnorm else None)


def _ood_sets(dm: DigitsDataModule, seed: int) -> dict[str, torch.utils.data.Dataset]:
    test = dm.test_dataset
    sets = {
        "noise": UniformNoise(len(test), dm.input_shape, seed=seed),
        "shuffled": PixelShuffled(test, seed=seed),
        "mixtures": Interpolated(test, seed=seed),
    }
    if dm.heldout_dataset is not None:
        sets["heldout"] = dm.heldout_dataset
    return sets


def _pretrained_path(cache: Path, scenario: str, seed: int, batchnorm: bool, width: int) -> Path:
    return cache / f"{scenario}-seed{seed}-{'bn' if batchnorm else 'nonorm'}-w{width}.pt"


def run_one(
    scenario: str,
    config: str,
    seed: int,
    steps: int,
    batchnorm: bool,
    width: int,
    pretrained: Path | None = None,
    save_to: Path | None = None,
) -> dict[str, Any]:
    """Train one configuration with one seed and measure it; one torch thread, no logger, no checkpoints.

    ``pretrained``: start from these classifier weights (the fine-tuning scenario; ``steps=0`` measures them as they
    are). ``save_to``: write the trained classifier's weights there.
    """
    import lightning.pytorch as pl

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = DigitsDataModule(batch_size=64, classes=SCENARIOS[scenario])
    dm.setup("fit")
    classifier = build_model(dm.num_classes, batchnorm, width)
    if pretrained is not None:
        classifier.load_state_dict(torch.load(pretrained, map_location="cpu"))
    jem = JEM(classifier, **CONFIGS[config]())
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    if steps > 0:
        trainer.fit(jem, dm)
    seconds = time.perf_counter() - start
    if save_to is not None:
        torch.save(classifier.state_dict(), save_to)
    jem.eval()
    x_test, y_test = dm.test_dataset.tensors
    with torch.no_grad():
        logits = jem(x_test).float()
    calibration = CalibrationMetrics()
    calibration.update(logits, y_test)
    result: dict[str, Any] = {k: float(v) for k, v in calibration.compute().items() if k in ("acc", "nll", "ece")}
    loader = partial(torch.utils.data.DataLoader, batch_size=256)
    scores_in = score_batches(jem, loader(dm.test_dataset), SCORES, jem.temperature)
    auroc: dict[str, dict[str, float]] = {}
    for name, dataset in _ood_sets(dm, seed).items():
        scores_out = score_batches(jem, loader(dataset), SCORES, jem.temperature)
        auroc[name] = {s: float(ood_metrics(scores_in[s], scores_out[s])["auroc"]) for s in SCORES}
    result |= {
        "auroc": auroc,
        "ms_per_step": 1000.0 * seconds / steps if steps else 0.0,
        "diverged": not math.isfinite(result["nll"]),
    }
    return {"scenario": scenario, "config": config, "seed": seed, **result}


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
            for key in ("acc", "nll", "ece", "ms_per_step"):
                entry[key] = _mean_sd([r[key] for r in ok])
            entry["auroc"] = {
                name: {s: _mean_sd([r["auroc"][name][s] for r in ok]) for s in SCORES} for name in ok[0]["auroc"]
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
        f"Digits, SmallCNN{' with BatchNorm' if batchnorm else ''}, {what}, seeds {seeds}; "
        "mean ± sd over seeds. AUROC: in-distribution test digits positive.",
        "",
    ]
    for scenario, configs in summary.items():
        sets = [s for s in OOD_SETS if any(s in c.get("auroc", {}) for c in configs.values())]
        header = "| config | acc % | NLL | ECE % | " + " | ".join(f"logpx vs {s}" for s in sets) + " | ms/step |"
        lines += [f"**{scenario}**", "", header]
        lines.append("|---" * (5 + len(sets)) + "|")
        for name, c in configs.items():
            if "acc" not in c:
                lines.append(f"| {name} | failed: {c['failed'][0][:80]} |")
                continue
            row = [name, _cell(c["acc"], 100, 1), _cell(c["nll"]), _cell(c["ece"], 100, 1)]
            row += [_cell(c["auroc"][s]["logpx"]) for s in sets]
            row.append(f"{c['ms_per_step'][0]:.0f}")
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "| config | " + " | ".join(f"best vs {s}" for s in sets) + " |", "|---" * (1 + len(sets)) + "|"]
        for name, c in configs.items():
            if "acc" not in c:
                continue
            cells = []
            for s in sets:
                best = max(SCORES, key=lambda score, s=s: c["auroc"][s][score][0])
                cells.append(f"{_cell(c['auroc'][s][best])} ({best})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _map(fn: Callable[[tuple], dict[str, Any]], jobs: list[tuple], workers: int) -> list[dict[str, Any]]:
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            return pool.map(fn, jobs, chunksize=1)
    return [fn(job) for job in jobs]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["plain", "default", "jem", "jempp", "sada"])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
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
    args = parser.parse_args(argv)
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {sorted(CONFIGS)}")
    common = (args.batchnorm, args.width)
    if args.finetune:  # pre-train once per scenario and seed (cached), then fine-tune every config from it
        args.cache.mkdir(parents=True, exist_ok=True)
        paths = {
            (sc, seed): _pretrained_path(args.cache, sc, seed, *common) for sc in args.scenarios for seed in args.seeds
        }
        pretrain = [(sc, "plain", seed, args.steps, *common, None, path) for (sc, seed), path in paths.items()]
        _map(_run_star, [job for job in pretrain if not job[-1].exists()], args.workers)
        steps = args.finetune_steps or args.steps // 5
        jobs = [(sc, "plain", seed, 0, *common, paths[sc, seed]) for sc in args.scenarios for seed in args.seeds]
        jobs += [
            (sc, config, seed, steps, *common, paths[sc, seed])
            for seed in args.seeds
            for sc in args.scenarios
            for config in args.configs
        ]
    else:
        steps = args.steps
        jobs = [
            (sc, config, seed, args.steps, *common)
            for seed in args.seeds
            for sc in args.scenarios
            for config in args.configs
        ]
    runs = _map(_run_star, jobs, args.workers)
    if args.finetune:
        for run in runs[: len(args.scenarios) * len(args.seeds)]:
            run["config"] = "pretrained"
    summary = summarise(runs)
    table = markdown(summary, steps, args.seeds, args.batchnorm, args.steps if args.finetune else None)
    print(table)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"settings": settings, "summary": summary, "runs": runs}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # appended, not with_suffix: a name such as "px0.03" keeps its dot
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
        Path(f"{args.out}.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
