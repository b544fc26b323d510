"""A classifier's features: what the post-hoc detectors (:mod:`jemkit.ood.detectors`) and feature-space metrics
read.

By default the feature of an input is what the classifier's **last linear layer** receives, ``z`` in
``logits = W z + b``: the space where Mahalanobis, KNN and ViM were proposed, and the one in which ViM's ``W, b`` act.
A forward hook captures it during an ordinary forward, so one forward gives both the logits and the features, and the
classifier's code is never touched (torchvision's ``fc``, timm's ``get_classifier()``, an MLP's or a Conv1d net's
head alike). A named module (``layer="layer4"``) gives its *output* instead; feature maps ``[B, C, *spatial]`` are
averaged over their positions to ``[B, C]``.

Example::

    >>> hook = FeatureHook(classifier)
    >>> with hook:
    ...     logits = classifier(x)
    >>> z = hook.pop()  # [B, D] float32
    >>> z_train, y_train = extract_features(classifier, train_loader)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from jemkit.batches import unpack_batch
from jemkit.checks import check_integer
from jemkit.classifier import sampling_context

__all__ = ["FeatureHook", "extract_features", "last_linear", "pool_features", "resolve_layer"]

Capture = Literal["input", "output"]


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The linear layer that gives ``model``'s logits, or ``None`` when it has none.

    A timm model names it (``get_classifier()``); otherwise it is the last ``nn.Linear`` registered in
    ``model.modules()``, which is the head of torchvision's classifiers (``fc``, ``classifier[-1]``, ``heads.head``),
    of jemkit's models (``head``) and of ordinary hand-written nets (the head is defined last). :class:`FeatureHook`
    checks at the first forward that the layer ran.
    """
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except (AttributeError, NotImplementedError, TypeError):
            head = None
        if isinstance(head, nn.Linear):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def resolve_layer(model: nn.Module, layer: str | nn.Module | None = None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the layer to read features at: ``layer`` named (``"layer4"``, ``"features.3"``), given as
    a submodule, or by default the last linear layer (:func:`last_linear`).

    Raises:
        ValueError: the model has no such submodule, or (default) no linear layer: the message says what was looked
            for and how to name a layer instead.
    """
    names = {id(m): name for name, m in model.named_modules()}
    if layer is None:
        head = last_linear(model)
        if head is None:
            candidates = [name for name, m in model.named_children()]
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear layer (looked for timm's get_classifier() and any nn.Linear "
                "in model.modules()), so there is no last linear layer whose input is the feature: name the layer "
                f"whose output is the feature, e.g. layer={candidates[-1]!r} (top-level submodules: {candidates})"
                if candidates
                else f"{type(model).__name__} has no submodules to read features from (no nn.Linear layer)"
            )
        return names[id(head)], head
    if isinstance(layer, str):
        try:
            module = model.get_submodule(layer)
        except AttributeError as err:
            available = [name for name, _ in model.named_modules() if name][:20]
            raise ValueError(
                f"{type(model).__name__} has no submodule {layer!r}; some of its submodules: {available}"
            ) from err
        return layer, module
    if isinstance(layer, nn.Module):
        if id(layer) not in names:
            raise ValueError(f"layer {type(layer).__name__} is not a submodule of {type(model).__name__}")
        return names[id(layer)], layer
    raise TypeError(f"layer must be None, a submodule name or an nn.Module, got {type(layer).__name__}")


def pool_features(t: Tensor, channels_last: bool = False) -> Tensor:
    """Features ``[B, D]`` from a layer's tensor: ``[B, D]`` as it is; ``[B, C, *spatial]`` (a conv layer's output,
    channels first) averaged over its positions to ``[B, C]``; with ``channels_last`` (what a linear layer receives:
    ``[B, T, D]`` tokens) averaged over the middle dimensions to ``[B, D]``."""
    if not isinstance(t, Tensor):
        raise TypeError(
            f"the feature layer gave a {type(t).__name__}, expected a Tensor: name a layer that returns one tensor"
        )
    if t.dim() == 1:
        return t.unsqueeze(1)
    if t.dim() == 2:
        return t
    if channels_last:
        return t.flatten(1, -2).mean(1)
    return t.flatten(2).mean(2)


class FeatureHook:
    """Captures a classifier's features ``[B, D]`` during its ordinary forwards.

    Use it as a context manager around forwards (the hook lives only inside, so training forwards keep no
    activations), then :meth:`pop` the features of the last forward. One forward gives both the logits and the
    features, which is what a scoring loop wants.

    Args:
        model: the classifier (or a module that calls it, e.g. a :class:`jemkit.JEM`).
        layer: ``None`` (default): the input of the last linear layer (:func:`last_linear`); a submodule name or
            module: that layer.
        capture: ``"input"`` or ``"output"`` of the layer; default ``"input"`` for the last linear layer and
            ``"output"`` for a named layer.
        detach: detach the captured features from the graph (default); ``False`` keeps them differentiable.

    Raises:
        ValueError: no such layer, or no linear layer (see :func:`resolve_layer`).

    Example::

        >>> hook = FeatureHook(resnet)  # resnet.fc's input, [B, 512]
        >>> with hook, torch.no_grad():
        ...     logits = resnet(x)
        >>> z = hook.pop()
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        capture: Capture | None = None,
        detach: bool = True,
    ) -> None:
        if capture is None:
            capture = "input" if layer is None else "output"
        if capture not in ("input", "output"):
            raise ValueError(f"capture must be 'input' or 'output', got {capture!r}")
        self.model = model
        self.layer_name, self.layer = resolve_layer(model, layer)
        self.capture: Capture = capture
        self.detach = detach
        self._captured: Tensor | None = None
        self._handle: RemovableHandle | None = None

    @property
    def num_features(self) -> int | None:
        """``D`` when it can be told without a forward (the input of a linear layer), else ``None``."""
        if self.capture == "input" and isinstance(self.layer, nn.Linear):
            return self.layer.in_features
        if self.capture == "output" and isinstance(self.layer, nn.Linear):
            return self.layer.out_features
        return None

    def _keep(self, t: Any) -> None:
        # A linear layer's inputs and outputs are channels-last ([B, T, D] tokens); other layers' are channels-first.
        channels_last = isinstance(self.layer, nn.Linear)
        z = pool_features(t, channels_last=channels_last)
        self._captured = (z.detach() if self.detach else z).float()

    def __enter__(self) -> FeatureHook:
        if self._handle is not None:
            raise RuntimeError("FeatureHook is already active: it cannot be entered twice")
        self._captured = None
        if self.capture == "input":
            self._handle = self.layer.register_forward_pre_hook(lambda _m, args: self._keep(args[0]))
        else:
            self._handle = self.layer.register_forward_hook(lambda _m, _args, out: self._keep(out))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def pop(self) -> Tensor:
        """The features ``[B, D]`` (float32) of the last forward since the previous ``pop``.

        Raises:
            RuntimeError: the layer did not run (the model does not call it in ``forward``).
        """
        if self._captured is None:
            raise RuntimeError(
                f"layer {self.layer_name!r} ({type(self.layer).__name__}) did not run during the forward of "
                f"{type(self.model).__name__}: name the layer whose output is the feature with layer=..."
            )
        z, self._captured = self._captured, None
        return z


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    layer: str | nn.Module | None = None,
    device: torch.device | str | None = None,
    max_samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Features and labels of every labelled batch of ``loader``: ``(z [N, D], y [N])`` on the CPU, ``z`` float32,
    ``y`` int64 (0/1 floats of a binary head become integers).

    The model runs in eval mode (BatchNorm's running statistics, no Dropout) without gradients; every submodule's
    train flag comes back afterwards. Features go to the CPU batch by batch, so the device holds one batch at a time.

    Args:
        model: the classifier.
        loader: ``(x, y, ...)`` batches, or dicts with ``x``/``y`` keys.
        layer: see :class:`FeatureHook`.
        device: where the model runs; default the device of its first parameter (CPU without parameters).
        max_samples: stop after this many inputs (the first ``max_samples`` in loader order).
    """
    if max_samples is not None:
        check_integer("max_samples", max_samples, 1)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    hook = FeatureHook(model, layer)
    zs: list[Tensor] = []
    ys: list[Tensor] = []
    seen = 0
    with sampling_context(model, "eval"), hook:
        for batch in loader:
            x, y = unpack_batch(batch)
            model(x.to(device))
            z = hook.pop()
            if z.shape[0] != x.shape[0]:
                raise ValueError(
                    f"layer {hook.layer_name!r} gave {z.shape[0]} feature rows for a batch of {x.shape[0]} inputs"
                )
            zs.append(z.cpu())
            ys.append(y.cpu().long())
            seen += x.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    if not zs:
        raise ValueError("the loader gave no batches to extract features from")
    z_all, y_all = torch.cat(zs), torch.cat(ys)
    if max_samples is not None:
        z_all, y_all = z_all[:max_samples], y_all[:max_samples]
    return z_all, y_all
