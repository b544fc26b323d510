"""How jemkit reads a user's classifier, never editing it: which output is the logits (a one-logit binary head read
as two), and how the layers whose behaviour depends on train/eval mode (BatchNorm, Dropout) behave while sampling.
Small named adapters, in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

__all__ = [
    "OutputKey",
    "SamplingMode",
    "can_share_forward",
    "class_logits",
    "has_batchnorm",
    "is_mode_sensitive",
    "resolve_sampling_mode",
    "restored_modes",
    "sampling_context",
    "select_logits",
]

SamplingMode = Literal["eval", "train"]
OutputKey = str | int | Callable[[Any], Tensor] | None


def select_logits(output: Any, output_key: OutputKey = None) -> Tensor:
    """Pick the logits out of a classifier's output.

    ``output_key`` is ``None`` (the output is the logits), a key of a dict-like output (e.g. ``"logits"``), an index
    into a tuple/list output (e.g. ``0`` for models with auxiliary heads), or a callable ``output -> logits``.
    """
    if callable(output_key):
        logits = output_key(output)
    elif output_key is None:
        logits = output
    else:
        try:
            logits = output[output_key]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(
                f"could not read output_key={output_key!r} from the classifier output of type {type(output).__name__}"
            ) from err
    if not isinstance(logits, Tensor):
        hint = ""
        if isinstance(output, dict):
            hint = f"; it returned a dict with keys {list(output)}: pass output_key=<the logits key>"
        elif isinstance(output, (tuple, list)):
            hint = f"; it returned a {type(output).__name__} of {len(output)}: pass output_key=<index of the logits>"
        raise TypeError(
            f"expected the classifier to return a Tensor of logits [B, C], got {type(logits).__name__}{hint}"
        )
    return class_logits(logits)


def class_logits(logits: Tensor) -> Tensor:
    """Logits ``[B, C]``; a one-logit binary head ``g(x)`` (``[B]`` or ``[B, 1]``, trained with a sigmoid) is read as
    the two logits ``[-g(x) / 2, g(x) / 2]``: the binary energy ``E(x, y) = -s g(x) / 2`` with ``s = -1, +1`` for
    the classes 0 and 1. Its softmax is the head's own sigmoid, and both classes get a density: with the logits
    ``[0, g(x)]`` (the same classifier), ``E(x, 0) = 0`` everywhere and class 0 could never be more likely than
    anything else."""
    if logits.dim() == 1:
        logits = logits.unsqueeze(1)
    if logits.dim() == 2 and logits.shape[1] == 1:
        half = logits / 2
        return torch.cat([-half, half], dim=1)
    return logits


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any layer normalises with batch statistics in train mode (BatchNorm, SyncBatchNorm)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def resolve_sampling_mode(mode: str, module: nn.Module) -> SamplingMode:
    """``"auto"``: ``"train"`` for classifiers with BatchNorm, ``"eval"`` otherwise.

    On a BatchNorm classifier eval-mode sampling costs test accuracy (figures: ``benchmarks/RESULTS.md``,
    "BatchNorm"): the eval-mode p(x) term trains a function (running statistics) that the cross-entropy never sees,
    and the two drift apart. Without BatchNorm, eval mode keeps Dropout out of the energy.
    """
    if mode == "auto":
        return "train" if has_batchnorm(module) else "eval"
    if mode not in ("eval", "train"):
        raise ValueError(f"sampling_mode must be 'auto', 'eval' or 'train', got {mode!r}")
    return mode  # type: ignore[return-value]


def is_mode_sensitive(module: nn.Module) -> bool:
    """Whether train and eval mode compute different functions (BatchNorm or Dropout present)."""
    return any(isinstance(m, (_BatchNorm, _DropoutNd)) for m in module.modules())


def can_share_forward(module: nn.Module, mode: SamplingMode) -> bool:
    """Whether the training forward of the data (train mode, for the classification term) also gives the energies of
    the generative contrast: only when the classifier computes the same function in the sampling mode (no BatchNorm;
    no Dropout either when sampling in eval mode)."""
    return not (is_mode_sensitive(module) if mode == "eval" else has_batchnorm(module))


@contextmanager
def restored_modes(module: nn.Module) -> Iterator[None]:
    """Every submodule's train flag and BatchNorm's ``track_running_stats`` come back as they were on exit; the
    flags are set back, nothing is copied in place, so graphs built inside stay valid."""
    flags = [(m, m.training, getattr(m, "track_running_stats", None)) for m in module.modules()]
    try:
        yield
    finally:
        for m, training, tracks in flags:
            m.training = training
            if tracks is not None:
                m.track_running_stats = tracks


@contextmanager
def sampling_context(module: nn.Module, mode: SamplingMode = "eval") -> Iterator[None]:
    """Run the classifier as the sampler should see it, and leave it exactly as it was.

    - ``"eval"`` (default): eval mode, so BatchNorm uses its running statistics (each sample's energy does not
      depend on the rest of the batch) and Dropout is off; every submodule's own train flag is restored afterwards.
    - ``"train"``: keep train mode (BatchNorm normalises with the statistics of the batch it is given, as the JEM
      reference code does) but stop BatchNorm layers from tracking running statistics, so that samples never leak
      into them. Nothing is copied back in place afterwards, so a graph built inside the context stays valid for its
      backward pass (the running statistics are inputs that BatchNorm's backward checks).
    """
    with restored_modes(module):
        if mode == "eval":
            module.eval()
        else:
            for m in module.modules():
                if isinstance(m, _BatchNorm):
                    m.track_running_stats = False  # batch statistics, and no update of the running ones
        yield
