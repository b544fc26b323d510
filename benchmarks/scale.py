"""Scale on paper, from measurements on a CPU: how a JEM step grows, what it would cost at CIFAR and ImageNet sizes, and
what cheaper sampling or a compact replay buffer cost in quality.

Why: no GPU is lent to this project, yet users ask what a JEM costs on a WideResNet-28-10 at 32 pixels or a ResNet-50 at
224. A step's time is the classifier's compute plus per-step overheads; once the compute dominates, the ratio of a JEM
step to a plain step tends to the ratio of their FLOPs, which does not depend on the machine. So this script measures
the time ratio on the CPU as inputs and widths grow (to see where it meets the FLOP ratio), counts FLOPs and memory of
the large models on PyTorch's meta device (shapes only, no compute, no memory), and trains on the quality benchmark's
scenarios to see what the cheaper settings cost.

Subcommands:

- ``grow``: time of a default JEM step, of a YOPO step (``PYLD(n_steps=1, inner_steps=5)``) and of a plain classifier
  step (the same Lightning loop, ``weights={"px": 0}``) for a SmallCNN on 3-channel inputs of 8, 16, 32 and 64 pixels
  (width 32) and of widths 16 and 64 (16 pixels); interleaved rounds in one process, medians of the per-round ratios;
  the FLOP ratios of the same steps beside them.
- ``estimate``: FLOPs of one step relative to a plain step and memory per rank (weights with gradients and Adam, the
  replay buffer in float32 / bf16 / uint8, activations kept for the backward) for WRN-28-10 on 3x32x32 and a ResNet-50
  on 3x224x224, counted on the meta device.
- ``quality``: trains configurations on ``benchmarks/quality.py``'s scenarios (its own training and evaluation,
  ``run_one``) and reports accuracy, ECE and log p(x) AUROCs as mean ± std over seeds, with the time per step measured
  interleaved against the defaults in one process.

    python benchmarks/scale.py grow --rounds 3 --out benchmarks/results/scale_grow
    python benchmarks/scale.py estimate --out benchmarks/results/scale_estimate
    python benchmarks/scale.py quality --configs default yopo-2x3 --scenarios digits --seeds 0 1 2 \\
        --out benchmarks/results/speed_yopo
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent
for path in (ROOT, ROOT.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_step import RepeatedBatch, flop_counter  # noqa: E402
from benchmark_trainer import StepWindow, quiet_trainer  # noqa: E402

from jemkit import JEM, PYLD, GaussianInit, ReplayBuffer  # noqa: E402
from jemkit.models import SmallCNN  # noqa: E402

# name -> JEM keyword arguments beyond the classifier (built afresh for every run)
CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "default": lambda: {},
    "plain": lambda: {"weights": {"px": 0.0}, "data_noise": 0.0},
    "yopo-2x3": lambda: {"sampler": PYLD(n_steps=2, inner_steps=3)},
    "yopo-3x2": lambda: {"sampler": PYLD(n_steps=3, inner_steps=2)},
    "yopo-1x5": lambda: {"sampler": PYLD(n_steps=1, inner_steps=5)},
    "buffer-bf16": lambda: {"buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.5), storage="bf16")},
    "buffer-uint8": lambda: {"buffer": ReplayBuffer(init=GaussianInit(uniform_fraction=0.5), storage="uint8")},
}


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------- timing
def step_ms(make_jem: Callable[[], JEM], x: Tensor, y: Tensor, steps: int, warmup: int = 2, seed: int = 0) -> float:
    """Milliseconds per Lightning step of a fresh JEM on a fixed batch (no data loading), after ``warmup`` steps."""
    pl.seed_everything(seed, verbose=False)
    jem = make_jem()
    window = StepWindow(warmup, steps)
    quiet_trainer(warmup + steps + 1, callbacks=[window]).fit(
        jem, DataLoader(RepeatedBatch(x, y, warmup + steps + 1), batch_size=None)
    )
    return 1e3 * window.seconds / steps


def interleaved_ms(
    contenders: dict[str, Callable[[], JEM]], x: Tensor, y: Tensor, steps: int, rounds: int
) -> dict[str, list[float]]:
    """Each contender's ms per step in every round; the order of contenders alternates between rounds."""
    times: dict[str, list[float]] = defaultdict(list)
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(step_ms(contenders[name], x, y, steps))
    return dict(times)


# ---------------------------------------------------------------------------------------------- FLOPs and memory
def step_flops(model: nn.Module, x: Tensor, y: Tensor, sampler_steps: int, full_batches: int = 2) -> dict[str, float]:
    """FLOPs of the parts of a step, counted by ``FlopCounterMode``: ``forward`` (one batch), ``input_grad`` (one
    sampler step: forward and the input-only backward), ``train`` (forward and full backward of ``full_batches``
    batches: a JEM's shared forward of data and samples), ``plain`` (forward and full backward of one batch)."""
    counts = {}
    with flop_counter() as counter:
        model(x)
    counts["forward"] = counter.get_total_flops()
    with flop_counter() as counter:
        z = x.detach().requires_grad_(True)
        torch.autograd.grad(-model(z).logsumexp(1).sum(), [z])
    counts["input_grad"] = counter.get_total_flops()
    for name, batches in (("train", full_batches), ("plain", 1)):
        with flop_counter() as counter:
            xb, yb = torch.cat([x] * batches), torch.cat([y] * batches)
            F.cross_entropy(model(xb), yb).backward()
        counts[name] = counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    del sampler_steps
    return {k: float(v) for k, v in counts.items()}


def step_flop_ratio(
    counts: dict[str, float], full_steps: int, inner_updates: int = 0, first_layer: float = 0.0
) -> float:
    """A JEM step over a plain step in FLOPs: ``full_steps`` sampler steps through the whole network, ``inner_updates``
    YOPO updates through the first layer (``first_layer``: FLOPs of its forward and input backward), then the shared
    forward and backward of data and samples."""
    jem = full_steps * counts["input_grad"] + inner_updates * first_layer + counts["train"]
    return jem / counts["plain"]


def activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``model(x)`` (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()  # views of one tensor count once (also on the meta device, without data)
        seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).logsumexp(1).sum()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------- grow
def grow(rounds: int, steps: int, batch: int) -> dict[str, Any]:
    """Default and plain step times and FLOP ratios as the input size and the width grow (SmallCNN, 3 channels)."""
    cases = [(size, 32) for size in (8, 16, 32, 64)] + [(16, width) for width in (16, 64)]
    rows = []
    for size, width in cases:
        torch.manual_seed(0)
        x, y = torch.rand(batch, 3, size, size) * 2 - 1, torch.randint(0, 10, (batch,))

        def make(config: str, width: int = width) -> Callable[[], JEM]:
            return lambda: JEM(SmallCNN(num_classes=10, in_channels=3, width=width), **CONFIGS[config]())

        names = ("default", "plain", "yopo-1x5")
        times = interleaved_ms({name: make(name) for name in names}, x, y, steps, rounds)
        model = SmallCNN(num_classes=10, in_channels=3, width=width)
        counts = step_flops(model, x, y, 5)
        first = _first_layer_flops(model, x)

        def ratio(name: str, times: dict[str, list[float]] = times) -> float:
            return _median([a / b for a, b in zip(times[name], times["plain"], strict=True)])

        row = {
            "size": size,
            "width": width,
            "batch": batch,
            "default_ms": _median(times["default"]),
            "plain_ms": _median(times["plain"]),
            "yopo_ms": _median(times["yopo-1x5"]),
            "time_ratio": ratio("default"),
            "yopo_time_ratio": ratio("yopo-1x5"),
            "times": times,
            "flop_ratio": step_flop_ratio(counts, 5),
            "yopo_flop_ratio": step_flop_ratio(counts, 1, 4, first),
            "gflop_plain": counts["plain"] / 1e9,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"rows": rows, "rounds": rounds, "steps": steps, "threads": torch.get_num_threads()}


def grow_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| input | width | plain GFLOP/step | plain ms | default / plain: time | FLOPs "
        "| YOPO 1x5 / plain: time | FLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| 3x{r['size']}x{r['size']} | {r['width']} | {r['gflop_plain']:.3f} | {r['plain_ms']:.1f} "
            f"| {r['time_ratio']:.2f} | {r['flop_ratio']:.2f} "
            f"| {r['yopo_time_ratio']:.2f} | {r['yopo_flop_ratio']:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- estimate
def _models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]]:
    from torchvision.models import resnet50

    from jemkit.models import WideResNet

    return {
        "WRN-28-10, CIFAR-10": (lambda: WideResNet(depth=28, widen_factor=10, num_classes=10), (3, 32, 32), 64),
        "ResNet-50, 224 px": (lambda: resnet50(num_classes=1000), (3, 224, 224), 64),
    }


def _first_layer_flops(model: nn.Module, x: Tensor) -> float:
    """FLOPs of a YOPO inner update through the network's first convolution (forward and input backward)."""
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    with flop_counter() as counter:
        z = x.detach().requires_grad_(True)
        out = first(z)
        torch.autograd.grad(out, [z], grad_outputs=torch.ones_like(out))
    return float(counter.get_total_flops())


def estimate(capacity: int = 10_000) -> dict[str, Any]:
    """FLOP ratios and memory per rank of JEM steps on WRN-28-10 (32 px) and ResNet-50 (224 px), on the meta device."""
    rows = []
    for name, (build, shape, batch) in _models().items():
        with torch.device("meta"):
            model = build()
            x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
        counts = step_flops(model, x, y, 5)
        first = _first_layer_flops(model, x)
        params = sum(p.numel() for p in model.parameters())
        act = activation_bytes(model, x)
        per_sample = math.prod(shape)
        row = {
            "model": name,
            "input": list(shape),
            "batch": batch,
            "params_m": params / 1e6,
            "plain_gflop": counts["plain"] / 1e9,
            "ratio_default": step_flop_ratio(counts, 5),
            "ratio_yopo_2x3": step_flop_ratio(counts, 2, 4, first),
            "ratio_yopo_1x5": step_flop_ratio(counts, 1, 4, first),
            "ratio_jem_sgld20": step_flop_ratio(counts, 20),
            "weights_adam_gb": params * 16 / 1e9,  # float32 weights, gradients and Adam's two moments
            "activations_batch_gb": act / 1e9,  # one batch's forward kept for the backward (a sampler step)
            "activations_step_gb": 2 * act / 1e9,  # the shared forward of data and samples
            "buffer_gb": {k: capacity * per_sample * b / 1e9 for k, b in (("float32", 4), ("bf16", 2), ("uint8", 1))},
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"rows": rows, "capacity": capacity}


def estimate_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | batch | plain GFLOP/step | default / plain | YOPO 2x3 / plain | YOPO 1x5 / plain "
        "| JEM (SGLD 20) / plain "
        "| weights + Adam GB | activations GB (step) | buffer GB fp32 / bf16 / uint8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        buf = r["buffer_gb"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['plain_gflop']:.0f} | {r['ratio_default']:.1f} "
            f"| {r['ratio_yopo_2x3']:.1f} | {r['ratio_yopo_1x5']:.1f} | {r['ratio_jem_sgld20']:.1f} "
            f"| {r['weights_adam_gb']:.2f} "
            f"| {r['activations_step_gb']:.1f} | {buf['float32']:.2f} / {buf['bf16']:.2f} / {buf['uint8']:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- quality
def _quality_job(job: tuple[str, str, int, int]) -> dict[str, Any]:
    import quality

    scenario, config, seed, steps = job
    quality.CONFIGS[config] = CONFIGS[config]
    return quality.run_one(scenario, config, seed, steps, False, 32)


def _scenario_batch(scenario: str) -> tuple[Callable[[], nn.Module], Tensor, Tensor]:
    """A classifier factory and one training batch of ``scenario`` (for the timing rounds)."""
    import quality

    make_data, make_model = quality.SCENARIOS[scenario]
    dm = make_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    return (lambda: make_model(dm, False, 32)), x, y


def quality_runs(
    configs: Sequence[str], scenarios: Sequence[str], seeds: Sequence[int], steps: int, workers: int, rounds: int
) -> dict[str, Any]:
    """Train and evaluate every (scenario, config, seed); time each config against the defaults, interleaved."""
    jobs = [(sc, c, seed, steps) for seed in seeds for sc in scenarios for c in configs]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            runs = pool.map(_quality_job, jobs, chunksize=1)
    else:
        runs = [_quality_job(job) for job in jobs]
    timing: dict[str, dict[str, Any]] = {}
    for sc in scenarios:
        make_model, x, y = _scenario_batch(sc)
        contenders = {
            c: (lambda c=c, make_model=make_model: JEM(make_model(), **CONFIGS[c]()))
            for c in dict.fromkeys(["default", *configs])
        }
        times = interleaved_ms(contenders, x, y, steps=20, rounds=rounds)
        timing[sc] = {
            c: {"ms": _median(t), "vs_default": _median([a / b for a, b in zip(t, times["default"], strict=True)])}
            for c, t in times.items()
        }
    return {"runs": runs, "timing": timing, "steps": steps, "seeds": list(seeds)}


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def quality_markdown(result: dict[str, Any]) -> str:
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in result["runs"]:
        by[run["scenario"], run["config"]].append(run)
    lines = [
        "| scenario | config | acc | ECE | logpx AUROC noise | shuffled | mixtures | held out | time / default |",
        "|---|---|---|---|---|---|---|---|---:|",
    ]
    for (sc, config), runs in by.items():

        def auroc(ood_set: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [r["auroc"][ood_set]["logpx"] for r in runs if ood_set in r["auroc"]]
            return _mean_std(values) if values else ""

        ratio = result["timing"].get(sc, {}).get(config, {}).get("vs_default")
        lines.append(
            f"| {sc} | {config} | {_mean_std([r['acc'] for r in runs])} | {_mean_std([r['ece'] for r in runs])} "
            f"| {auroc('noise')} | {auroc('shuffled')} | {auroc('mixtures')} | {auroc('heldout')} "
            f"| {'' if ratio is None else f'{ratio:.2f}'} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_grow = sub.add_parser("grow", help="time ratio of a default to a plain step as inputs and widths grow")
    p_grow.add_argument("--rounds", type=int, default=3)
    p_grow.add_argument("--steps", type=int, default=4, help="timed steps per fit")
    p_grow.add_argument("--batch", type=int, default=16)
    p_est = sub.add_parser("estimate", help="FLOPs and memory of WRN-28-10 and ResNet-50 steps (meta device)")
    p_est.add_argument("--capacity", type=int, default=10_000, help="replay buffer chains")
    p_q = sub.add_parser("quality", help="quality and time of configurations on quality.py's scenarios")
    p_q.add_argument("--configs", nargs="+", default=["default", "yopo-2x3"], choices=sorted(CONFIGS))
    p_q.add_argument("--scenarios", nargs="+", default=["digits"])
    p_q.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p_q.add_argument("--steps", type=int, default=1500)
    p_q.add_argument("--workers", type=int, default=1)
    p_q.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    for p in (p_grow, p_est, p_q):
        p.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.command == "grow":
        result, table = grow(args.rounds, args.steps, args.batch), grow_markdown
    elif args.command == "estimate":
        result, table = estimate(args.capacity), estimate_markdown
    else:
        result = quality_runs(args.configs, args.scenarios, args.seeds, args.steps, args.workers, args.rounds)
        table = quality_markdown
    text = table(result)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
