"""The ``jemkit`` command: a LightningCLI over :class:`jemkit.JEM` and any LightningDataModule.

    jemkit fit -c recipes/digits.yaml
    jemkit test -c recipes/digits.yaml --ckpt_path runs/digits/checkpoints/best.ckpt
    jemkit fit --print_config
    jemkit evaluate --ckpt runs/digits/checkpoints/best.ckpt --out eval/digits

The classifier is chosen in YAML with ``class_path`` (any importable ``nn.Module``: jemkit's models, torchvision,
timm or your own), and so is the datamodule. Because the CLI records those configs in the checkpoint's
hyper-parameters, ``JEM.load_from_checkpoint(path)`` rebuilds the classifier without arguments.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from torch import nn

from jemkit._config import _without_weight_loading, import_path
from jemkit.callbacks.progress import ProgressLines
from jemkit.checkpoint import load_checkpoint_file, upgraded_hyper_parameters
from jemkit.divergence import DivergenceError
from jemkit.losses import objective_weights
from jemkit.module import _LEGACY_WEIGHTS, JEM
from jemkit.presets import preset_config, preset_settings

__all__ = ["JEMCLI", "main"]


class JEMCLI(LightningCLI):
    """LightningCLI with jemkit's defaults: the model is a :class:`JEM`; the datamodule is any subclass."""

    _given_model: dict[str, Any] = {}  # noqa: RUF012  (the model options as given, set by parse_arguments)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", JEM)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        # Checkpoints are written atomically unless the config names other plugins.
        kwargs.setdefault("trainer_defaults", {"plugins": [{"class_path": "jemkit.checkpoint.AtomicCheckpointIO"}]})
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's reading of ``--ckpt_path``'s model settings (they replace the config's), with the checkpoint
        loaded weights-only (a file with a pickle payload is refused in one line, ``--weights_only false`` loads a
        trusted one) and the hyper-parameters of jemkit 0.1 renamed (``px_weight`` -> ``weights``), so that every
        checkpoint that ``JEM.load_from_checkpoint`` loads also resumes."""
        subcommand = self.config.get("subcommand")
        settings = self.config[subcommand] if subcommand else None
        ckpt_path = settings.get("ckpt_path") if settings is not None else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        trusted = settings.get("weights_only") is False
        checkpoint = load_checkpoint_file(ckpt_path, "cpu", weights_only=not trusted, trust_hint="--weights_only false")
        hparams = upgraded_hyper_parameters(checkpoint.get("hyper_parameters", {}), _LEGACY_WEIGHTS)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:  # a model class other than JEM, as LightningCLI records it
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"The model settings recorded in {ckpt_path} do not parse (see above)\n")
            raise

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """LightningCLI's Trainer, plus a line of progress every 100 steps when standard error is not a terminal (a
        log file, CI): a progress bar written to a file shows nothing until the run ends."""
        trainer = super().instantiate_trainer(**kwargs)
        if not sys.stderr.isatty() and not any(isinstance(c, ProgressLines) for c in trainer.callbacks):
            trainer.callbacks.append(ProgressLines())
        return trainer

    def before_instantiate_classes(self) -> None:
        """Resolve ``{default_root_dir}`` in any string of the config (logger ``save_dir``, checkpoint ``dirpath``):
        recipes write every output under the Trainer's ``default_root_dir``, so one override moves them all. Refuse
        a resumed run whose model options the checkpoint's settings replaced."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        root = config.get("trainer", {}).get("default_root_dir") or "."
        for key in list(config.keys()):  # dotted keys of every leaf, lists included as whole values
            config[key] = _with_root(config[key], str(root))
        _refuse_replaced_options(self._given_model, config.get("model"), config.get("ckpt_path"))

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """LightningCLI's parsing, except that ``--print_config`` shows the model with its preset and
        defaults filled in, and that a recipe given without the base it extends is named with the fix."""
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list):
            _check_recipe_bases(argv)
        if not isinstance(argv, list) or "--print_config" not in argv:
            super().parse_arguments(parser, args)
            subcommand = self.config.get("subcommand")
            model = (self.config[subcommand] if subcommand else self.config).get("model")
            self._given_model = _leaves(model)  # before LightningCLI replaces them with a checkpoint's (ckpt_path)
            return None
        with warnings.catch_warnings():  # the stripped argv is passed on; Lightning would warn that argv is set too
            warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
            super().parse_arguments(parser, [a for a in argv if a != "--print_config"])
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        model = config.get("model")
        if model is not None:  # what None means: the preset's setting, else jemkit's default
            classifier, unknown_buffer = None, False
            if _default_buffer_needs_classifier(model):
                classifier = _configured_classifier(model)
                unknown_buffer = classifier is None
            for key, value in preset_config(model.get("preset"), classifier).items():
                if key == "weights":  # merged key by key, as the JEM does
                    model[key] = objective_weights(model.get(key), value)
                elif model.get(key) is None and not (key == "buffer" and unknown_buffer):
                    model[key] = _namespace(value)
            if unknown_buffer:
                print(
                    "# model.buffer left null: its default depends on the classifier (restarts from the input box "
                    "with BatchNorm, jemkit.presets.default_restarts), which could not be built here",
                    file=sys.stderr,
                )
        sub_parser = parser._subcommands_action._name_parser_map[subcommand] if subcommand else parser
        print(sub_parser.dump(config, skip_none=False, skip_validation=True), end="")
        sys.exit(0)


def _config_files(argv: list[str]) -> list[str]:
    """The ``-c/--config`` values of a command line, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping (empty if the file cannot be read as one)."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _classifier_of(config: dict[str, Any]) -> dict[str, Any]:
    """``model.classifier`` of a config (empty if it sets none)."""
    model = config.get("model")
    classifier = model.get("classifier") if isinstance(model, dict) else None
    return classifier if isinstance(classifier, dict) else {}


def _is_base(config: dict[str, Any]) -> bool:
    """A base recipe sets a classifier (its ``class_path``) and no data."""
    return "class_path" in _classifier_of(config) and "data" not in config


def _extends_a_base(config: dict[str, Any]) -> bool:
    """A dataset's recipe that extends a base sets the classifier's ``init_args`` but not its ``class_path``."""
    classifier = _classifier_of(config)
    return "init_args" in classifier and "class_path" not in classifier


def _siblings(path: Path, kind: Any) -> list[str]:
    """The YAML files beside ``path`` for which ``kind(config)`` holds."""
    return [str(other) for other in sorted(path.parent.glob("*.y*ml")) if other != path and kind(_yaml_mapping(other))]


def _check_recipe_bases(argv: list[str]) -> None:
    """Recipes split into a base (``recipes/cifar_base.yaml``: classifier and training, no data) and the datasets'
    files that extend it (``recipes/cifar10.yaml``: the data and the classifier's ``init_args``) are given together,
    base first. Given alone or in the wrong order, ``ValueError`` with the command that works."""
    names = _config_files(argv)
    configs = [(name, _yaml_mapping(Path(name)) if Path(name).is_file() else {}) for name in names]
    has_class_path = False
    for name, config in configs:
        if _extends_a_base(config) and not has_class_path:
            bases = _siblings(Path(name), _is_base)
            example = f"jemkit fit -c {bases[0]} -c {name}" if len(bases) == 1 else f"jemkit fit -c <base> -c {name}"
            raise ValueError(
                f"{name} sets the classifier's init_args but not its class_path: it extends a base recipe"
                + (f" ({' or '.join(bases)})" if bases else "")
                + f", which must come first: {example}"
            )
        has_class_path = has_class_path or "class_path" in _classifier_of(config)
    given_data = any("data" in config for _, config in configs) or any(a.startswith("--data") for a in argv)
    for name, config in configs:
        extensions = _siblings(Path(name), _extends_a_base) if _is_base(config) and not given_data else []
        if extensions:
            raise ValueError(
                f"{name} is a base recipe without data: give a dataset's file after it, e.g. "
                f"jemkit fit -c {name} -c {extensions[0]} (or {', '.join(Path(e).name for e in extensions[1:])})"
            )


def _with_root(value: Any, root: str) -> Any:
    """``value`` with ``{default_root_dir}`` replaced by ``root`` in every string it holds (lists, Namespaces)."""
    if isinstance(value, str):
        return value.replace("{default_root_dir}", root)
    if isinstance(value, list):
        return [_with_root(v, root) for v in value]
    if isinstance(value, Namespace):
        return Namespace(**{k: _with_root(v, root) for k, v in vars(value).items()})
    if isinstance(value, dict):
        return {k: _with_root(v, root) for k, v in value.items()}
    return value


def _leaves(value: Any, prefix: str = "model") -> dict[str, Any]:
    """Every leaf of a (nested) config as ``{"model.a.b": value}``."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        leaves: dict[str, Any] = {}
        for key, inner in value.items():
            leaves |= _leaves(inner, f"{prefix}.{key}")
        return leaves
    return {prefix: value}


def _refuse_replaced_options(given: dict[str, Any], model: Any, ckpt_path: Any) -> None:
    """``jemkit fit --ckpt_path`` resumes with the checkpoint's model settings (LightningCLI loads them over the
    config): refuse, naming each, the options that were given with another value and would silently be ignored."""
    if not ckpt_path or model is None:
        return
    final = _leaves(model)
    ignored = [
        f"{key}={value!r} (the checkpoint has {final.get(key)!r})"
        for key, value in given.items()
        if value is not None and key in final and not _same_setting(key, final[key], value)
    ]
    if ignored:
        raise ValueError(
            f"--ckpt_path {ckpt_path} resumes the run with the checkpoint's model settings, so these options would be "
            f"ignored: {'; '.join(ignored)}. Drop them to resume, or start a new run from the trained weights "
            "(model.classifier: jemkit.models.with_weights)"
        )


def _same_setting(key: str, a: Any, b: Any) -> bool:
    """Whether two config leaves mean the same; class paths compare by the class they import
    (``jemkit.ReplayBuffer`` is ``jemkit.sampling.buffer.ReplayBuffer``)."""
    if a == b or key.endswith("_instantiator"):
        return True
    if key.endswith("class_path") and isinstance(a, str) and isinstance(b, str):
        try:
            return import_path(a) is import_path(b)
        except (ImportError, AttributeError, ValueError):
            return False
    return False


_WEIGHT_ARGUMENTS = frozenset({"weights", "pretrained", "weights_backbone", "pretrained_backbone", "path"})
"""Init arguments that load trained weights, left out at every level when ``--print_config`` builds an architecture."""


def _default_buffer_needs_classifier(model: Any) -> bool:
    """Whether the buffer ``--print_config`` fills in is jemkit's default, which depends on the classifier."""
    if model.get("buffer") is not None:
        return False
    preset = model.get("preset")
    return preset is None or preset_settings(preset).get("buffer") is None


def _configured_classifier(model: Any) -> nn.Module | None:
    """The architecture of the classifier a parsed model config describes, so that ``--print_config`` shows the
    default buffer it gets (:func:`jemkit.presets.default_restarts`): built on the meta device, without the arguments
    that load weights and with a ``with_weights`` wrapper replaced by the classifier inside it (nothing is downloaded
    or allocated). ``None`` where it cannot be built here."""
    config = _without_weight_loading(model.get("classifier"))
    config = _architecture(config.as_dict() if isinstance(config, Namespace) else config)
    if not (isinstance(config, dict) and "class_path" in config):
        return None
    try:
        with torch.device("meta"):
            built = _build(config)
    except Exception:  # any failure of a user's constructor: the caller prints no default instead
        return None
    return built if isinstance(built, nn.Module) else None


def _architecture(config: Any) -> Any:
    """A config with the arguments that load weights removed at every level."""
    if isinstance(config, dict):
        return {k: _architecture(v) for k, v in config.items() if k not in _WEIGHT_ARGUMENTS}
    if isinstance(config, list):
        return [_architecture(v) for v in config]
    return config


def _build(config: Any) -> Any:
    """What a ``class_path``/``init_args`` config describes, for classes and factory functions
    (``torchvision.models.resnet18``) alike, nested configs (also in lists) built first."""
    if isinstance(config, list):
        return [_build(v) for v in config]
    if not (isinstance(config, dict) and "class_path" in config):
        return config
    factory = import_path(config["class_path"])
    return factory(**{k: _build(v) for k, v in (config.get("init_args") or {}).items()})


def _namespace(value: Any) -> Any:
    """Nested dicts as jsonargparse Namespaces, the form a parsed config holds."""
    if isinstance(value, dict):
        return Namespace(**{k: _namespace(v) for k, v in value.items()})
    return value


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``jemkit`` console script (``args`` for tests; default ``sys.argv``).

    ``jemkit evaluate ...`` goes to :mod:`jemkit.evaluate.command` (it loads a checkpoint rather than building a
    model from a config); everything else is LightningCLI.
    """
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv or os.environ.get("JEMKIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv[:1] == ["evaluate"]:
            from jemkit.evaluate.command import run

            run(argv[1:])
            return
        if args is None:  # the console script: LightningCLI reads sys.argv itself (args= beside it would warn)
            sys.argv[1:] = argv
        epilog = {"epilog": "Also: `jemkit evaluate --help` evaluates a checkpoint."}
        JEMCLI(args=None if args is None else argv, parser_kwargs=epilog)
    except (ValueError, TypeError, OSError, DivergenceError) as err:
        if debug:
            raise
        # A user's mistake or a diverged run gets one clear line; --debug (or JEMKIT_DEBUG=1) shows the traceback.
        print(f"jemkit: error: {err}\n(run with --debug or JEMKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
