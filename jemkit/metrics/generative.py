"""Generative quality of a JEM: FID and Inception Score (IS) of its samples, through torchmetrics.

The papers (JEM, JEM++, SADA-JEM) report FID and IS in Inception-v3 features, on samples drawn from the replay
buffer and from fresh chains. Inception needs ``torch-fidelity`` (``pip install "jemkit[fid]"``) and downloads its
weights once; its features only make sense for RGB-like images. ``feature="self"`` measures FID in the JEM's own
penultimate layer and IS on its own logits instead: offline, on any data shape, and comparable between runs of one
model family (not with the papers' Inception numbers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.utilities import imports as _tm_imports
from tqdm.auto import tqdm

from jemkit._config import import_path
from jemkit.checks import check_integer, check_names
from jemkit.classifier import OutputKey, sampling_context, select_logits
from jemkit.ood.features import FeatureHook
from jemkit.sampling.chains import SOURCES

if TYPE_CHECKING:
    from jemkit.module import JEM

__all__ = [
    "ClassifierLogits",
    "GenerativeMetrics",
    "GenerativeOptions",
    "PenultimateFeatures",
    "build_generative_metrics",
    "fid_score",
    "generative_metrics",
    "inception_images",
    "inception_score",
    "resolve_feature",
]

_INSTALL_HINT = 'feature="inception" needs torch-fidelity: pip install "jemkit[fid]" (or use feature="self", offline)'


class PenultimateFeatures(nn.Module):
    """A classifier's penultimate features: the input of its last ``nn.Linear`` (or of ``layer``), through
    :class:`jemkit.ood.features.FeatureHook`, the features the post-hoc OOD detectors read too.

    FID in this space needs no download and works on any input shape. The classifier runs in eval mode (BatchNorm's
    running statistics are used, never updated) without gradients, and every submodule's train flag comes back
    afterwards. The hook lives only for the duration of one forward, so training forwards keep no activations.

    Args:
        classifier: the network (for a JEM: ``jem.classifier``).
        layer: the layer whose input is the feature (pooled over positions when it has any); default the last
            ``nn.Linear`` (:func:`jemkit.ood.features.last_linear`).
        num_features: feature size; default ``layer.in_features`` (torchmetrics reads it instead of running a dummy
            299x299 image through the network).

    Example::

        >>> features = PenultimateFeatures(jem.classifier)
        >>> FrechetInceptionDistance(feature=features)
    """

    def __init__(self, classifier: nn.Module, layer: nn.Module | None = None, num_features: int | None = None) -> None:
        super().__init__()
        hook = FeatureHook(classifier, layer, capture="input")
        if num_features is None:
            num_features = getattr(hook.layer, "in_features", None)
            if not isinstance(num_features, int):
                raise ValueError(f"cannot tell the feature size of {type(hook.layer).__name__}: pass num_features=...")
        self.classifier = classifier
        self.__dict__["hook"] = hook  # not a second registration of the classifier's layer
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, ...] -> features [B, num_features]`` (float32)."""
        with torch.no_grad(), sampling_context(self.classifier, "eval"), self.hook:
            self.classifier(x)
            return self.hook.pop()


class ClassifierLogits(nn.Module):
    """A classifier's logits as IS features (``IS = exp E_x KL(p(y|x) || p(y))`` on its own softmax).

    Runs in eval mode without gradients and restores every train flag; logits come back as float32 (AMP may give
    half precision), divided by ``temperature`` (a JEM's ``p(y|x)`` is ``softmax(logits / T)``). For a
    :class:`jemkit.JEM`, ``jem(x)`` already is the logits.
    """

    def __init__(self, classifier: nn.Module, output_key: OutputKey = None, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.classifier = classifier
        self.output_key = output_key
        self.temperature = float(temperature)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad(), sampling_context(self.classifier, "eval"):
            logits = select_logits(self.classifier(x), self.output_key).float()
        return logits / self.temperature if self.temperature != 1.0 else logits


class _Flat(nn.Module):
    """A user's feature network run in eval mode without gradients, flattened to ``[B, D]``, with ``num_features``."""

    def __init__(self, net: nn.Module, num_features: int) -> None:
        super().__init__()
        self.net = net
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad(), sampling_context(self.net, "eval"):
            return self.net(x).flatten(1).float()


def _with_num_features(net: nn.Module, example: Tensor) -> nn.Module:
    """``net`` itself if it states ``num_features``, else wrapped with the size read from one example batch (so that
    torchmetrics never runs its 299x299 dummy image through a network made for other shapes)."""
    if isinstance(getattr(net, "num_features", None), (int, Tensor)):
        return net
    with torch.no_grad(), sampling_context(net, "eval"):
        num_features = net(example[:2]).flatten(1).shape[1]
    return _Flat(net, num_features)


def inception_images(x: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Images ``[B, 1 or 3, H, W]`` in ``value_range`` as the ``[0, 1]`` RGB floats torchmetrics' Inception takes
    with ``normalize=True`` (grey repeated to 3 channels; Inception resizes to 299x299 itself)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"Inception features need images [B, 1 or 3, H, W], got inputs of shape {tuple(x.shape)}: use "
            'feature="self" (the JEM\'s own features) or another feature network'
        )
    low, high = value_range
    x = ((x.float() - low) / (high - low)).clamp(0.0, 1.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _check_torch_fidelity() -> None:
    if not bool(_tm_imports._TORCH_FIDELITY_AVAILABLE):
        raise ModuleNotFoundError(_INSTALL_HINT)


@contextmanager
def _inception_weights() -> Iterator[None]:
    """Name the cause when building Inception fails on the weights download (offline machines)."""
    try:
        yield
    except (OSError, RuntimeError, ValueError) as err:
        raise RuntimeError(
            "could not load the Inception-v3 weights for FID/IS: torch-fidelity downloads them once (internet "
            "needed, then cached under the torch hub directory, ~/.cache/torch/hub/checkpoints). Download them on a "
            'machine with internet and copy the cache, or use feature="self" (the JEM\'s own features, offline). '
            f"Cause: {type(err).__name__}: {err}"
        ) from err


@dataclass
class GenerativeMetrics:
    """An FID and an IS metric (torchmetrics) with the input transform each expects.

    ``fid`` keeps its real features across :meth:`reset_fake` (``reset_real_features=False``), so the real data is
    encoded once and reused for every sample source. Both metrics hold torchmetrics states: under DDP their
    ``compute`` reduces over every rank (and every rank must call it).
    """

    feature: str
    is_feature: str
    fid: FrechetInceptionDistance
    inception_score: InceptionScore
    fid_input: Callable[[Tensor], Tensor]
    is_input: Callable[[Tensor], Tensor]

    def to(self, device: torch.device | str) -> GenerativeMetrics:
        self.fid.to(device)
        self.inception_score.to(device)
        return self

    @torch.no_grad()
    def update_real(self, x: Tensor) -> None:
        self.fid.update(self.fid_input(x), real=True)

    @torch.no_grad()
    def update_fake(self, x: Tensor) -> None:
        self.fid.update(self.fid_input(x), real=False)
        self.inception_score.update(self.is_input(x))

    def reset_fake(self) -> None:
        self.fid.reset()  # the real features stay
        self.inception_score.reset()

    def compute(self) -> dict[str, float]:
        """``{"fid", "is_mean", "is_std"}`` of the samples seen since the last :meth:`reset_fake`."""
        fid = float(self.fid.compute())
        is_mean, is_std = _compute_is(self.inception_score)
        return {"fid": fid, "is_mean": float(is_mean), "is_std": float(is_std)}


def _name(feature: str | nn.Module) -> str:
    return feature if isinstance(feature, str) else type(feature).__name__


def build_generative_metrics(
    jem: nn.Module,
    feature: str | nn.Module = "self",
    is_feature: str | nn.Module | None = None,
    splits: int = 10,
    example: Tensor | None = None,
    judge: nn.Module | None = None,
) -> GenerativeMetrics:
    """FID and IS metrics for ``jem``'s samples (see :func:`generative_metrics` for ``feature``, ``is_feature`` and
    ``judge``).

    ``example`` (a batch of inputs) gives the feature size of a user network without ``num_features``.
    """
    if judge is not None:  # a classifier that did not generate the samples judges them: its features and its softmax
        name = f"judge {type(getattr(judge, 'classifier', judge)).__name__}"
        net = PenultimateFeatures(getattr(judge, "classifier", judge))
        logits = ClassifierLogits(judge, temperature=float(getattr(judge, "temperature", 1.0)))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            score = InceptionScore(feature=logits, splits=splits)
        fid = FrechetInceptionDistance(feature=net, reset_real_features=False)
        return GenerativeMetrics(name, name, fid, score, _float, _float)
    if is_feature is None:
        is_feature = "inception" if isinstance(feature, str) and feature == "inception" else "self"
    for name, value in (("feature", feature), ("is_feature", is_feature)):
        if isinstance(value, str) and value not in ("self", "inception"):
            raise ValueError(f"{name} must be 'self', 'inception' or an nn.Module, got {value!r}")
        if not isinstance(value, (str, nn.Module)):
            raise TypeError(f"{name} must be 'self', 'inception' or an nn.Module, got {type(value).__name__}")
    if "inception" in (feature, is_feature):
        _check_torch_fidelity()

    if isinstance(feature, str) and feature == "inception":
        with _inception_weights():
            fid = FrechetInceptionDistance(feature=2048, reset_real_features=False, normalize=True)
        fid_input: Callable[[Tensor], Tensor] = inception_images
    else:
        if isinstance(feature, str):  # "self"
            net: nn.Module = PenultimateFeatures(getattr(jem, "classifier", jem))
        elif example is not None:
            net = _with_num_features(feature, example)
        else:
            net = feature
        fid = FrechetInceptionDistance(feature=net, reset_real_features=False)
        fid_input = _float

    with warnings.catch_warnings():  # "InceptionScore will save all extracted features": that is the point
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        if isinstance(is_feature, str) and is_feature == "inception":
            with _inception_weights():
                score = InceptionScore(splits=splits, normalize=True)
            is_input: Callable[[Tensor], Tensor] = inception_images
        else:
            temperature = float(getattr(jem, "temperature", 1.0))
            logits = ClassifierLogits(jem, temperature=temperature) if isinstance(is_feature, str) else is_feature
            score = InceptionScore(feature=logits, splits=splits)  # normalize=False: the inputs go in as they are
            is_input = _float
    return GenerativeMetrics(_name(feature), _name(is_feature), fid, score, fid_input, is_input)


def _float(x: Tensor) -> Tensor:
    return x.float()


def _inputs(batch: Any) -> Tensor:
    """The inputs of a ``(x, y, ...)`` batch, a dict batch, or a bare input tensor."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["x"] if "x" in batch else batch["image"]
    return batch[0]


@dataclass
class GenerativeOptions:
    """What FID and IS of a JEM's samples measure: in the report (``jemkit evaluate --generative.*``, off unless
    asked for) and in :class:`~jemkit.callbacks.GenerativeMonitor`, under the same names.

    Args:
        num_samples: samples drawn per source, and the cap on real inputs (FID is biased by the sample count:
            compare figures taken with the same count).
        sources: sample sources, some of ``buffer`` (the stored chains continued), ``fresh`` (new chains from the
            replay buffer's initial distribution) and ``init`` (that distribution itself: where sampling starts, the
            reference that shows how far it moved); see :meth:`jemkit.JEM.sample`.
        feature: FID features: ``self`` (the JEM's penultimate layer, offline), ``inception`` (needs
            ``jemkit[fid]``), or a dotted path ``module.attr`` to an nn.Module or a callable returning one.
        fresh_steps: steps of fresh chains (default: the JEM's policy, 5x the sampler's).
        judge: a classifier that did not generate the samples judges them, in place of ``feature``: FID in its
            penultimate features, IS on its softmax (an "in-domain" Inception score). A checkpoint path (a ``jemkit
            fit`` checkpoint, e.g. the plain classifier trained with ``weights={px: 0}``, or weights of the JEM's
            architecture) or a dotted path to an nn.Module classifier. FID and IS in the JEM's own features flatter it.
    """

    num_samples: int = 500
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    feature: str = "self"
    fresh_steps: int | None = None
    judge: str | None = None

    def check(self) -> None:
        check_integer("num_samples", self.num_samples, minimum=2)
        check_names("sample source(s)", self.sources, SOURCES, allow_empty=False)
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources must be distinct, got {list(self.sources)}")
        if self.fresh_steps is not None:
            check_integer("fresh_steps", self.fresh_steps, minimum=0)

    def steps(self, jem: Any, source: str) -> int:
        """Sampler steps for samples from ``source``: the JEM's policy (:meth:`jemkit.sampling.Chains.steps_for`),
        with :attr:`fresh_steps` for fresh chains when given."""
        return jem.chains.steps_for(source, self.fresh_steps if source == "fresh" else None)

    def metrics_arguments(self, jem: Any = None) -> dict[str, Any]:
        """The keyword arguments of :func:`generative_metrics` these options stand for (``jem`` gives the
        architecture a judge's weights are loaded into)."""
        return {
            "num_samples": self.num_samples,
            "sources": self.sources,
            "fresh_steps": self.fresh_steps,
            "feature": resolve_feature(self.feature),
            "judge": None if self.judge is None else resolve_judge(self.judge, jem),
        }


def generative_metrics(
    jem: JEM,
    real: Iterable[Any],
    num_samples: int = 1000,
    sources: Sequence[str] = SOURCES,
    fresh_steps: int | None = None,
    feature: str | nn.Module = "self",
    is_feature: str | nn.Module | None = None,
    batch_size: int = 100,
    splits: int = 10,
    progress: bool = False,
    judge: nn.Module | None = None,
    heldout: Iterable[Any] | None = None,
) -> dict[str, Any]:
    """FID and IS of ``num_samples`` samples per source against up to ``num_samples`` real inputs.

    Args:
        jem: a :class:`jemkit.JEM` (needs ``sample``, ``sampler``, ``device`` and, for ``"self"``, ``classifier``).
        real: the reference data: a ``DataLoader`` or any iterable of ``(x, y)`` batches (or bare inputs).
        num_samples: samples drawn per source, and the cap on real inputs (FID is biased by the sample count:
            compare numbers taken with the same count).
        sources: ``"buffer"`` (stored chains continued for the sampler's ``n_steps``, without random restarts; what
            JEM reports) and/or ``"fresh"`` (new chains from the initial distribution).
        fresh_steps: steps of fresh chains (default ``5 * jem.sampler.n_steps``).
        feature: FID feature space: ``"self"`` (the classifier's penultimate layer, offline, any shape),
            ``"inception"`` (Inception-v3 pool features, 2048-d, as in the papers; needs ``jemkit[fid]`` and the
            weights; images in ``[-1, 1]``) or an ``nn.Module`` mapping inputs to features.
        is_feature: IS classifier: ``"self"`` (the JEM's logits), ``"inception"``, or an ``nn.Module`` returning
            logits; default ``"inception"`` with ``feature="inception"``, else ``"self"``.
        batch_size: samples per sampler call.
        splits: IS splits (the mean and std are over splits; papers use 10).
        progress: show a progress bar per source.
        judge: a classifier (``forward -> logits``) that judges the samples in place of ``feature`` and
            ``is_feature``: FID in its penultimate features, IS on its softmax (:func:`resolve_judge` loads one).
        heldout: real inputs other than ``real`` (a validation split), measured like a source under the name
            ``"data"``: the floor that samples are compared with.

    Returns:
        ``{"feature", "is_feature", "num_real", <source>: {"num_samples", "steps", "fid", "is_mean", "is_std"}}``
        (``"data"`` for ``heldout``, with ``steps`` ``None``).

    Example::

        >>> section = generative_metrics(jem, datamodule.test_dataloader(), num_samples=1000)
        >>> print(format_generative(section))
    """
    options = GenerativeOptions(num_samples, list(sources), fresh_steps=fresh_steps)
    options.check()
    check_integer("batch_size", batch_size)
    check_integer("splits", splits)
    device = jem.device
    metrics: GenerativeMetrics | None = None
    num_real = 0
    with sampling_context(jem, "eval"):  # every submodule's own train flag comes back afterwards
        for batch in real:
            x = _inputs(batch)[: num_samples - num_real].to(device)
            if metrics is None:
                metrics = build_generative_metrics(jem, feature, is_feature, min(splits, num_samples), x, judge)
                metrics.to(device)
            metrics.update_real(x)
            num_real += len(x)
            if num_real >= num_samples:
                break
        if metrics is None or num_real < 2:
            raise ValueError(f"FID needs at least 2 real inputs, got {num_real}")
        result: dict[str, Any] = {"feature": metrics.feature, "is_feature": metrics.is_feature, "num_real": num_real}
        for source in sources:
            steps = options.steps(jem, source)
            metrics.reset_fake()
            with tqdm(total=num_samples, desc=f"samples ({source})", disable=not progress, leave=False) as bar:
                for start in range(0, num_samples, batch_size):
                    n = min(batch_size, num_samples - start)
                    metrics.update_fake(jem.sample(n, n_steps=steps, source=source))
                    bar.update(n)
            result[source] = {"num_samples": num_samples, "steps": steps, **metrics.compute()}
        if heldout is not None:
            metrics.reset_fake()
            count = 0
            for batch in heldout:
                x = _inputs(batch)[: num_samples - count].to(device)
                metrics.update_fake(x)
                count += len(x)
                if count >= num_samples:
                    break
            if count >= 2:
                result["data"] = {"num_samples": count, "steps": None, **metrics.compute()}
    return result


def _to_tensor_batches(data: Tensor | Iterable[Tensor], batch_size: int = 256) -> Iterable[Tensor]:
    return data.split(batch_size) if isinstance(data, Tensor) else data


def fid_score(real: Tensor | Iterable[Tensor], fake: Tensor | Iterable[Tensor], feature: nn.Module) -> float:
    """FID between two sets of inputs (tensors or iterables of input batches) in ``feature``'s space.

    For samples from any source (another generator, a saved buffer); a network without ``num_features`` gets its
    feature size from the first batch.
    """
    metric: FrechetInceptionDistance | None = None
    for is_real, data in ((True, real), (False, fake)):
        for x in _to_tensor_batches(data):
            if metric is None:
                metric = FrechetInceptionDistance(feature=_with_num_features(feature, x)).to(x.device)
            with torch.no_grad():
                metric.update(x.float(), real=is_real)
    if metric is None:
        raise ValueError("fid_score got no inputs")
    return float(metric.compute())


def inception_score(samples: Tensor | Iterable[Tensor], feature: nn.Module, splits: int = 10) -> tuple[float, float]:
    """``(mean, std)`` over ``splits`` of ``exp E_x KL(p(y|x) || p(y))`` with ``feature`` giving the logits."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=feature, splits=splits)
    for x in _to_tensor_batches(samples):
        metric.to(x.device)
        with torch.no_grad():
            metric.update(x.float())
    mean, std = _compute_is(metric)
    return float(mean), float(std)


def _compute_is(metric: InceptionScore) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` over splits.

    torchmetrics shuffles the samples into splits with the global RNG: a fixed seed here gives every DDP rank the
    same splits (so the same value) and leaves the training run's random stream untouched. The std of a single
    split is NaN, without torch's degrees-of-freedom warning.
    """
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.filterwarnings("ignore", message=".*degrees of freedom is <= 0.*")
        return metric.compute()


def resolve_judge(spec: str | nn.Module, jem: Any = None) -> nn.Module:
    """The classifier that ``spec`` names, to judge a JEM's samples: an ``nn.Module`` as it is; a file, loaded with
    :func:`jemkit.loading.load_classifier` (a ``jemkit fit`` checkpoint, or weights of ``jem``'s classifier
    architecture); else a dotted path ``module.attr`` to an nn.Module or a callable returning one."""
    if isinstance(spec, nn.Module):
        return spec
    if Path(spec).is_file():
        from jemkit.loading import load_classifier  # loads jemkit.module: only when a judge is read from a file

        return load_classifier(spec, jem, getattr(jem, "device", "cpu"))
    judge = resolve_feature(spec)
    if not isinstance(judge, nn.Module):
        raise ValueError(f"judge must be a checkpoint file or a dotted path to a classifier, got {spec!r}")
    return judge


def resolve_feature(spec: str | nn.Module) -> str | nn.Module:
    """``"self"``, ``"inception"``, an ``nn.Module``, or a dotted path ``module.attr`` to an ``nn.Module`` or to a
    callable returning one (called without arguments); what ``jemkit evaluate --generative.feature`` accepts."""
    if isinstance(spec, nn.Module) or spec in ("self", "inception"):
        return spec
    if "." not in spec.strip("."):
        raise ValueError(f"feature must be 'self', 'inception' or a dotted path module.attr, got {spec!r}")
    try:
        obj = import_path(spec)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"could not import the feature network {spec!r}: {err}") from err
    if not isinstance(obj, nn.Module) and callable(obj):
        obj = obj()
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{spec} gave a {type(obj).__name__}, expected an nn.Module (or a callable returning one)")
    return obj
