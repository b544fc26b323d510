"""Loading what an evaluation needs from files: a JEM checkpoint, the datamodule it recorded, and a classifier of the
same architecture (the plain classifier a JEM is compared with, or the one that judges its samples). Used by
``jemkit evaluate``, the generative metrics and anyone evaluating from Python."""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import instantiate_module
from torch import Tensor, nn

from jemkit.checkpoint import load_checkpoint_file
from jemkit.classifier import OutputKey, select_logits
from jemkit.module import JEM

__all__ = ["TRUST_OPTION", "PlainClassifier", "load_classifier", "load_datamodule", "load_jem"]

TRUST_OPTION = "--weights_only false"
"""The command line's option for loading a checkpoint that carries pickled code, named in refusals."""


def load_jem(path: str, device: str = "cpu", weights_only: bool = True) -> JEM:
    """Load a JEM checkpoint with errors that say what is wrong with the file (weights-only unless trusted)."""
    try:
        return JEM.load_from_checkpoint(path, map_location=device, weights_only=weights_only)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint not found: {path}") from err
    except TypeError as err:
        if "classifier" not in str(err):
            raise
        raise ValueError(
            f"{path} holds no classifier config (the JEM was built in Python, not by `jemkit fit`): load it with "
            "JEM.load_from_checkpoint(path, classifier=...) and call jemkit.evaluate.evaluate(jem, datamodule, out)"
        ) from err


def load_datamodule(path: str, data: Any = None, weights_only: bool = True) -> LightningDataModule:
    """The datamodule given on the command line, else the one recorded in the checkpoint by LightningCLI."""
    if data is not None:
        return data
    checkpoint = load_checkpoint_file(path, "cpu", weights_only, trust_hint=TRUST_OPTION)
    hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if "_class_path" not in hparams:
        raise ValueError(
            f"{path} records no datamodule: pass one with --data (e.g. --data jemkit.data.DigitsDataModule)"
        )
    return instantiate_module(LightningDataModule, hparams)


class PlainClassifier(nn.Module):
    """A classifier as the evaluation reads a model: logits (``output_key`` selects them from a tuple or dict;
    a one-logit head becomes two logits as in a JEM), ``device``, temperature 1."""

    temperature = 1.0

    def __init__(self, classifier: nn.Module, output_key: OutputKey = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.output_key = output_key

    @property
    def device(self) -> torch.device:
        first = next(self.classifier.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def forward(self, x: Tensor) -> Tensor:
        return select_logits(self.classifier(x), self.output_key)


def load_classifier(path: str, jem: JEM | None, device: str | torch.device = "cpu") -> nn.Module:
    """The classifier in the file at ``path``: a checkpoint of ``jemkit fit`` (any JEM, e.g. the plain classifier
    trained with ``weights={px: 0}``), or the weights of the JEM's own classifier architecture (a ``state_dict``, or a
    checkpoint holding one) as a :class:`PlainClassifier`. Both give logits from ``forward`` and hold the network in
    ``classifier``."""
    from jemkit.models import with_weights  # the models package is loaded only for weights alone

    try:
        return load_jem(path, str(device))
    except (ValueError, KeyError, TypeError) as err:
        if jem is None:
            raise ValueError(
                f"{path} is not a `jemkit fit` checkpoint ({err}); weights alone need the JEM whose classifier "
                "architecture they fit"
            ) from err
        # not a jemkit fit checkpoint with a classifier config: a state_dict for the JEM's architecture
    classifier = with_weights(copy.deepcopy(jem.classifier), path)
    return PlainClassifier(classifier, getattr(jem, "output_key", None)).to(device)
