"""``jemkit evaluate``: load a JEM checkpoint, evaluate it, write ``report.json`` and figures, print a table.

    jemkit evaluate --ckpt checkpoints/jem-digits.ckpt --out eval/digits
    jemkit evaluate --ckpt runs/cifar/best.ckpt --data jemkit.data.CIFAR10DataModule --data.root data --defense_steps 10
    jemkit evaluate --ckpt runs/cifar/best.ckpt --budgets cifar --autoattack true   # standard budgets, AutoAttack
    jemkit evaluate --config eval.yaml        # the same options in YAML; --print_config shows them

The model comes from the checkpoint. The data defaults to the datamodule recorded in the checkpoint by
``jemkit fit`` and can be replaced with ``--data`` (``class_path``/``init_args``, as in the fit config).
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import instantiate_module

from jemkit.data.ood import OOD_SETS
from jemkit.evaluate.generative import resolve_feature
from jemkit.evaluate.report import DEFAULT_ATTACKS, evaluate, format_report
from jemkit.evaluate.robustness import ADAPTIVE_ATTACKS, STANDARD_BUDGETS
from jemkit.module import JEM
from jemkit.scores import SCORES

__all__ = ["build_parser", "check_options", "load_datamodule", "load_jem", "robustness_attacks", "run"]

Attack = dict[str, int | float | str]


def build_parser() -> ArgumentParser:
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
    parser.add_argument("--ood", type=list[str], default=list(OOD_SETS), help="built-in OOD sets")
    parser.add_argument(
        "--ood_data",
        type=list[LightningDataModule] | None,
        default=None,
        help="more OOD sets: datamodules whose test split is scored (class_path/init_args)",
    )
    parser.add_argument("--scores", type=list[str], default=list(SCORES), help="OOD scores")
    parser.add_argument(
        "--attacks",
        type=list[Attack],
        default=[dict(a) for a in DEFAULT_ATTACKS],
        help="robustness settings: {kind: clean|pgd|autoattack|noise, norm, eps (or eps_01 on [0, 1]), steps, "
        "restarts, std}",
    )
    parser.add_argument(
        "--budgets",
        type=str | None,
        default=None,
        help=f"standard budgets instead of --attacks: {', '.join(STANDARD_BUDGETS)} (L-inf 8/255, L2 0.5 on [0, 1])",
    )
    parser.add_argument(
        "--autoattack",
        type=bool,
        default=False,
        help="also run AutoAttack (pip install 'jemkit[attacks]') at each PGD budget",
    )
    parser.add_argument("--autoattack_steps", type=int, default=100, help="APGD/FAB iterations of AutoAttack")
    parser.add_argument(
        "--data_range",
        type=tuple[float, float] | None,
        default=None,
        help="the inputs' range (low, high) attacks stay in and [0, 1] budgets scale by (default: the datamodule's "
        "data_range)",
    )
    parser.add_argument(
        "--defense_steps",
        type=int,
        default=0,
        help="steps of the JEM's own sampler on E(x) before classifying (the defence), attacked through it",
    )
    parser.add_argument(
        "--adaptive",
        type=list[str] | None,
        default=None,
        help=f"attacks through the defence, some of {', '.join(ADAPTIVE_ATTACKS)} (default: all; []: transfer only, "
        "an upper bound)",
    )
    parser.add_argument(
        "--eot",
        type=int | None,
        default=None,
        help="gradient draws per attack step (default 1, 20 if the defence is random)",
    )
    parser.add_argument(
        "--defense_draws",
        type=int | None,
        default=None,
        help="defence draws averaged per prediction (default 1, 20 if the defence is random)",
    )
    parser.add_argument(
        "--fixed_noise_control", type=bool, default=True, help="attack a random defence with its noise fixed too"
    )
    parser.add_argument("--temperature_scaling", type=bool, default=True)
    parser.add_argument("--n_bins", type=int, default=15)
    parser.add_argument("--max_samples", type=int | None, default=1000, help="cap per set for OOD/robustness")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--samples_per_class", type=int, default=8, help="sample grid rows' length (0: none)")
    parser.add_argument("--fid_samples", type=int, default=0, help="samples per source for FID/IS (0: skip)")
    parser.add_argument(
        "--fid_sources", type=list[str], default=["buffer", "fresh"], help="sample sources for FID/IS: buffer, fresh"
    )
    parser.add_argument(
        "--fid_feature",
        type=str,
        default="self",
        help="FID features: self (the JEM's penultimate layer, offline), inception (needs jemkit[fid]), or a dotted "
        "path module.attr to an nn.Module or a callable returning one",
    )
    parser.add_argument("--fid_steps", type=int | None, default=None, help="steps of fresh chains (default 5x)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", type=bool, default=True)
    return parser


def load_jem(path: str, device: str = "cpu") -> JEM:
    """Load a JEM checkpoint with errors that say what is wrong with the file."""
    try:
        return JEM.load_from_checkpoint(path, map_location=device)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint not found: {path}") from err
    except TypeError as err:
        if "classifier" not in str(err):
            raise
        raise ValueError(
            f"{path} holds no classifier config (the JEM was built in Python, not by `jemkit fit`): load it with "
            "JEM.load_from_checkpoint(path, classifier=...) and call jemkit.evaluate.evaluate(jem, datamodule, out)"
        ) from err


def load_datamodule(path: str, data: Any = None) -> LightningDataModule:
    """The datamodule given on the command line, else the one recorded in the checkpoint by LightningCLI."""
    if data is not None:
        return data
    hparams = dict(torch.load(path, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if "_class_path" not in hparams:
        raise ValueError(
            f"{path} records no datamodule: pass one with --data (e.g. --data jemkit.data.DigitsDataModule)"
        )
    return instantiate_module(LightningDataModule, hparams)


def check_options(ood: list[str], scores: list[str]) -> None:
    """Refuse unknown OOD sets and scores before any work is done or any file written."""
    unknown_sets = [name for name in ood if name not in OOD_SETS]
    if unknown_sets:
        raise ValueError(
            f"unknown --ood set(s) {unknown_sets}; built-in sets: {', '.join(OOD_SETS)} (others: --ood_data)"
        )
    unknown_scores = [name for name in scores if name not in SCORES]
    if unknown_scores:
        raise ValueError(f"unknown --scores {unknown_scores}; expected some of {', '.join(SCORES)}")


def robustness_attacks(
    attacks: list[dict[str, Any]], budgets: str | None = None, autoattack: bool = False, autoattack_steps: int = 100
) -> list[dict[str, Any]]:
    """The attack list: ``attacks``, or a standard one (``budgets``), with AutoAttack after each PGD budget."""
    if budgets is not None:
        if budgets not in STANDARD_BUDGETS:
            raise ValueError(f"unknown budgets {budgets!r}; expected one of {', '.join(STANDARD_BUDGETS)}")
        attacks = list(STANDARD_BUDGETS[budgets])
    result = []
    for attack in attacks:
        result.append(dict(attack))
        if autoattack and attack.get("kind") == "pgd":
            budget = {k: attack[k] for k in ("norm", "eps", "eps_01") if k in attack}
            result.append({"kind": "autoattack", **budget, "steps": autoattack_steps})
    return result


def run(args: list[str] | None = None) -> dict[str, Any]:
    """Parse ``args`` (default ``sys.argv[2:]``), evaluate, print the table; returns the report."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    init = parser.instantiate_classes(cfg)
    attacks = robustness_attacks(cfg.attacks, cfg.budgets, cfg.autoattack, cfg.autoattack_steps)  # errors first
    check_options(cfg.ood, cfg.scores)
    torch.manual_seed(cfg.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    jem = load_jem(cfg.ckpt, device)
    datamodule = load_datamodule(cfg.ckpt, init.get("data"))
    ood_datasets = {}
    for ood_module in init.get("ood_data") or []:
        ood_module.setup("test")
        ood_datasets[type(ood_module).__name__] = ood_module.test_dataset
    generative = None
    if cfg.fid_samples > 0:
        generative = {
            "num_samples": cfg.fid_samples,
            "sources": cfg.fid_sources,
            "fresh_steps": cfg.fid_steps,
            "feature": resolve_feature(cfg.fid_feature),
        }
    report = evaluate(
        jem,
        datamodule,
        cfg.out,
        ood=cfg.ood,
        ood_datasets=ood_datasets,
        scores=cfg.scores,
        attacks=attacks,
        defense_steps=cfg.defense_steps,
        robustness={
            "adaptive": cfg.adaptive,
            "eot": cfg.eot,
            "draws": cfg.defense_draws,
            "control": cfg.fixed_noise_control,
            **({"clip": tuple(cfg.data_range)} if cfg.data_range is not None else {}),
        },
        temperature_scaling=cfg.temperature_scaling,
        n_bins=cfg.n_bins,
        max_samples=cfg.max_samples,
        batch_size=cfg.batch_size,
        num_sample_images=cfg.samples_per_class,
        generative=generative,
        progress=cfg.progress,
    )
    print(format_report(report))
    print(f"\nreport: {cfg.out}/report.json")
    return report
