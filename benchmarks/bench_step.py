"""Time one JEM training iteration: jemkit's Lightning step against a port of the reference loop and a classifier.

Why: jemkit keeps the replay buffer on the device, takes input-only gradients while sampling and shares one forward
over data and samples; the reference loop (``reference_jem.py``) keeps the buffer on the host and runs three separate
forwards. This script measures what that is worth per optimizer step, with the plain classifier's cross-entropy step as
the 1x baseline (with 20 SGLD steps a JEM step does about 15-16x the classifier step's FLOPs).

Contenders, all starting from the same weights (deep copies of one model) on the same fixed batch:

- ``classifier``: ``zero_grad``, cross-entropy forward, backward, Adam step (bare PyTorch);
- ``reference``: ``ReferenceJEM.step`` (host buffer, SGLD, three forwards, Adam);
- ``jemkit``: ``jemkit.JEM`` with the reference's algorithm (SGLD, uniform restarts, ``log p(x)`` at weight 1, Adam
  1e-4) fitted by a real ``lightning.Trainer``; a callback times each optimizer step from ``on_train_batch_start`` to
  ``on_train_batch_end`` (training step, backward, Adam and Lightning's bookkeeping; the batch already sits on the
  device, so no host-to-device copy is timed for anyone);
- with ``--also defaults``: ``jemkit_defaults``, ``JEM(model)`` with jemkit's defaults (PYLD 5, Gaussian restarts);
  with ``--also yopo``: ``jemkit_yopo``, the defaults with JEM++'s YOPO steps (``PYLD(n_steps=1, inner_steps=5)``:
  one full backward a step); with ``--also plain``: ``jemkit_plain``, the classifier alone through the same Lightning
  loop (``weights={"px": 0}``, no data noise): the baseline of a JEM step's overhead over plain training in Lightning.

Every Trainer runs in a thread of its own and steps only when handed a baton, so exactly one contender runs at a time
and all of them take turns every iteration, in an order that alternates between iterations, so that a noisy machine
slows all of them alike. Medians and interquartile ranges are over the timed iterations; ``--warmup`` iterations of
each come first and are not timed.

Memory, per contender: ``state`` is the bytes of its tensors on the device (weights, gradients, Adam state, and the
replay buffer where it lives there: jemkit's on the device, the reference's on the host); ``step peak`` is how far one
step rises above what was allocated before it (CUDA: ``torch.cuda.max_memory_allocated``; CPU: growth of the process's
peak RSS from ``resource.getrusage``, reset before each step through ``/proc/self/clear_refs`` where Linux allows it;
approximate, as the allocator reuses memory freed by earlier steps); ``peak = state + step peak``.

FLOPs: one extra, untimed iteration of each contender at the end runs under ``torch.utils.flop_counter.FlopCounterMode``
(jemkit's from ``on_train_batch_start`` to ``on_train_batch_end`` of the Trainer's last step). The counter's per-module
tracking is switched off because it breaks ``torch.autograd.grad(..., inputs=[x])``, which both samplers use.
``TFLOP/s = counted FLOPs / median step time``; meaningful on a GPU, shown everywhere.

Precision: ``32`` is PyTorch's default float32 (cuDNN may use TF32 for convolutions); with ``bf16-mixed`` jemkit runs
under ``Trainer(precision="bf16-mixed")``, the reference and the classifier under
``torch.autocast(device_type, dtype=torch.bfloat16)`` around every forward (SGLD's included); chains, buffers and
losses stay float32 in all three.

Usage::

    python benchmarks/bench_step.py --model small_cnn --batch 64 --steps 20 --iters 10 --warmup 3
    python benchmarks/bench_step.py --model wrn-28-10 --precision bf16-mixed --json results.json   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import resource
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

from jemkit import JEM, PYLD, SGLD, ReplayBuffer
from jemkit.models import MLP, SignalCNN, SmallCNN, WideResNet
from jemkit.sampling.compiled import COMPILE_MODES

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package: import the sibling file
from benchmark_trainer import quiet_trainer
from reference_jem import ReferenceJEM

CONTENDERS = ("classifier", "reference", "reference_amp", "jemkit", "jemkit_defaults", "jemkit_yopo", "jemkit_plain")
"""reference_amp: only with --precision bf16-mixed; jemkit_defaults, jemkit_yopo, jemkit_plain: with --also."""

# Dense bf16 tensor-core peak in TFLOP/s by model name (vendor data sheets, without sparsity; RTX 4090 with float32
# accumulation); the first name found as a whole word in torch.cuda.get_device_name() wins, so "L4" does not match
# an L40 nor "A10" an A10G. --peak-tflops overrides it.
BF16_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM
    "A100": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
}

# name -> (constructor, input shape, default batch size)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "small_cnn": (lambda: SmallCNN(num_classes=10, in_channels=1), (1, 8, 8), 64),  # digits-sized
    "mlp": (lambda: MLP(13, num_classes=10), (13,), 64),  # tabular rows, wine-sized
    "signal_cnn": (lambda: SignalCNN(num_classes=10), (1, 40), 64),  # 1-D signals, as benchmarks/quality.py's
    "wrn-16-2": (lambda: WideResNet(depth=16, widen_factor=2, num_classes=10), (3, 32, 32), 16),
    "wrn-28-10": (lambda: WideResNet(depth=28, widen_factor=10, num_classes=10), (3, 32, 32), 64),  # JEM's
}


# ---------------------------------------------------------------------------------------------- contenders
class ClassifierStep:
    """The 1x baseline: one cross-entropy step of the bare classifier (forward, backward, Adam)."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, amp_dtype: torch.dtype | None = None) -> None:
        self.model = model.train()
        self.device_type = next(model.parameters()).device.type
        self.amp_dtype = amp_dtype
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad()
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class RepeatedBatch(Dataset):
    """``length`` times the same ``(x, y)`` batch: use with ``DataLoader(..., batch_size=None)``."""

    def __init__(self, x: Tensor, y: Tensor, length: int) -> None:
        self.x, self.y, self.length = x, y, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y


# ---------------------------------------------------------------------------------------------- measuring
class _GlobalOnly(ModuleTracker):
    """A module tracker that tracks nothing: FLOPs are counted globally (see the module docstring)."""

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args: Any) -> None:
        pass


def flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs``); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class Meter:
    """Times steps and records their memory; counts FLOPs in the iteration after the timed ones.

    Iterations ``[0, warmup)`` are warm-up, ``[warmup, warmup + iters)`` are timed, ``warmup + iters`` is counted.
    One step is measured at a time: ``start(name, i)`` ... ``stop(name, i)``.
    """

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.step_peak_mb: dict[str, list[float]] = defaultdict(list)
        self.flops: dict[str, int] = {}
        self.state_mb: dict[str, float] = {}
        self.rss_reset = device.type == "cpu" and _reset_peak_rss()
        self._counter: FlopCounterMode | None = None
        self._t0 = self._base = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def counts_flops(self, i: int) -> bool:
        return i >= self.warmup + self.iters

    def start(self, name: str, i: int) -> None:
        if self.counts_flops(i):
            self._counter = flop_counter()
            self._counter.__enter__()
            return
        self._sync()
        if self.device.type == "cuda":
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if self.rss_reset:
                _reset_peak_rss()
            self._base = _peak_rss_bytes()
        self._t0 = time.perf_counter()

    def stop(self, name: str, i: int) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops[name] = self._counter.get_total_flops()
            self._counter = None
            return
        self._sync()
        elapsed_ms = (time.perf_counter() - self._t0) * 1e3
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _peak_rss_bytes()
        if i >= self.warmup:
            self.ms[name].append(elapsed_ms)
            self.step_peak_mb[name].append((peak - self._base) / 2**20)

    def run(self, name: str, i: int, fn: Callable[[], object]) -> None:
        self.start(name, i)
        fn()
        self.stop(name, i)


class Baton(Callback):
    """Lets one Trainer step only when the coordinating thread hands it the baton, and times that step.

    The Trainer runs in a thread of its own; it waits for the baton before its first step and after every step, so
    Lightning's bookkeeping between two steps runs while no other contender does (and untimed, as before).
    """

    def __init__(self, name: str, meter: Meter) -> None:
        self.name, self.meter = name, meter
        self.go, self.done = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self._step = 0

    def take(self) -> None:
        """Coordinator: run one step of this contender and wait until it is over."""
        self.done.clear()
        self.go.set()
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"contender {self.name} failed") from self.error

    def _wait(self) -> None:
        self.go.wait()
        self.go.clear()

    def fit(self, trainer: pl.Trainer, module: pl.LightningModule, loader: DataLoader) -> None:
        """Thread body: ``trainer.fit``; an error is handed to the coordinator."""
        try:
            trainer.fit(module, loader)
        except BaseException as err:  # re-raised by the coordinator
            self.error = err
        finally:
            self.done.set()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, _: int) -> None:
        i = trainer.global_step
        if i == 0:
            self._wait()
        if self.meter.counts_flops(i) and hasattr(pl_module, "chains"):
            # The FLOP counter sees dispatched ops, not the kernels inside a compiled graph: count the same step
            # eagerly (it is untimed), so that TFLOP/s is the work done per timed, compiled step.
            pl_module.chains.compile_mode = None
        self._step = i
        self.meter.start(self.name, i)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, _: int
    ) -> None:
        self.meter.stop(self.name, self._step)
        self.done.set()
        self._wait()  # until the next iteration, or the release after the last one

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Now, before the Trainer's teardown moves the module and the optimizer state back to the CPU.
        # The replay buffer's chains are plain tensors (see ReplayBuffer), not among the module's buffers: add them.
        chains = getattr(getattr(pl_module, "buffer", None), "samples", None)
        self.meter.state_mb[self.name] = state_mb(self.meter.device, [pl_module], trainer.optimizers[0], chains)


def state_mb(device: torch.device, modules: Sequence[nn.Module], optimizer: Optimizer, *extra: Any) -> float:
    """MiB of distinct tensor storage on ``device``: weights, gradients, buffers, optimizer state, ``extra``."""
    tensors: list[Any] = list(extra)
    for module in modules:
        tensors += [*module.parameters(), *module.buffers(), *(p.grad for p in module.parameters())]
    tensors += [v for state in optimizer.state.values() for v in state.values()]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in tensors
        if isinstance(t, Tensor) and t.device.type == device.type
    }
    return sum(storages.values()) / 2**20


# ---------------------------------------------------------------------------------------------- the run
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), help="default: wrn-28-10 on a GPU, small_cnn on the CPU")
    parser.add_argument("--batch", type=int, help="default: 64 (small_cnn, wrn-28-10), 16 (wrn-16-2)")
    parser.add_argument("--steps", type=int, default=20, help="SGLD steps per iteration (JEM: 20)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per contender first")
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    parser.add_argument(
        "--compile", action="store_true", help="JEM(..., compile=True): each SGLD step as one graph (experimental)"
    )
    parser.add_argument(
        "--compile-mode", choices=COMPILE_MODES, help="torch.compile mode (reduce-overhead: CUDA graphs)"
    )
    parser.add_argument("--channels-last", action="store_true", help="JEM(..., channels_last=True)")
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 peak (default: looked up by GPU name)")
    parser.add_argument("--buffer-size", type=int, default=10_000, help="replay buffer capacity (JEM: 10,000)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's); 1 avoids oversubscribing shared cores"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--also",
        nargs="*",
        choices=["defaults", "yopo", "plain"],
        default=[],
        help="also time jemkit's defaults (jemkit_defaults), the defaults with YOPO steps (jemkit_yopo) and the "
        "classifier alone in Lightning (jemkit_plain)",
    )
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("wrn-28-10" if args.device == "cuda" else "small_cnn")
    args.batch = args.batch or MODELS[args.model][2]
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"need --iters >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    return args


def _summary(ms: list[float]) -> dict[str, float]:
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the reference script; shared by all contenders
    build, input_shape, _ = MODELS[args.model]
    torch.manual_seed(args.seed)
    model = build()
    x = (torch.rand(args.batch, *input_shape) * 2 - 1).to(device)
    y = torch.randint(0, 10, (args.batch,)).to(device)
    amp_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else None

    def reference_port(amp: torch.dtype | None) -> ReferenceJEM:
        return ReferenceJEM(
            copy.deepcopy(model).to(device), buffer_size=args.buffer_size, n_steps=args.steps, amp_dtype=amp
        )

    classifier = ClassifierStep(copy.deepcopy(model).to(device), amp_dtype=amp_dtype)
    # `reference` is the original loop as written (float32); with bf16-mixed, `reference_amp` is the same loop with
    # plain autocast, so that jemkit is compared with both.
    ports = {"reference": reference_port(None)} | ({"reference_amp": reference_port(amp_dtype)} if amp_dtype else {})
    options = dict(compile=(args.compile_mode or True) if args.compile else False, channels_last=args.channels_last)
    same = dict(sampler=SGLD(n_steps=args.steps), buffer=ReplayBuffer(capacity=args.buffer_size), lr=1e-4)
    same["weights"] = {"px": 1.0, "energy_l2": 0.0}  # the reference's objective
    modules = {"jemkit": JEM(copy.deepcopy(model), **same, **options)}
    if "defaults" in args.also:
        modules["jemkit_defaults"] = JEM(copy.deepcopy(model), **options)
    if "yopo" in args.also:
        modules["jemkit_yopo"] = JEM(copy.deepcopy(model), sampler=PYLD(n_steps=1, inner_steps=5), **options)
    if "plain" in args.also:
        modules["jemkit_plain"] = JEM(copy.deepcopy(model), weights={"px": 0.0}, data_noise=0.0, **options)
    compile_status = "step" if modules["jemkit"].chains.compiled else "off"

    meter = Meter(device, args.warmup, args.iters)
    plain: dict[str, Callable[[], object]] = {name: partial(port.step, x, y) for name, port in ports.items()}
    plain["classifier"] = partial(classifier.step, x, y)
    total = args.warmup + args.iters + 1  # the last iteration counts FLOPs
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        batons, threads = {}, []
        for name, module in modules.items():
            batons[name] = Baton(name, meter)
            trainer = quiet_trainer(
                total,
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=1,
                precision="bf16-mixed" if amp_dtype is not None else "32-true",
                default_root_dir=root,
                callbacks=[batons[name]],
            )
            loader = DataLoader(RepeatedBatch(x, y, total), batch_size=None)
            threads.append(threading.Thread(target=batons[name].fit, args=(trainer, module, loader), daemon=True))
        for thread in threads:
            thread.start()
        for i in range(total):
            lightning_names = list(batons)[i % len(batons) :] + list(batons)[: i % len(batons)]
            turns = [*plain, *lightning_names] if i % 2 == 0 else [*lightning_names, *plain]
            for name in turns:
                if name in batons:
                    batons[name].take()
                else:
                    meter.run(name, i, plain[name])
        for baton in batons.values():  # release the Trainers after their last step, and let them finish
            baton.go.set()
        for thread, baton in zip(threads, batons.values(), strict=True):
            thread.join()
            if baton.error is not None:
                raise RuntimeError(f"contender {baton.name} failed") from baton.error

    states = meter.state_mb | {"classifier": state_mb(device, [classifier.model], classifier.optimizer)}
    for name, port in ports.items():
        states[name] = state_mb(device, [port.model], port.optimizer, port.buffer)
    peak_tflops = args.peak_tflops or (
        bf16_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    contenders = {}
    for name in [n for n in CONTENDERS if n in meter.ms]:
        stats = _summary(meter.ms[name])
        step_peak = max(meter.step_peak_mb[name])
        flops = meter.flops.get(name)
        contenders[name] = stats | {
            "state_mb": states[name],
            "step_peak_mb": step_peak,
            "peak_mb": states[name] + step_peak,
            "gflop": flops / 1e9 if flops is not None else None,
            "tflops": flops / (stats["median_ms"] / 1e3) / 1e12 if flops is not None else None,
        }
        tflops = contenders[name]["tflops"]
        contenders[name]["peak_fraction"] = tflops / peak_tflops if tflops is not None and peak_tflops else None
    med = {name: c["median_ms"] for name, c in contenders.items()}
    ratios = {
        "jemkit/reference": med["jemkit"] / med["reference"],
        "reference/classifier": med["reference"] / med["classifier"],
        "jemkit/classifier": med["jemkit"] / med["classifier"],
    }
    if "jemkit_defaults" in med:
        ratios["jemkit_defaults/reference"] = med["jemkit_defaults"] / med["reference"]
        ratios["jemkit_defaults/classifier"] = med["jemkit_defaults"] / med["classifier"]
    if "jemkit_yopo" in med:
        ratios["jemkit_yopo/reference"] = med["jemkit_yopo"] / med["reference"]
    if "jemkit_plain" in med:
        ratios["jemkit_plain/classifier"] = med["jemkit_plain"] / med["classifier"]
        for name in ("jemkit_defaults", "jemkit_yopo"):
            if name in med:
                ratios[f"{name}/jemkit_plain"] = med[name] / med["jemkit_plain"]
    if "reference_amp" in med:
        ratios["jemkit/reference_amp"] = med["jemkit"] / med["reference_amp"]
    if device.type == "cuda":
        memory = "cuda: state = tensor bytes on the GPU; step peak = max_memory_allocated - memory_allocated before"
        hardware = torch.cuda.get_device_name(device)
    else:
        reset = "reset per step via /proc/self/clear_refs" if meter.rss_reset else "high-water mark, NOT reset"
        memory = f"cpu: state = tensor bytes in host memory; step peak = peak RSS growth (getrusage, {reset}; approx)"
        hardware = f"cpu, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"
    return {
        "benchmark": "jemkit_step",
        "model": args.model,
        "input_shape": list(input_shape),
        "batch": args.batch,
        "sgld_steps": args.steps,
        "buffer_size": args.buffer_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "precision": args.precision,
        "compile": compile_status,
        "compile_mode": args.compile_mode,
        "channels_last": args.channels_last,
        "peak_tflops": peak_tflops,
        "device": device.type,
        "hardware": hardware,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "memory": memory,
        "contenders": contenders,
        "ratios": ratios,
    }


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name``, or ``None`` when it is not in ``BF16_PEAK_TFLOPS``."""
    return next(
        (peak for name, peak in BF16_PEAK_TFLOPS.items() if re.search(rf"\b{re.escape(name)}\b", device_name)), None
    )


def format_table(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"JEM step: {r['model']} {tuple(r['input_shape'])}, batch {r['batch']}, {r['sgld_steps']} SGLD steps, "
        f"precision {r['precision']}, compile {r['compile']} (mode {r['compile_mode']}), "
        f"channels-last {r['channels_last']}; {r['hardware']}; torch {r['torch']}, "
        f"lightning {r['lightning']}; {r['iters']} timed iterations after {r['warmup']} warm-up",
        f"{'contender':<16} {'median ms':>10} {'IQR ms':>9} {'x classif.':>10} {'state MB':>9} {'step peak MB':>12} "
        f"{'peak MB':>9} {'GFLOP/it':>9} {'TFLOP/s':>8} {'% bf16 peak':>11}",
    ]
    base = r["contenders"]["classifier"]["median_ms"]
    for name, c in r["contenders"].items():
        gflop = f"{c['gflop']:9.2f}" if c["gflop"] is not None else f"{'n/a':>9}"
        tflops = f"{c['tflops']:8.3f}" if c["tflops"] is not None else f"{'n/a':>8}"
        fraction = f"{100 * c['peak_fraction']:10.1f}%" if c["peak_fraction"] is not None else f"{'n/a':>11}"
        lines.append(
            f"{name:<16} {c['median_ms']:10.1f} {c['iqr_ms']:9.1f} {c['median_ms'] / base:10.1f} "
            f"{c['state_mb']:9.1f} {c['step_peak_mb']:12.1f} {c['peak_mb']:9.1f} {gflop} {tflops} {fraction}"
        )
    ratios = r["ratios"]
    speedups = ", ".join(
        f"{other} / jemkit = {1 / ratios[f'jemkit/{other}']:.2f}x"
        for other in ("reference", "reference_amp")
        if f"jemkit/{other}" in ratios
    )
    lines += [
        f"speed-up of jemkit: {speedups} (> 1: jemkit faster)   "
        f"reference / classifier = {ratios['reference/classifier']:.1f}   "
        f"jemkit / classifier = {ratios['jemkit/classifier']:.1f}",
        f"memory: {r['memory']}",
    ]
    others = [
        f"{pair} = {ratios[pair]:.2f}"
        for pair in (
            "jemkit_defaults/reference",
            "jemkit_defaults/jemkit_plain",
            "jemkit_yopo/reference",
            "jemkit_yopo/jemkit_plain",
            "jemkit_plain/classifier",
        )
        if pair in ratios
    ]
    if others:
        lines.insert(-1, "   ".join(others))
    if r["peak_tflops"]:
        lines.append(f"% bf16 peak: achieved TFLOP/s over {r['peak_tflops']:.0f} TFLOP/s (dense bf16 of this device)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table, then the result as one JSON line (also to ``--json``)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run(args)
    finally:
        torch.set_num_threads(threads)
    print(format_table(result))
    line = json.dumps(result)
    print(line, flush=True)
    if args.json is not None:
        args.json.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
