"""Load an already-trained classifier's weights, from Python or from a recipe, before wrapping it as a JEM.

``with_weights(classifier, path)`` reads a plain ``state_dict`` file, a Lightning checkpoint of a JEM (weights under
``classifier.``) or of any LightningModule whose classifier sits under one prefix (e.g. ``model.``), and says what did
not fit instead of loading half a model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["classifier_state_dict", "with_weights"]


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def classifier_state_dict(path: str | Path, expected_keys: set[str], prefix: str | None = None) -> dict:
    """The classifier's weights in the file at ``path``: a ``state_dict`` or a checkpoint with one under
    ``"state_dict"``; ``prefix`` (default: found by matching ``expected_keys``, e.g. ``"classifier."``) is removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle of arbitrary objects, not a torch file at all
        raise ValueError(f"cannot read weights from {path} ({type(err).__name__}: {err})") from err
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state_dict of tensors (got {type(loaded).__name__})")
    if prefix is not None:
        return _strip(state, prefix)
    if expected_keys <= set(state):
        return state
    for candidate in ("classifier.", "model.", "net.", "module."):  # a JEM's, then common LightningModule names
        stripped = _strip(state, candidate)
        if stripped and expected_keys <= set(stripped):
            return stripped
    return state  # let load_state_dict name the missing and unexpected keys


def with_weights(classifier: nn.Module, path: str, prefix: str | None = None, strict: bool = True) -> nn.Module:
    """``classifier`` with the weights stored at ``path`` (see :func:`classifier_state_dict`); returns it.

    Usable as a ``class_path`` in YAML, around any classifier config::

        classifier:
          class_path: jemkit.models.with_weights
          init_args:
            classifier: {class_path: jemkit.models.SmallCNN, init_args: {num_classes: 10, in_channels: 1}}
            path: runs/digits_plain/checkpoints/last.ckpt
    """
    expected = set(classifier.state_dict())
    state = classifier_state_dict(path, expected, prefix)
    missing, unexpected = expected - set(state), set(state) - expected
    if strict and (missing or unexpected):
        raise ValueError(
            f"the weights in {path} do not fit {type(classifier).__name__}: missing {sorted(missing)[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (pass prefix= if the weights sit under another name)"
        )
    try:
        classifier.load_state_dict(state, strict=strict)
    except RuntimeError as err:  # shapes differ: e.g. another number of classes
        raise ValueError(f"the weights in {path} do not fit {type(classifier).__name__}: {err}") from err
    return classifier
