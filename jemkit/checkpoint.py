"""Checkpoints: what a JEM records about itself, the checks on loading, and writing that never leaves a half-written
file behind.

Lightning's default writer streams straight into the target path: a process killed while saving (preemption, OOM,
a diverged run being stopped) can leave a truncated ``last.ckpt`` that then fails to resume. ``AtomicCheckpointIO``
writes to a temporary file in the same folder and renames it over the target (``os.replace`` is atomic on POSIX
and Windows), so the target is always either the old complete checkpoint or the new complete one.
"""

from __future__ import annotations

import io

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from typing_extensions import override

from jemkit.divergence import DivergenceError

__all__ = [
    "AtomicCheckpointIO",
    "check_finite_parameters",
    "check_jemkit_section",
    "is_unreadable_checkpoint",
    "upgraded_checkpoint",
    "jemkit_section",
]


def jemkit_section(classifier: nn.Module, num_classes: int | None, input_shape: tuple[int, ...] | None) -> dict:
    """What a JEM checkpoint records about the model, checked by :func:`check_jemkit_section` when it loads."""
    from jemkit import __version__

    return {
        "version": __version__,
        "num_classes": num_classes,
        "input_shape": input_shape,
        "classifier": type(classifier).__qualname__,
    }


def check_jemkit_section(checkpoint: dict[str, Any], classifier: nn.Module, num_classes: int | None) -> int | None:
    """Refuse a checkpoint of another kind, architecture or class count; return its number of classes."""
    info = checkpoint.get("jemkit")
    if info is None:
        raise ValueError("this checkpoint was not written by a jemkit JEM (it has no 'jemkit' section)")
    saved_classifier = info.get("classifier")
    if saved_classifier is not None and saved_classifier != type(classifier).__qualname__:
        raise ValueError(
            f"the checkpoint holds a {saved_classifier} classifier but this JEM wraps a "
            f"{type(classifier).__qualname__}: build the JEM with the same architecture"
        )
    saved = info.get("num_classes")
    if saved is not None and num_classes is not None and saved != num_classes:
        raise ValueError(f"the checkpoint has {saved} classes but this JEM was built with {num_classes}")
    return saved


def upgraded_checkpoint(path: Any, legacy: dict[str, str]) -> io.BytesIO:
    """The checkpoint at ``path`` with hyper-parameters of an older jemkit renamed (``legacy``: old name -> key of the
    ``weights`` dict), as an in-memory file for ``load_from_checkpoint``: LightningCLI rebuilds a module strictly from
    its recorded config, so a renamed argument would otherwise make the file unloadable."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters", {})
    weights = {key: hparams.pop(old) for old, key in legacy.items() if old in hparams}
    hparams["weights"] = weights | dict(hparams.get("weights") or {})
    upgraded = io.BytesIO()
    torch.save(checkpoint, upgraded)
    upgraded.seek(0)
    return upgraded


def is_unreadable_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a local file that is not a complete zip archive (``torch.save``'s format): truncated or
    corrupted, as a run killed while writing it leaves it."""
    try:
        return Path(path).is_file() and not zipfile.is_zipfile(path)
    except (TypeError, OSError):
        return False


def check_finite_parameters(module: nn.Module) -> None:
    """Refuse to checkpoint a diverged model: raise :class:`~jemkit.DivergenceError` naming non-finite parameters."""
    bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise DivergenceError(f"refusing to write a checkpoint with non-finite parameters: {bad[:5]}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic saves for local paths (remote paths use Lightning's own writer).

    Example::

        >>> trainer = lightning.Trainer(plugins=[AtomicCheckpointIO()])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        fs = get_filesystem(path)
        if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
