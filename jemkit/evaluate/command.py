"""``jemkit evaluate``: load a JEM checkpoint, evaluate it, write ``report.json`` and figures, print a table.

    jemkit evaluate --ckpt checkpoints/jem-digits.ckpt --out eval/digits
    jemkit evaluate --ckpt runs/cifar/best.ckpt --data jemkit.data.CIFAR10DataModule --data.root data \\
        --robustness.defense_steps 10
    jemkit evaluate --ckpt runs/cifar/best.ckpt --robustness.budgets cifar --robustness.autoattack true
    jemkit evaluate --config eval.yaml        # the same options in YAML; --print_config shows them

The model comes from the checkpoint. The data defaults to the datamodule recorded in the checkpoint by
``jemkit fit`` and can be replaced with ``--data`` (``class_path``/``init_args``, as in the fit config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import LightningDataModule

from jemkit.checkpoint import load_checkpoint_file
from jemkit.evaluate.calibration import CalibrationOptions
from jemkit.evaluate.report import evaluate, format_report
from jemkit.evaluate.robustness import RobustnessOptions
from jemkit.evaluate.samples import SampleOptions
from jemkit.evaluate.shift import ShiftOptions
from jemkit.loading import TRUST_OPTION, load_classifier, load_datamodule, load_jem
from jemkit.metrics.generative import GenerativeOptions
from jemkit.ood.pipeline import OODOptions

__all__ = ["SECTIONS", "build_parser", "run"]

SECTIONS: dict[str, type] = {
    "calibration": CalibrationOptions,
    "ood": OODOptions,
    "robustness": RobustnessOptions,
    "samples": SampleOptions,
}
"""The sections of the report that run by default, by the name their options take on the command line and in
:func:`evaluate`; ``--generative`` and ``--shift`` are off unless given."""


def build_parser() -> ArgumentParser:
    """The options of ``jemkit evaluate``: a few of the run's own, then each section's options object under its
    name (``--robustness.defense_steps``), declared once in the dataclasses the Python API takes."""
    parser = ArgumentParser(prog="jemkit evaluate", description=__doc__.split("\n\n")[0], exit_on_error=True)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML file with these options")
    parser.add_argument("--ckpt", type=str, required=True, help="checkpoint written by `jemkit fit` or Trainer.fit")
    parser.add_subclass_arguments(
        LightningDataModule,
        "data",
        required=False,
        fail_untyped=False,
        help="data to evaluate on (default: the datamodule stored in the checkpoint)",
    )
    parser.add_argument("--out", type=str, default="eval", help="output folder for report.json and figures")
    parser.add_argument(
        "--ood_data",
        type=list[LightningDataModule] | None,
        default=None,
        help="more OOD sets: datamodules whose test split is scored (class_path/init_args)",
    )
    parser.add_argument(
        "--baseline_ckpt",
        type=str | None,
        default=None,
        help="the plain classifier to compare with: a `jemkit fit` checkpoint (e.g. weights={px: 0}) or the weights "
        "of the JEM's classifier architecture; evaluated the same way, printed side by side",
    )
    for name, options in SECTIONS.items():  # on by default; --<name> false switches a section off
        parser.add_argument(
            f"--{name}",
            type=options | bool,
            default=options(),
            help=(options.__doc__ or "").split("\n\n")[0] + f" (on; --{name} false: off)",
        )
    parser.add_argument(
        "--generative",
        type=GenerativeOptions | None,
        default=None,
        help="FID and IS of the JEM's samples against the test split (off by default): --generative '{}' for the "
        "defaults, or its options, e.g. --generative.num_samples 1000 --generative.sources [buffer]",
    )
    parser.add_argument(
        "--shift",
        type=ShiftOptions | None,
        default=None,
        help="accuracy and calibration under corruptions of the test split (off by default): --shift '{}' for every "
        "shift of the data's kind, or its options, e.g. --shift.severities [3,5] --shift.adapt energy",
    )
    parser.add_argument("--max_samples", type=int | None, default=1000, help="cap per set for OOD/robustness")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weights_only",
        type=bool,
        default=True,
        help="load checkpoints weights-only (refuses files carrying pickled code); false only for a trusted file",
    )
    parser.add_argument("--progress", type=bool, default=True)
    return parser


def run(args: list[str] | None = None) -> dict[str, Any]:
    """Parse ``args`` (default ``sys.argv[2:]``), evaluate, print the table; returns the report."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    init = parser.instantiate_classes(cfg)
    sections = {name: options() if init[name] is True else init[name] for name, options in SECTIONS.items()}
    torch.manual_seed(cfg.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if not Path(cfg.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint not found: {cfg.ckpt}")
    # one safe read first: a file refused as unsafe is named with this command's option, and nothing in it runs
    load_checkpoint_file(cfg.ckpt, "cpu", cfg.weights_only, trust_hint=TRUST_OPTION)
    jem = load_jem(cfg.ckpt, device, cfg.weights_only)
    datamodule = load_datamodule(cfg.ckpt, init.get("data"), cfg.weights_only)
    ood_data = {}
    for ood_module in init.get("ood_data") or []:
        ood_module.setup("test")
        ood_data[type(ood_module).__name__] = ood_module.test_dataset
    baseline = load_classifier(cfg.baseline_ckpt, jem, device) if cfg.baseline_ckpt else None
    report = evaluate(
        jem,
        datamodule,
        cfg.out,
        ood_data=ood_data,
        baseline=baseline,
        shift=init.get("shift"),
        generative=init.get("generative"),
        max_samples=cfg.max_samples,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        **sections,
    )
    print(format_report(report))
    print(f"\nreport: {cfg.out}/report.json")
    return report
