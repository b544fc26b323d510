"""Checkpoints: what a JEM records about itself, the checks on loading, and writing that never leaves a half-written
file behind.

Lightning's default writer streams straight into the target path: a process killed while saving (preemption, OOM,
a diverged run being stopped) can leave a truncated ``last.ckpt`` that then fails to resume. ``AtomicCheckpointIO``
writes to a temporary file in the same folder and renames it over the target (``os.replace`` is atomic on POSIX
and Windows), so the target is always either the old complete checkpoint or the new complete one.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn
from typing_extensions import override

from jemkit._version import __version__
from jemkit.classifier import sampling_context
from jemkit.divergence import DivergenceError

__all__ = [
    "AtomicCheckpointIO",
    "check_finite_parameters",
    "check_finite_state",
    "check_jemkit_section",
    "check_writable",
    "clean_stale_temporaries",
    "is_unreadable_checkpoint",
    "jemkit_section",
    "load_checkpoint_file",
    "load_with_clear_errors",
    "upgraded_checkpoint",
    "upgraded_hyper_parameters",
]

TRUST_HINT = "torch.load(path, weights_only=False)"
"""How a user who trusts a refused checkpoint loads it anyway, named in the error (callers name their own option)."""


def jemkit_section(classifier: nn.Module, num_classes: int | None, input_shape: tuple[int, ...] | None) -> dict:
    """What a JEM checkpoint records about the model, checked by :func:`check_jemkit_section` when it loads."""
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


def load_checkpoint_file(
    path: Any, map_location: Any = "cpu", weights_only: bool = True, trust_hint: str = TRUST_HINT
) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file, weights-only unless the caller trusts the file, with one-line errors.

    A file holding pickled Python objects besides tensors and plain containers (a model downloaded from somewhere can
    carry code that runs when it is unpickled) is refused by weights-only loading before anything in it runs; that
    refusal, and a truncated or corrupted file, become a ``ValueError`` naming the file, and for the first what to do
    if its source is trusted (``trust_hint``: how the caller's user passes ``weights_only=False``).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(_unloadable(path, err, trust_hint)) from err
    except (RuntimeError, EOFError) as err:
        if not is_unreadable_checkpoint(path):
            raise
        raise ValueError(_unloadable(path, err, trust_hint)) from err


def _unloadable(path: Any, err: BaseException, trust_hint: str) -> str:
    """Why ``path`` could not be loaded, in one line: truncated or corrupted, or refused as unsafe."""
    if is_unreadable_checkpoint(path):
        return f"{path} is truncated or corrupted: it cannot be read as a checkpoint"
    found = re.search(r"GLOBAL (\S+)", str(err))
    what = f" ({found.group(1)})" if found else ""
    return (
        f"{path} is unsafe to load: besides tensors it holds pickled Python objects{what} that could run code, so "
        f"weights-only loading refused it and nothing in it ran. If you trust its source, load it with {trust_hint}"
    )


def upgraded_hyper_parameters(hparams: dict[str, Any], legacy: dict[str, str]) -> dict[str, Any]:
    """``hparams`` with the arguments of an older jemkit renamed (``legacy``: old name -> key of the ``weights``
    dict): jemkit 0.1 recorded ``px_weight=0.1``, jemkit 0.2 records ``weights={"px": 0.1, ...}``."""
    hparams = dict(hparams)
    weights = {key: hparams.pop(old) for old, key in legacy.items() if old in hparams}
    if weights:
        hparams["weights"] = weights | dict(hparams.get("weights") or {})
    return hparams


def upgraded_checkpoint(path: Any, legacy: dict[str, str], weights_only: bool = True) -> io.BytesIO:
    """The checkpoint at ``path`` with its hyper-parameters upgraded (:func:`upgraded_hyper_parameters`), as an
    in-memory file for ``load_from_checkpoint``: LightningCLI rebuilds a module strictly from its recorded config, so a
    renamed argument would otherwise make the file unloadable."""
    checkpoint = load_checkpoint_file(path, "cpu", weights_only)
    checkpoint["hyper_parameters"] = upgraded_hyper_parameters(checkpoint.get("hyper_parameters", {}), legacy)
    upgraded = io.BytesIO()
    torch.save(checkpoint, upgraded)
    upgraded.seek(0)
    return upgraded


def load_with_clear_errors(load: Any, path: Any, legacy: dict[str, str], *args: Any, **kwargs: Any) -> Any:
    """``load(path, *args, **kwargs)`` (Lightning's ``load_from_checkpoint``) with errors that say what is wrong with
    the file (truncated, corrupted, unsafe to load: see :func:`load_checkpoint_file`); a checkpoint whose
    hyper-parameters use ``legacy`` names is renamed in memory and loaded."""
    trust_hint = "JEM.load_from_checkpoint(path, weights_only=False)"
    try:
        return load(path, *args, **kwargs)
    except pickle.UnpicklingError as err:
        raise ValueError(_unloadable(path, err, trust_hint)) from err
    except (RuntimeError, OSError, EOFError) as err:
        if not is_unreadable_checkpoint(path):
            raise
        raise ValueError(_unloadable(path, err, trust_hint)) from err
    except KeyError as err:
        raise ValueError(
            f"{path} is not a Lightning checkpoint of a JEM (missing key {err}); expected a file written by "
            "Trainer.fit / ModelCheckpoint or `jemkit fit`"
        ) from err
    except Exception as err:  # rebuilt strictly from its recorded CLI config, an older checkpoint names old arguments
        if not any(f"'{name}'" in str(err) for name in legacy):
            raise
        upgraded = upgraded_checkpoint(path, legacy, weights_only=kwargs.get("weights_only") is not False)
        return load(upgraded, *args, **kwargs)


def is_unreadable_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a local file that is not a complete zip archive (``torch.save``'s format): truncated or
    corrupted, as a run killed while writing it leaves it."""
    try:
        return Path(path).is_file() and not zipfile.is_zipfile(path)
    except (TypeError, OSError):
        return False


def check_finite_parameters(module: nn.Module, probe: Tensor | None = None) -> None:
    """Refuse to checkpoint a diverged model: raise :class:`~jemkit.DivergenceError` naming non-finite parameters,
    or, given a ``probe`` batch of inputs, when finite weights already give non-finite outputs (a step that blew the
    weights up has not been judged by a training step yet when its checkpoint is written)."""
    bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise DivergenceError(f"refusing to write a checkpoint with non-finite parameters: {bad[:5]}")
    if probe is not None:
        with torch.no_grad(), sampling_context(module, "eval"):
            output = module(probe)
        tensors = (
            output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else [output]
        )
        if not all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, Tensor)):
            raise DivergenceError(
                "refusing to write a checkpoint: the weights after the last optimiser step give non-finite outputs "
                "on training inputs (the run diverged); the previous checkpoint is kept"
            )


def check_finite_state(state_dict: dict[str, Any]) -> None:
    """Refuse to load weights with NaN/inf: ``ValueError`` naming the tensors (the replay buffer's chains are
    re-initialised instead, by the buffer itself)."""
    bad = [
        name
        for name, value in state_dict.items()
        if isinstance(value, Tensor)
        and value.is_floating_point()
        and not name.startswith("buffer.")
        and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise ValueError(
            f"the checkpoint holds non-finite (NaN/inf) weights in {bad[:5]}: it was written from a diverged run"
        )


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files (``.<name>.tmp-<pid>``) that saves of processes no longer alive left in ``folder``
    (a run killed during a save); returns them."""
    removed = []
    for tmp in folder.glob(".*.tmp-*") if folder.is_dir() else []:
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def check_writable(folder: Path) -> None:
    """Before the first step: the checkpoint folder can be created and written, else ``OSError`` naming it and why."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".jemkit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write checkpoints to {folder}: {_why(err)}") from err
    clean_stale_temporaries(folder)


def _why(err: BaseException) -> str:
    """The cause of a failed write in words: no space left, permission denied, or the system's own message."""
    code = getattr(err, "errno", None)
    text = str(err).lower()
    if code == errno.ENOSPC or "no space" in text or "unexpected pos" in text:
        return "no space left on the device"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "permission" in text or "not permitted" in text:
        return "permission denied (or a read-only file system)"
    return str(err)


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
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, tmp)
            os.replace(tmp, target)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its zip writer
            raise OSError(
                f"could not write the checkpoint {target}: {_why(err)}; the previous file there, if any, is kept"
            ) from err
        finally:
            tmp.unlink(missing_ok=True)
