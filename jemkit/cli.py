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

import importlib
import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from jemkit.divergence import DivergenceError
from jemkit.losses import objective_weights
from jemkit.module import JEM
from jemkit.presets import preset_config

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
        defaults filled in."""
        argv = sys.argv[1:] if args is None else args
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
            for key, value in preset_config(model.get("preset")).items():
                if key == "weights":  # merged key by key, as the JEM does
                    model[key] = objective_weights(model.get(key), value)
                elif model.get(key) is None:
                    model[key] = _namespace(value)
        sub_parser = parser._subcommands_action._name_parser_map[subcommand] if subcommand else parser
        print(sub_parser.dump(config, skip_none=False, skip_validation=True), end="")
        sys.exit(0)


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
            return _import(a) is _import(b)
        except (ImportError, AttributeError, ValueError):
            return False
    return False


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


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
        JEMCLI(args=argv, parser_kwargs={"epilog": "Also: `jemkit evaluate --help` evaluates a checkpoint."})
    except (ValueError, TypeError, OSError, DivergenceError) as err:
        if debug:
            raise
        # A user's mistake or a diverged run gets one clear line; --debug (or JEMKIT_DEBUG=1) shows the traceback.
        print(f"jemkit: error: {err}\n(run with --debug or JEMKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
