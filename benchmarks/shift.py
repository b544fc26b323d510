"""Shift benchmark: accuracy and calibration under distribution shift, and test-time adaptation (issue 27).

Trains, with equal steps, batches and seeds, the plain classifier (cross-entropy only) and the JEM (jemkit's defaults,
or any configuration in ``CONFIGS``) in each scenario, fits a temperature on the clean validation split for each, and
measures them on the clean test split and under every shift of the data's kind at severities 1 to 5
(:mod:`jemkit.evaluate.shift`), side by side:

- ``plain``, ``plain + T`` (temperature scaling), ``plain + Tent``, ``plain + energy`` (TEA: the classifier's own
  energy with Langevin negatives, :class:`jemkit.adapt.EnergyAdaptation`), ``JEM``, ``JEM + T``, ``JEM + energy``;
  the adaptation rows only where the classifier has normalisation layers.

Scenarios (``SCENARIOS``): ``digits`` (8x8 digits in [-1, 1], SmallCNN without normalisation), ``digits-bn`` (the same
CNN with BatchNorm), ``signals`` / ``signals-bn`` (synthetic 1-D signals in raw amplitudes, SignalCNN without and with
BatchNorm1d), ``wine`` / ``wine-bn`` (13 standardised features, an MLP without and with BatchNorm1d), ``fashion`` /
``fashion-open`` (Fashion-MNIST, all classes or six of them, SmallCNN at width 16 with a 4x4 pooled grid). Test-time
adaptation runs only where the classifier has normalisation layers.

Targets (``TARGETS``), checked per scenario on means over seeds: the JEM's mean accuracy under shift at least the
plain classifier's minus 1 point; its mean ECE under shift at most the plain classifier's after temperature scaling;
on BatchNorm scenarios the energy adaptation's mean accuracy at severities 3-5 above no adaptation's and Tent's, with
at most 0.5 point lost on clean data.

    python benchmarks/shift.py --seeds 0 1 2 --steps 1500 --out benchmarks/results/shift
    python benchmarks/shift.py --scenarios digits --configs plain default uniform-restarts --no_adapt --seeds 0
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
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmark_trainer import quiet_trainer  # noqa: E402

from jemkit import JEM, PYLD, SGLD, DigitsDataModule, GaussianInit, InputDomain, ReplayBuffer, UniformInit  # noqa: E402
from jemkit.adapt import EnergyAdaptation, Tent, norm_parameters  # noqa: E402
from jemkit.data import FashionMNISTDataModule, SignalsDataModule, TabularDataModule  # noqa: E402
from jemkit.data.corruptions import corrupt, data_kind  # noqa: E402
from jemkit.energy import marginal_energy  # noqa: E402
from jemkit.evaluate.shift import shift_report  # noqa: E402
from jemkit.metrics import fit_temperature  # noqa: E402
from jemkit.models import MLP, SignalCNN, SmallCNN  # noqa: E402

SCENARIOS: dict[str, tuple[Callable[[], Any], Callable[[Any], torch.nn.Module]]] = {
    "digits": (lambda: DigitsDataModule(batch_size=64), lambda dm: SmallCNN(dm.num_classes, 1)),
    "digits-bn": (lambda: DigitsDataModule(batch_size=64), lambda dm: SmallCNN(dm.num_classes, 1, norm="batch")),
    "signals": (lambda: SignalsDataModule(batch_size=64), lambda dm: SignalCNN(dm.num_classes)),
    "signals-bn": (lambda: SignalsDataModule(batch_size=64), lambda dm: SignalCNN(dm.num_classes, norm="batch")),
    "wine": (
        lambda: TabularDataModule(dataset="wine", batch_size=64),
        lambda dm: MLP(dm.input_shape[0], dm.num_classes),
    ),
    "wine-bn": (
        lambda: TabularDataModule(dataset="wine", batch_size=64),
        lambda dm: MLP(dm.input_shape[0], dm.num_classes, norm="batch"),
    ),
    # real 28x28 images; SmallCNN(width=16, pooled_size=4) as in benchmarks/quality.py, 2,000 test images per set
    "fashion": (
        lambda: FashionMNISTDataModule(batch_size=64, val_size=5000),
        lambda dm: SmallCNN(dm.num_classes, 1, width=16, pooled_size=4),
    ),
    "fashion-open": (
        lambda: FashionMNISTDataModule(batch_size=64, val_size=5000, classes=(0, 1, 2, 3, 4, 5)),
        lambda dm: SmallCNN(dm.num_classes, 1, width=16, pooled_size=4),
    ),
}
MAX_SAMPLES = {"fashion": 2000, "fashion-open": 2000}
"""Test items per shifted set of the large scenarios (``--max_samples`` when smaller)."""

# name -> JEM keyword arguments, built afresh per run. "plain": the classifier trained with cross-entropy only.
CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "plain": lambda: {"weights": {"px": 0.0}, "data_noise": 0.0, "lr": 1e-3},
    "default": lambda: {},
    # candidates for the contrast failure (written out in full, so that they keep their meaning if defaults change)
    "uniform-restarts": lambda: {"buffer": ReplayBuffer(init=UniformInit())},
    "gaussian-restarts": lambda: {"buffer": ReplayBuffer(init=GaussianInit())},
    "px0.03": lambda: {"weights": {"px": 0.03}},
    "pyld20": lambda: {"sampler": PYLD(n_steps=20, step_size=0.2)},
    "no-data-noise": lambda: {"data_noise": 0.0},
    "l2-0.1": lambda: {"weights": {"energy_l2": 0.1}},
    "box-l2-0.1": lambda: {"buffer": ReplayBuffer(init=UniformInit()), "weights": {"energy_l2": 0.1}},
    "evalmode": lambda: {"sampling_mode": "eval"},
}

TARGETS = {
    "acc": "JEM mean accuracy under shift >= plain's - 1 point",
    "ece": "JEM mean ECE under shift <= plain's after temperature scaling",
    "tea_vs_none": "energy adaptation: accuracy at severities 3-5 above no adaptation (plain and JEM)",
    "tea_vs_tent": "energy adaptation of the plain classifier: accuracy at severities 3-5 above Tent's",
    "tea_clean": "energy adaptation loses at most 0.5 point of clean accuracy (plain and JEM)",
}

_KEEP = ("accuracy", "nll", "ece", "ece_scaled", "nll_scaled")


def _train(scenario: str, config: str, seed: int, steps: int) -> tuple[Any, JEM, float]:
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    make_data, make_model = SCENARIOS[scenario]
    dm = make_data()
    dm.setup("fit")
    dm.setup("test")  # a no-op for the modules that build every split at once
    jem = JEM(make_model(dm), **CONFIGS[config]())
    start = time.perf_counter()
    quiet_trainer(steps).fit(jem, dm)
    return dm, jem.eval(), time.perf_counter() - start


def _compact(section: dict[str, Any]) -> dict[str, Any]:
    """The figures the tables read: clean, means, per severity and per shift (mean over severities)."""
    pick = lambda m: {k: m[k] for k in _KEEP if k in m}  # noqa: E731
    per_shift = {
        name: pick({k: statistics.fmean(r[k] for r in rows.values()) for k in next(iter(rows.values()))})
        for name, rows in section["results"].items()
    }
    return {
        "clean": pick(section["clean"]),
        "mean": pick(section["mean"]),
        "mean_severe": pick(section["mean_severe"]) if section["mean_severe"] else {},
        "by_severity": {s: pick(m) for s, m in section["by_severity"].items()},
        "per_shift": per_shift,
    }


@torch.no_grad()
def contrast_diagnosis(jem: JEM, dm: Any, seed: int) -> dict[str, Any]:
    """Why contrast loss hurts: per contrast severity the accuracy, the mean energy and the share of the most
    predicted class; the same for the replay buffer's samples, with the spread of their values (contrast) on [0, 1]."""
    x, y = dm.test_dataset.tensors
    if data_kind(x.shape[1:]) != "image":
        return {}
    spread = lambda u: float(((u + 1) / 2).flatten(1).std(dim=1).mean())  # noqa: E731

    def describe(inputs: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        logits = jem(inputs)
        counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
        row = {"energy": float(marginal_energy(logits).mean()), "top_class_share": float(counts.max() / len(inputs))}
        row |= {"top_class": int(counts.argmax()), "spread": spread(jem.domain.to_unit(inputs))}
        if labels is not None:
            row["accuracy"] = float((logits.argmax(1) == labels).float().mean())
        return row

    result = {
        f"contrast{s}": describe(corrupt(x, "contrast", s, jem.domain, torch.Generator().manual_seed(seed)), y)
        for s in range(6)
    }
    if jem.buffer.is_initialized:
        result["buffer"] = describe(jem.domain.from_unit(jem.buffer.samples[:2000]))
    return result


def run_one(
    scenario: str,
    config: str,
    seed: int,
    steps: int,
    severities: list[int],
    adapt: bool,
    max_samples: int | None,
    tea_steps: int,
    adapt_lr: float = 1e-3,
    ablation: bool = False,
) -> dict[str, Any]:
    """Train one configuration with one seed; measure it under shift without and (if asked) with adaptation."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dm, jem, seconds = _train(scenario, config, seed, steps)
    x_val, y_val = dm.val_dataset.tensors
    with torch.no_grad():
        temperature = fit_temperature(jem(x_val), y_val.long().view(-1))
    test = dm.test_dataset
    if scenario in MAX_SAMPLES:
        max_samples = min(MAX_SAMPLES[scenario], max_samples or MAX_SAMPLES[scenario])
    common = {"severities": severities, "max_samples": max_samples, "seed": seed, "batch_size": 128}
    rows: dict[str, Any] = {}
    timings: dict[str, float] = {"train": seconds}
    start = time.perf_counter()
    rows["none"] = _compact(shift_report(jem, test, jem.domain, temperature, **common))
    timings["none"] = time.perf_counter() - start
    if adapt and norm_parameters(jem.classifier):
        sampler = SGLD(n_steps=tea_steps, step_size=0.1, noise_std=0.01, clip=(-1, 1))
        if config == "plain":  # a plain classifier, as a user would wrap it: the module and its data's box
            domain = InputDomain().fit(dm.train_dataset.tensors[0])
            adapters = {
                "tent": Tent(jem.classifier, lr=adapt_lr),
                "energy": EnergyAdaptation(jem.classifier, domain, sampler, lr=adapt_lr),
            }
            if ablation:  # what the test batch's BatchNorm statistics do alone, and each objective without them
                adapters |= {
                    "stats": Tent(jem.classifier, optimizer=partial(torch.optim.SGD, lr=0.0)),
                    "tent_running": Tent(jem.classifier, lr=adapt_lr, batch_statistics=False),
                    "energy_running": EnergyAdaptation(
                        jem.classifier, domain, sampler, lr=adapt_lr, batch_statistics=False
                    ),
                }
        else:
            adapters = {"energy": EnergyAdaptation(jem, sampler=sampler, lr=adapt_lr)}
        for name, adapter in adapters.items():
            torch.manual_seed(seed)
            start = time.perf_counter()
            rows[name] = _compact(shift_report(jem, test, jem.domain, temperature, adapt=adapter, **common))
            timings[name] = time.perf_counter() - start
    return {
        "scenario": scenario,
        "config": config,
        "seed": seed,
        "temperature": temperature,
        "rows": rows,
        "seconds": timings,
        "contrast_diagnosis": contrast_diagnosis(jem, dm, seed),
        "diverged": not math.isfinite(rows["none"]["clean"]["nll"]),
    }


def _run_star(args: tuple) -> dict[str, Any]:
    try:
        return run_one(*args)
    except Exception as err:  # a diverged or broken configuration is a result, not the end of the benchmark
        scenario, config, seed = args[:3]
        return {"scenario": scenario, "config": config, "seed": seed, "error": f"{type(err).__name__}: {err}"}


def _map(fn: Callable[[tuple], dict[str, Any]], jobs: list[tuple], workers: int) -> list[dict[str, Any]]:
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            return pool.map(fn, jobs, chunksize=1)
    return [fn(job) for job in jobs]


# ---------------------------------------------------------------------------------------------- summaries
def _label(config: str, row: str) -> str:
    base = "plain" if config == "plain" else ("JEM" if config == "default" else f"JEM[{config}]")
    return {
        "none": base,
        "scaled": f"{base} + T",
        "tent": f"{base} + Tent",
        "energy": f"{base} + energy",
        "stats": f"{base} + test-batch statistics only",
        "tent_running": f"{base} + Tent, running statistics",
        "energy_running": f"{base} + energy, running statistics",
    }[row]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _view(compact: dict[str, Any], scaled: bool) -> dict[str, Any]:
    """A row's figures; ``scaled`` reads NLL and ECE after the temperature (accuracy is unchanged by it)."""
    if not scaled:
        return compact
    swap = lambda m: m | {"ece": m["ece_scaled"], "nll": m["nll_scaled"]}  # noqa: E731
    return {
        "clean": swap(compact["clean"]),
        "mean": swap(compact["mean"]),
        "mean_severe": swap(compact["mean_severe"]) if compact["mean_severe"] else {},
        "by_severity": {s: swap(m) for s, m in compact["by_severity"].items()},
        "per_shift": {n: swap(m) for n, m in compact["per_shift"].items()},
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and sd over seeds: ``{scenario: {row label: {clean/mean/mean_severe/per_shift: {metric: (m, sd)}}}}``."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        if "error" in run:
            continue
        for row, compact in run["rows"].items():
            views = [("none", False), ("scaled", True)] if row == "none" else [(row, False)]
            for label, scaled in views:
                groups.setdefault((run["scenario"], _label(run["config"], label)), []).append(_view(compact, scaled))
    summary: dict[str, dict[str, Any]] = {}
    for (scenario, label), group in groups.items():
        entry: dict[str, Any] = {"seeds": len(group)}
        for part in ("clean", "mean", "mean_severe"):
            if group[0][part]:
                entry[part] = {k: _mean_sd([g[part][k] for g in group]) for k in ("accuracy", "nll", "ece")}
        entry["per_shift"] = {
            name: {k: _mean_sd([g["per_shift"][name][k] for g in group]) for k in ("accuracy", "ece")}
            for name in group[0]["per_shift"]
        }
        summary.setdefault(scenario, {})[label] = entry
    return summary


def _pct(pair: tuple[float, float]) -> str:
    return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"


def markdown(summary: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    """Per scenario: the side-by-side table, then accuracy and ECE per shift (mean over severities)."""
    lines = [
        f"{settings['steps']} training steps of batch 64, seeds {settings['seeds']}, severities "
        f"{settings['severities']}; mean ± sd over seeds, in percent. `+ T`: temperature fitted on clean validation "
        f"data; `+ Tent` / `+ energy`: adapted on each test batch of 128 (norm layers' affine parameters, Adam "
        f"{settings['adapt_lr']:g}, "
        f"one step per batch, reset per shift and severity; energy: SGLD {settings['tea_steps']} x 0.1, noise 0.01).",
        "",
    ]
    for scenario, rows in summary.items():
        lines += [f"**{scenario}**", ""]
        lines += [
            "| method | clean acc | clean ECE | shift acc | shift ECE | sev 3-5 acc | sev 3-5 ECE |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, entry in rows.items():
            severe = entry.get("mean_severe", {})
            cells = [
                _pct(entry["clean"]["accuracy"]),
                _pct(entry["clean"]["ece"]),
                _pct(entry["mean"]["accuracy"]),
                _pct(entry["mean"]["ece"]),
                _pct(severe["accuracy"]) if severe else "-",
                _pct(severe["ece"]) if severe else "-",
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        shifts = list(next(iter(rows.values()))["per_shift"])
        lines += ["", "Accuracy / ECE per shift (mean over severities):", ""]
        lines += ["| method | " + " | ".join(shifts) + " |", "|---" * (1 + len(shifts)) + "|"]
        for label, entry in rows.items():
            cells = [
                f"{100 * entry['per_shift'][s]['accuracy'][0]:.1f} / {100 * entry['per_shift'][s]['ece'][0]:.1f}"
                for s in shifts
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def verdicts(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets per scenario, on means over seeds (``None``: not applicable)."""
    rows = []
    for scenario, entries in summary.items():

        def get(label: str, part: str, key: str = "accuracy", entries: dict[str, Any] = entries) -> float:
            return entries[label][part][key][0]

        checks: dict[str, bool | None] = {t: None for t in TARGETS}
        if "JEM" in entries and "plain" in entries:
            checks["acc"] = get("JEM", "mean") >= get("plain", "mean") - 0.01
            checks["ece"] = get("JEM", "mean", "ece") <= get("plain + T", "mean", "ece")
        if "plain + energy" in entries:
            pairs = [("plain + energy", "plain")] + ([("JEM + energy", "JEM")] if "JEM + energy" in entries else [])
            checks["tea_vs_none"] = all(get(a, "mean_severe") > get(b, "mean_severe") for a, b in pairs)
            checks["tea_vs_tent"] = get("plain + energy", "mean_severe") > get("plain + Tent", "mean_severe")
            checks["tea_clean"] = all(get(a, "clean") >= get(b, "clean") - 0.005 for a, b in pairs)
        rows.append({"scenario": scenario, "checks": checks})
    return rows


def verdict_table(rows: list[dict[str, Any]]) -> str:
    mark = {True: "yes", False: "MISSED", None: "n/a"}
    lines = ["| scenario | " + " | ".join(TARGETS) + " |", "|---" * (1 + len(TARGETS)) + "|"]
    for row in rows:
        lines.append(f"| {row['scenario']} | " + " | ".join(mark[row["checks"][t]] for t in TARGETS) + " |")
    legend = "; ".join(f"{k}: {v}" for k, v in TARGETS.items())
    return "\n".join(["Targets: " + legend + ".", "", *lines, ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--configs", nargs="+", default=["plain", "default"], choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps for every configuration")
    parser.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--max_samples", type=int, default=None, help="cap on the test items shifted")
    parser.add_argument("--tea_steps", type=int, default=20, help="SGLD steps of the energy adaptation (TEA: 20)")
    parser.add_argument("--adapt_lr", type=float, default=1e-3, help="Adam learning rate of Tent and TEA (1e-3)")
    parser.add_argument("--no_adapt", action="store_true", help="skip the test-time adaptation rows")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="plain classifiers: also adapt with the test batch's statistics only, and Tent and energy adaptation "
        "with the running statistics (what each objective does apart from re-estimating BatchNorm's statistics)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--merge", nargs="+", type=Path, default=[], help="add the runs of earlier result files")
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if args.tea_steps < 1:
        parser.error("--tea_steps must be >= 1")
    adapt, extra = not args.no_adapt, (args.max_samples, args.tea_steps, args.adapt_lr, args.ablation)
    jobs = [
        (sc, config, seed, args.steps, args.severities, adapt and config in ("plain", "default"), *extra)
        for seed in args.seeds
        for sc in args.scenarios
        for config in args.configs
    ]
    jobs.sort(key=lambda job: (job[1] == "plain", job[0]))  # the slow JEM runs first, so that workers end together
    start = time.perf_counter()
    runs = [run for path in args.merge for run in json.loads(path.read_text())["runs"]]
    runs += _map(_run_star, jobs, args.workers)
    summary = summarise(runs)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["merge"] = [str(path) for path in args.merge]
    settings["seeds"] = sorted({run["seed"] for run in runs})
    checks = verdicts(summary)
    table = markdown(summary, settings) + "\n" + verdict_table(checks)
    failed = [f"{r['scenario']}/{r['config']}/seed {r['seed']}: {r['error']}" for r in runs if "error" in r]
    if failed:
        table += "\nFailed runs:\n" + "\n".join(f"- {f}" for f in failed) + "\n"
    table += f"\nWall time {time.perf_counter() - start:.0f} s with {args.workers} workers.\n"
    print(table)
    result = {"settings": settings, "summary": summary, "verdicts": checks, "runs": runs}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
        Path(f"{args.out}.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
