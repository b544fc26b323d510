"""Plain-data configs for jemkit's small objects (samplers, initial distributions).

Checkpoints must load with ``torch.load(weights_only=True)`` (Lightning's default when resuming), which refuses
pickled Python objects. So the hyper-parameters a JEM saves hold ``{"class_path", "init_args"}`` dicts, the same shape
LightningCLI writes in YAML, and the JEM turns such dicts back into objects when it is rebuilt from a checkpoint.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from types import FrameType
from typing import Any, TypeVar

import torch
from lightning.pytorch.core.mixins import HyperparametersMixin

__all__ = ["from_config", "hparams_record", "import_path", "is_plain", "to_config"]

T = TypeVar("T")


def to_config(obj: object) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` from the constructor's parameters, read back from same-named attributes (or
    from ``obj.init_args()`` where an object defines it); objects among them become nested configs."""
    cls = type(obj)
    if hasattr(obj, "init_args"):
        values = obj.init_args()
    else:
        names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        values = {name: getattr(obj, name) for name in names if hasattr(obj, name)}
    init_args = {}
    for name, value in values.items():
        if isinstance(value, (torch.Tensor, torch.nn.Module)):
            continue  # data, not configuration: such an object must be passed again when it is rebuilt
        if isinstance(value, tuple):
            value = list(value)
        elif value is not None and not is_plain(value):
            value = to_config(value)
        init_args[name] = value
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def import_path(path: str) -> Any:
    """The object a dotted path ``module.attr`` names (a class, a function, a module attribute): the one place jemkit
    imports by name. ``ImportError``, ``AttributeError`` or ``ValueError`` (not a dotted path) otherwise."""
    module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"expected a dotted path module.attr, got {path!r}")
    return getattr(importlib.import_module(module_name), name)


def from_config(config: dict[str, Any], base: type[T]) -> T:
    """Build the object a :func:`to_config` dict describes; only subclasses of ``base`` are accepted."""
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(
            f"expected a {{'class_path': ..., 'init_args': ...}} dict for a {base.__name__}, got {config!r}"
        )
    try:
        cls = import_path(config["class_path"])
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import {config['class_path']!r} for a {base.__name__}") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{config['class_path']!r} is not a {base.__name__}")
    init_args = {}
    for key, value in config.get("init_args", {}).items():
        if isinstance(value, dict) and "class_path" in value:
            value = from_config(value, object)
        init_args[key] = tuple(value) if isinstance(value, list) else value
    return cls(**init_args)


def is_plain(value: Any) -> bool:
    """Whether ``value`` is plain data (what ``torch.load(weights_only=True)`` accepts in hyper-parameters)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def hparams_record(frame: FrameType | None, objects: tuple[type, ...], values: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters a module records, as plain data: what Lightning would record for the ``__init__`` whose
    ``frame`` is given, with ``values`` (e.g. settings resolved from a preset) in place of the arguments.

    Under LightningCLI the classifier arrives as a config (class_path/init_args), which is what makes
    ``load_from_checkpoint(path)`` work without arguments; an ``nn.Module`` passed from Python is left out (its weights
    are in the state dict) and must be passed again when loading, as must optimiser factories. Instances of
    ``objects`` (samplers, buffers) become ``{"class_path", "init_args"}`` configs, so that checkpoints load with
    ``weights_only=True``. Pass the result to ``save_hyperparameters`` once.
    """
    probe = HyperparametersMixin()  # reads the frame (or LightningCLI's given config) as a module would
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
        probe.save_hyperparameters(frame=frame)
    record = {}
    for key, value in {**probe.hparams, **values}.items():
        if isinstance(value, objects):
            record[key] = to_config(value)
        elif value is not None and is_plain(value):
            # None is every such argument's default: dropping it loses nothing, and avoids a clash with a
            # datamodule's hparams (e.g. its num_classes) when Lightning merges them for the logger.
            record[key] = value
    if "classifier" in record:
        record["classifier"] = _without_weight_loading(record["classifier"])
    return record


def _without_weight_loading(config: Any) -> Any:
    """A classifier config built by ``jemkit.models.with_weights`` recorded as the classifier inside it: a checkpoint
    holds the trained weights itself, and must load where the original weights file is gone."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if str(get("class_path", "")).endswith("with_weights"):
        init_args = get("init_args") or {}
        inner = init_args.get("classifier") if isinstance(init_args, dict) else getattr(init_args, "classifier", None)
        return _without_weight_loading(inner) if inner is not None else config
    return config
