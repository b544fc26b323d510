"""What every post-hoc detector shares: the :class:`Detector` contract, the registry and the chunked scoring loop.

A detector reads a classifier's features and nothing else, so each one fits in a file of its own (as in
pytorch-ood) and :class:`~jemkit.ood.detectors.PostHocDetectors` only looks detectors up by name in
:data:`DETECTORS`; a new detector is a new file with a :func:`register`-decorated class, not a new branch elsewhere.

Scores follow jemkit's sign (:mod:`jemkit.ood.scores`): **higher = more in-distribution**, i.e. pytorch-ood's outlier
scores negated. Work on the features goes in row chunks so that ``[N, D]`` never has to be copied whole to the
device (pytorch-ood issues #9 and #93).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from jemkit.checks import check_integer

__all__ = [
    "DETECTORS",
    "CannotFitError",
    "Detector",
    "Head",
    "PytorchOODDetector",
    "chunks",
    "register",
    "score_in_chunks",
]

_DetectorClass = TypeVar("_DetectorClass", bound="type[Detector]")

DETECTORS: dict[str, type[Detector]] = {}
"""Every registered detector class by name, in registration order (the order scores and states are listed in)."""

_RESERVED = frozenset({"num_features", "classes", "skipped"})  # PostHocDetectors.state_dict's own keys


def register(name: str) -> Callable[[_DetectorClass], _DetectorClass]:
    """Class decorator adding a :class:`Detector` subclass to :data:`DETECTORS` as ``name`` (and setting its
    :attr:`Detector.name`). A name taken by another class, or one of ``PostHocDetectors.state_dict``'s own keys,
    is refused."""
    if not isinstance(name, str) or not name or name in _RESERVED:
        raise ValueError(f"a detector's name must be a non-empty string other than {sorted(_RESERVED)}, got {name!r}")

    def add(cls: _DetectorClass) -> _DetectorClass:
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise TypeError(f"register({name!r}) decorates a Detector subclass, got {cls!r}")
        taken = DETECTORS.get(name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"a post-hoc detector named {name!r} is already registered: {taken.__module__}.{taken.__qualname__}"
            )
        cls.name = name
        DETECTORS[name] = cls
        return cls

    return add


class CannotFitError(ValueError):
    """Raised by :meth:`Detector.fit` with the reason these features or this head cannot fit the detector.

    :class:`~jemkit.ood.detectors.PostHocDetectors` skips such a detector when it was requested by default and
    raises when it was named."""


@dataclass(frozen=True)
class Head:
    """The classifier's last linear layer: ``weight [C, D]`` and ``bias [C]`` (``None``: no bias).

    ``C = 1`` is a one-logit binary head (see :func:`jemkit.classifier.class_logits`)."""

    weight: Tensor
    bias: Tensor | None = None


def chunks(n: int, size: int) -> range:
    """The first row of every chunk of ``size`` rows among ``n``."""
    return range(0, n, size)


def score_in_chunks(outlier_score: Callable[[Tensor], Tensor], z: Tensor, chunk_size: int) -> Tensor:
    """``-outlier_score`` of features ``z [M, D]``, ``chunk_size`` rows at a time: float32 ``[M]`` on ``z``'s device.

    Each chunk is handed over detached and as float32, wherever ``z`` lives; the detector moves it if it must."""
    parts = []
    for start in chunks(z.shape[0], chunk_size):
        zc = z[start : start + chunk_size].detach().float()
        parts.append(-outlier_score(zc).float().to(z.device))
    return torch.cat(parts) if parts else torch.empty(0, device=z.device)


class Detector(ABC):
    """A post-hoc OOD detector on a classifier's features, scoring **higher for in-distribution** inputs.

    Args:
        chunk_size: rows per chunk while fitting and scoring: bounds the memory, never changes a score.
        device: where the fitted statistics live and scoring runs; default the device of the features given to
            :meth:`fit`.

    Subclasses implement :meth:`fit`, :meth:`score`, :meth:`state_dict` and :meth:`load_state_dict`, and are made
    available to :class:`~jemkit.ood.detectors.PostHocDetectors` with :func:`register`.
    """

    name: ClassVar[str] = ""
    """The name it is registered under (set by :func:`register`)."""
    title: ClassVar[str | None] = None
    """How error messages name it (default :attr:`name`)."""

    def __init__(self, chunk_size: int = 4096, device: torch.device | str | None = None) -> None:
        self.chunk_size = check_integer("chunk_size", chunk_size, 1)
        self.device = None if device is None else torch.device(device)

    @abstractmethod
    def fit(self, z: Tensor, y: Tensor, head: Head | None = None) -> Detector:
        """Fit on in-distribution training features ``z [N, D]`` (finite floats, any device) with class labels
        ``y [N]`` (integers ``>= 0``) and the classifier's last linear layer ``head`` where there is one.

        Raises:
            CannotFitError: the reason these features or this head cannot fit the detector.
        """

    @abstractmethod
    def score(self, z: Tensor) -> Tensor:
        """Scores ``[M]`` of features ``z [M, D]``, float32 on ``z``'s device, higher = more in-distribution."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The fitted state as plain tensors and numbers, for ``torch.save``."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> Detector:
        """Restore the fitted state from :meth:`state_dict`'s output (on :attr:`device` where one is set)."""

    @property
    def backend(self) -> Any:
        """The object that holds the fitted state and scores (what ``PostHocDetectors.detectors`` lists): pytorch-ood's
        detector for a detector that wraps one, the detector itself otherwise."""
        return self

    def _title(self) -> str:
        return self.title or self.name or type(self).__name__


class PytorchOODDetector(Detector):
    """A :class:`Detector` whose fitted state lives in one of pytorch-ood's feature detectors, :attr:`model`, whose
    ``predict_features`` scores (jemkit only fits it, in chunks, and flips the sign)."""

    def __init__(self, chunk_size: int = 4096, device: torch.device | str | None = None) -> None:
        super().__init__(chunk_size, device)
        self.model: Any = None

    @property
    def backend(self) -> Any:
        return self.model

    def score(self, z: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError(f"{self._title()} score called before fit")
        return score_in_chunks(self.model.predict_features, z, self.chunk_size)

    def _placed(self, model: Any) -> Any:
        """``model`` moved to :attr:`device` where one is set."""
        if self.device is not None:
            model.to(self.device)
        return model
