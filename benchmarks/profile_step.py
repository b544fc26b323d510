"""Where the time of one JEM training step goes: a per-part breakdown with ``torch.profiler``.

Why: a JEM step is a classifier step plus sampling, and everything around it (the input domain's affine maps, chain
restarts, the buffer, logging, Lightning's hooks, the divergence guard) is cost a plain PyTorch loop does not pay.
This script names each part so that such overheads are seen, and removed, rather than guessed.

It fits a real ``lightning.Trainer`` on the digits (SmallCNN, batch 64, one torch thread) and profiles ``--steps``
steps after ``--warmup`` unprofiled ones. Every part is a ``torch.profiler.record_function`` range: Lightning's own
hooks through a Lightning ``Profiler`` that opens one range per action (``[Callback]DivergenceGuard...``,
``[Strategy]...backward``), jemkit's parts by wrapping their functions for the profiled run only (the library itself
carries no annotations). A part's time is *exclusive*: its range minus the ranges of the named parts inside it, so the
parts add up to the step. What no range covers is Lightning's loop itself.

Configurations: ``same`` (the ``jem`` preset: SGLD 20 x 1.0 from uniform restarts, the reference algorithm), ``default``
(jemkit's defaults: PYLD 5 x 0.2, Gaussian and uniform restarts) and ``plain`` (the classifier alone through the same
Lightning loop: ``weights={"px": 0}``, no data noise).

The profiler records every operator, which slows small steps down; the unprofiled time per step of the same process is
printed beside each breakdown (the shares, not the absolute times, are what to read).

    python benchmarks/profile_step.py --configs same default plain --steps 40 --warmup 10 --markdown out.md
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.profilers import Profiler
from torch.autograd.profiler_util import FunctionEvent

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmark_trainer import StepWindow, quiet_trainer  # noqa: E402

import jemkit.module  # noqa: E402
from jemkit import JEM, DigitsDataModule  # noqa: E402
from jemkit.models import SmallCNN  # noqa: E402
from jemkit.sampling import chains, langevin  # noqa: E402
from jemkit.sampling.buffer import ReplayBuffer  # noqa: E402
from jemkit.sampling.domain import InputDomain  # noqa: E402
from jemkit.sampling.init import InitialDistribution  # noqa: E402

CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "same": lambda: {"preset": "jem"},
    "default": lambda: {},
    "plain": lambda: {"weights": {"px": 0.0}, "data_noise": 0.0},
}

# jemkit's parts: (owner, attribute, part name). Wrapped for the profiled run only.
JEMKIT_PARTS: tuple[tuple[Any, str, str], ...] = (
    (chains.Chains, "_run", "sampler: loop"),
    (langevin, "energy_and_grad", "sampler: forward + input gradient"),
    (langevin.SGLD, "update", "sampler: update (step, noise, clamp)"),
    (langevin.PYLD, "update", "sampler: update (step, noise, clamp)"),
    (InputDomain, "to_unit", "input domain: affine maps"),
    (InputDomain, "from_unit", "input domain: affine maps"),
    (InputDomain, "scale_like", "input domain: affine maps"),
    (InitialDistribution, "sample", "buffer: restarts (fresh draws)"),
    (ReplayBuffer, "sample", "buffer: read start points"),
    (ReplayBuffer, "update", "buffer: write samples"),
    (JEM, "_draw", "objective: data noise"),
    (JEM, "_logits", "objective: forwards"),
    (jemkit.module, "jem_objective", "objective: loss terms"),
    (pl.LightningModule, "log", "logging: self.log"),
    (pl.LightningModule, "log_dict", "logging: self.log"),
)

# Lightning's action names (by prefix) -> part name; the first match wins.
LIGHTNING_PARTS: tuple[tuple[str, str], ...] = (
    ("[Callback]DivergenceGuard", "divergence guard"),
    ("[Strategy]SingleDeviceStrategy.backward", "backward"),
    ("[Strategy]SingleDeviceStrategy.training_step", "training_step: checks and statistics"),
    ("[Strategy]SingleDeviceStrategy.optimizer_step", "optimizer step (Adam, zero_grad)"),
    ("[LightningModule]JEM.optimizer_step", "optimizer step (Adam, zero_grad)"),
    ("[LightningModule]JEM.optimizer_zero_grad", "optimizer step (Adam, zero_grad)"),
    ("[_TrainingEpochLoop].train_dataloader_next", "data loading"),
    ("[Strategy]SingleDeviceStrategy.batch_to_device", "data loading"),
    ("[", "Lightning hooks"),
)
LOOP = "Lightning loop (no range)"
PLAIN_LOOP_PARTS = ("backward", "optimizer step (Adam, zero_grad)", "data loading")
"""Parts a plain PyTorch loop pays too (with the classifier's forward, inside ``objective: forwards``)."""


class RecordFunctionProfiler(Profiler):
    """A Lightning profiler that opens one ``torch.profiler.record_function`` range per Lightning action."""

    def __init__(self) -> None:
        super().__init__()
        self._open: dict[str, list[Any]] = defaultdict(list)

    def start(self, action_name: str) -> None:
        scope = torch.profiler.record_function(action_name)
        scope.__enter__()
        self._open[action_name].append(scope)

    def stop(self, action_name: str) -> None:
        if self._open[action_name]:
            self._open[action_name].pop().__exit__(None, None, None)

    def summary(self) -> str:
        return ""


@contextlib.contextmanager
def annotated(parts: Sequence[tuple[Any, str, str]]) -> Iterator[None]:
    """Wrap each ``owner.attribute`` in a range named after its part, for the duration of the block."""
    saved = []
    for owner, attribute, part in parts:
        original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)

        def wrapper(*args: Any, __original: Callable = original, __part: str = part, **kwargs: Any) -> Any:
            with torch.profiler.record_function(f"jemkit::{__part}"):
                return __original(*args, **kwargs)

        saved.append((owner, attribute, original))
        setattr(owner, attribute, functools.wraps(original)(wrapper))
    try:
        yield
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)


def part_of(name: str) -> str | None:
    """The part a range belongs to, or ``None`` for an operator."""
    if name.startswith("jemkit::"):
        return name[len("jemkit::") :]
    for prefix, part in LIGHTNING_PARTS:
        if name.startswith(prefix):
            return part
    return None


def exclusive_times(events: Sequence[FunctionEvent]) -> dict[str, float]:
    """Microseconds per part: each named range minus the named ranges nested in it (operators count to their range)."""
    totals: dict[str, float] = defaultdict(float)

    def named_descendants_time(event: FunctionEvent) -> float:
        total = 0.0
        for child in event.cpu_children:
            total += child.cpu_time_total if part_of(child.name) is not None else named_descendants_time(child)
        return total

    for event in events:
        part = part_of(event.name)
        if part is not None:
            totals[part] += event.cpu_time_total - named_descendants_time(event)
    return dict(totals)


class Window(StepWindow):
    """Times steps ``[warmup, warmup + steps)`` and, when ``profile``, records them with the torch profiler."""

    def __init__(self, warmup: int, steps: int, profile: bool) -> None:
        super().__init__(warmup, steps)
        self.profile = profile
        self.prof: torch.profiler.profile | None = None
        self.annotations: contextlib.ExitStack | None = None

    def on_window_start(self) -> None:
        if self.profile:
            self.annotations = contextlib.ExitStack()
            self.annotations.enter_context(annotated(JEMKIT_PARTS))
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.start()

    def on_window_end(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.annotations.close()


def run(config: str, steps: int, warmup: int, profile: bool, seed: int = 0) -> dict[str, Any]:
    """Fit ``config`` for ``warmup + steps + 1`` steps; the step time, and the breakdown when ``profile``."""
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    jem = JEM(SmallCNN(num_classes=10, in_channels=1), **CONFIGS[config]())
    window = Window(warmup, steps, profile)
    trainer = quiet_trainer(
        warmup + steps + 1,
        profiler=RecordFunctionProfiler() if profile else None,
        callbacks=[window],  # the JEM adds its DivergenceGuard, as in any run
    )
    trainer.fit(jem, dm)
    result: dict[str, Any] = {"config": config, "ms_per_step": 1e3 * window.seconds / steps}
    if profile:
        parts = exclusive_times(window.prof.events())
        total_us = 1e6 * window.seconds
        parts[LOOP] = max(total_us - sum(parts.values()), 0.0)
        result["parts_ms"] = {part: us / 1e3 / steps for part, us in sorted(parts.items(), key=lambda kv: -kv[1])}
    return result


def markdown(results: dict[str, dict[str, Any]], rounds: int) -> str:
    """One table: ms per step and share of the step per part, a column per configuration."""
    configs = list(results)
    parts = sorted(
        {p for r in results.values() for p in r["parts_ms"]}, key=lambda p: -results[configs[0]]["parts_ms"].get(p, 0)
    )
    head = "| part | " + " | ".join(f"{c} ms | {c} %" for c in configs) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(configs)]
    for part in parts:
        cells = []
        for c in configs:
            ms = results[c]["parts_ms"].get(part, 0.0)
            total = sum(results[c]["parts_ms"].values())
            cells.append(f"{ms:.2f} | {100 * ms / total:.1f}")
        mark = " (plain loop too)" if part in PLAIN_LOOP_PARTS else ""
        lines.append(f"| {part}{mark} | " + " | ".join(cells) + " |")
    totals = " | ".join(f"**{sum(results[c]['parts_ms'].values()):.1f}** | 100" for c in configs)
    lines.append(f"| profiled step | {totals} |")
    plain = " | ".join(f"{results[c]['unprofiled_ms']:.1f} | " for c in configs)
    lines.append(f"| unprofiled step (median of {rounds}) | {plain} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["same", "default", "plain"])
    parser.add_argument("--steps", type=int, default=40, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=10, help="unprofiled steps first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved unprofiled rounds for the step time")
    parser.add_argument("--markdown", type=Path, help="write the table there")
    parser.add_argument("--json", type=Path, help="write the figures there")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results = {c: run(c, args.steps, args.warmup, profile=True) for c in args.configs}
    unprofiled: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for c in args.configs:
            unprofiled[c].append(run(c, args.steps, args.warmup, profile=False)["ms_per_step"])
    for c in args.configs:
        results[c]["unprofiled_ms"] = sorted(unprofiled[c])[len(unprofiled[c]) // 2]
    table = markdown(results, args.rounds)
    print(table)
    print(json.dumps(results))
    if args.markdown is not None:
        args.markdown.write_text(table + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
