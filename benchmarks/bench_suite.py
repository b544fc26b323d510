"""Run ``bench_step.py`` over the configurations that decide issue-level speed goals, and tabulate them.

Why: each configuration runs in a fresh process (clean allocator, compile caches and peak-memory counters), and the
goals of the speed work are read off one table: jemkit's speed-up over the original float32 loop (goal >= 4x on a
GPU), its achieved share of the device's bf16 peak (goal >= 50%), and its peak memory against the reference's
(goal: no higher); and issue 28's targets on any machine: the same algorithm at most 0.7x the reference's time, jemkit's
defaults at most 0.25x, and a default step at most 3x a plain classifier step in the same Lightning loop. Within each
row all contenders were measured in the same process, interleaved.

Usage::

    python benchmarks/bench_suite.py --preset gpu --out results/      # WRN-28-10, batch 64, on a GPU
    python benchmarks/bench_suite.py --preset cpu --out results/      # SmallCNN, batch 64, 1 thread
    python benchmarks/bench_suite.py --preset gpu --only bf16-step-cl bf16-step-cudagraph-cl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name -> bench_step.py arguments (besides the preset's model, batch and iteration counts)
CONFIGS: dict[str, dict[str, list[str]]] = {
    "gpu": {
        "fp32-eager": ["--precision", "32"],
        "bf16-eager": ["--precision", "bf16-mixed"],
        "bf16-eager-cl": ["--precision", "bf16-mixed", "--channels-last"],
        "bf16-step": ["--precision", "bf16-mixed", "--compile"],
        "bf16-step-cl": ["--precision", "bf16-mixed", "--compile", "--channels-last"],
        "bf16-step-cudagraph-cl": [
            "--precision",
            "bf16-mixed",
            "--compile",
            "--compile-mode",
            "reduce-overhead",
            "--channels-last",
        ],
    },
    "cpu": {
        "fp32-eager": ["--precision", "32"],
        "fp32-step": ["--precision", "32", "--compile"],
        "bf16-eager": ["--precision", "bf16-mixed"],
    },
}
ALSO = ["--also", "defaults", "plain"]  # jemkit's defaults and the classifier alone, in the same Lightning loop
PRESETS: dict[str, list[str]] = {
    "gpu": ["--device", "cuda", "--model", "wrn-28-10", "--batch", "64", "--steps", "20", "--iters", "10", *ALSO],
    "cpu": [
        "--device",
        "cpu",
        "--model",
        "small_cnn",
        "--batch",
        "64",
        "--steps",
        "20",
        "--iters",
        "20",
        "--threads",
        "1",
        *ALSO,
    ],
}
GOAL_SPEEDUP, GOAL_PEAK_FRACTION = 4.0, 0.5
TARGET_SAME, TARGET_DEFAULTS, TARGET_VS_PLAIN = 0.7, 0.25, 3.0  # issue 28, on any machine
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def run_config(preset: str, name: str, extra: Sequence[str], out: Path) -> dict[str, Any]:
    path = out / f"{preset}-{name}.json"
    argv = [sys.executable, str(HERE / "bench_step.py"), *PRESETS[preset], *CONFIGS[preset][name], *extra]
    print(f"== {name}: {' '.join(argv[2:])}", flush=True)
    subprocess.run([*argv, "--json", str(path)], check=True)
    return json.loads(path.read_text())


def _ms(contender: dict[str, Any] | None) -> float:
    return contender["median_ms"] if contender else float("nan")


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per configuration, the times and the goal quantities (the defaults' and the plain
    Lightning step's columns when they were measured)."""
    extra = any("jemkit_defaults" in r["contenders"] or "jemkit_plain" in r["contenders"] for r in results.values())
    columns = [
        "config",
        "classifier ms",
        "reference ms (fp32)",
        "reference_amp ms",
        "jemkit ms",
        "speed-up vs fp32 ref",
        "vs amp ref",
        "jemkit TFLOP/s",
        "% bf16 peak",
        "peak MB jemkit / ref",
    ]
    if extra:
        columns += ["defaults ms", "plain (Lightning) ms"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for name, result in results.items():
        c = result["contenders"]
        jem, ref, amp = c["jemkit"], c["reference"], c.get("reference_amp")
        defaults, plain = c.get("jemkit_defaults"), c.get("jemkit_plain")
        fraction = jem.get("peak_fraction")
        cells = [
            name,
            f"{_ms(c['classifier']):.1f}",
            f"{_ms(ref):.1f}",
            f"{_ms(amp):.1f}" if amp else "-",
            f"{_ms(jem):.1f}",
            f"{_ms(ref) / _ms(jem):.2f}x",
            f"{_ms(amp) / _ms(jem):.2f}x" if amp else "-",
            f"{jem['tflops']:.2f}",
            f"{100 * fraction:.1f}" if fraction is not None else "n/a",
            f"{jem['peak_mb']:.0f} / {ref['peak_mb']:.0f}",
        ]
        if extra:
            cells += [f"{_ms(defaults):.1f}" if defaults else "-", f"{_ms(plain):.1f}" if plain else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict[str, dict[str, Any]]) -> list[str]:
    """Whether the best configuration meets the speed goals (on a GPU; the CPU goal is the wrapper overhead)."""
    name, best = min(results.items(), key=lambda item: item[1]["contenders"]["jemkit"]["median_ms"])
    jem, ref = best["contenders"]["jemkit"], best["contenders"]["reference"]
    speedup = ref["median_ms"] / jem["median_ms"]
    lines = [f"fastest jemkit configuration: {name} ({jem['median_ms']:.1f} ms per step on {best['hardware']})"]
    if best["device"] == "cuda":
        met = {True: "met", False: "NOT met"}
        fraction = jem.get("peak_fraction")
        lines += [
            f"speed-up over the fp32 reference loop: {speedup:.2f}x (goal >= {GOAL_SPEEDUP:.0f}x: "
            f"{met[speedup >= GOAL_SPEEDUP]})",
            "share of the bf16 peak: "
            + (
                "n/a (unknown GPU: pass --peak-tflops)"
                if fraction is None
                else f"{100 * fraction:.1f}% (goal >= {100 * GOAL_PEAK_FRACTION:.0f}%: "
                f"{met[fraction >= GOAL_PEAK_FRACTION]})"
            ),
        ]
        # CUDA-graph replays allocate nothing (their memory is a private pool set aside at capture), so their step
        # peak is not comparable: judge memory on the fastest configuration that captures no CUDA graphs.
        plain = {k: r for k, r in results.items() if r.get("compile_mode") not in CUDA_GRAPH_MODES}
        if plain:
            mem_name, mem = min(plain.items(), key=lambda item: item[1]["contenders"]["jemkit"]["median_ms"])
            mem_jem, mem_ref = mem["contenders"]["jemkit"]["peak_mb"], mem["contenders"]["reference"]["peak_mb"]
            lines.append(
                f"peak memory ({mem_name}): jemkit {mem_jem:.0f} MB vs reference {mem_ref:.0f} MB "
                f"(goal: no higher: {met[mem_jem <= mem_ref]})"
            )
        else:
            lines.append("peak memory: not measured (every configuration captures CUDA graphs)")
    else:
        for config, result in results.items():
            c = result["contenders"]
            same = c.get("reference_amp") or c["reference"]  # the port at jemkit's own precision
            ratio = c["jemkit"]["median_ms"] / same["median_ms"]
            lines.append(
                f"{config}: jemkit / reference at equal precision ({result['precision']}) = {ratio:.2f} "
                f"(CPU goal: <= 1.10)"
            )
    return lines + targets(results)


def targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """Issue 28's targets per configuration: same algorithm <= 0.7x the reference at equal precision, defaults <=
    0.25x, a default step <= 3x a plain classifier step in the same Lightning loop (medians of interleaved steps)."""
    met = {True: "met", False: "NOT met"}
    lines = []
    for config, result in results.items():
        c = result["contenders"]
        ref = _ms(c.get("reference_amp") or c["reference"])
        same = _ms(c["jemkit"]) / ref
        parts = [f"same algorithm / reference = {same:.2f} (<= {TARGET_SAME}: {met[same <= TARGET_SAME]})"]
        if "jemkit_defaults" in c:
            defaults = _ms(c["jemkit_defaults"]) / ref
            parts.append(
                f"defaults / reference = {defaults:.2f} (<= {TARGET_DEFAULTS}: {met[defaults <= TARGET_DEFAULTS]})"
            )
        if "jemkit_defaults" in c and "jemkit_plain" in c:
            vs_plain = _ms(c["jemkit_defaults"]) / _ms(c["jemkit_plain"])
            parts.append(
                f"defaults / plain = {vs_plain:.2f} (<= {TARGET_VS_PLAIN:.0f}: {met[vs_plain <= TARGET_VS_PLAIN]})"
            )
        lines.append(f"{config}: " + "; ".join(parts))
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--only", nargs="+", help="configurations to run (default: all of the preset's)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON files")
    args, extra = parser.parse_known_args(argv)  # anything else goes to bench_step.py (e.g. --iters 5)
    names = args.only or list(CONFIGS[args.preset])
    unknown = sorted(set(names) - set(CONFIGS[args.preset]))
    if unknown:
        parser.error(f"unknown configurations {unknown} for preset {args.preset}; known: {list(CONFIGS[args.preset])}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {name: run_config(args.preset, name, extra, args.out) for name in names}
    report = "\n".join([table(results), "", *goals(results)])
    print(report)
    (args.out / f"{args.preset}-summary.md").write_text(report + "\n")
    return results


if __name__ == "__main__":
    main()
