"""``InputDomain``: where a classifier's inputs live, the one source of jemkit's ranges.

Langevin chains must start, move and stay where the data is. The samplers' defaults (a step of 0.2, a clamp to
``[-1, 1]``) only mean something relative to the data's scale, and a classifier's energy far outside the data is
whatever training left there. So the domain is fitted on the training data (or declared), and everything that needs a
range reads it: chains run in the domain's *unit coordinates* ``u = (x - center) / half_range``, in which the data's
box is ``[-1, 1]`` whatever the data's own units (pixels in ``[-1, 1]`` or ``[0, 1]``, ImageNet-normalised images,
standardised tabular features, raw signal amplitudes); the range check, the noise added to training data and the
synthetic OOD sets of the evaluation read the same object; checkpoints carry it.

The box is per feature for flat inputs ``[D]`` (tabular rows: features have their own units) and per channel
otherwise (an image's pixels, a signal's time steps share their channel's units).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from jemkit.checks import check_integer

__all__ = ["InputDomain", "domain_of"]

Granularity = Literal["auto", "global", "channel", "feature"]
_STATE = ("low", "high", "mean", "std")
_MIN_HALF_RANGE = 1e-6  # a constant feature still gets a box the chains can move in


class InputDomain(nn.Module):
    """A box ``[low, high]`` holding the data, with the data's mean and standard deviation, in the data's own units.

    Left undeclared (``InputDomain()``, a JEM's default), it is fitted on the first ``fit_batches`` training batches
    when training starts. Declared (``InputDomain(low=0, high=1)``), the box is fixed and the data is checked against
    it; the mean and standard deviation are still fitted when data is seen.

    Before it is fitted or declared it is the unit box ``[-1, 1]`` (jemkit's convention for images before the domain
    existed, so older checkpoints load and sample as they did).

    Args:
        low: lower bound of every input value, or ``None`` to fit it on data.
        high: upper bound, or ``None`` to fit it (declare both or neither).
        per: granularity of a fitted box: ``"feature"`` (one range per input value), ``"channel"`` (one per channel,
            dimension 1 of a batch), ``"global"`` or ``"auto"`` (``"feature"`` for flat inputs ``[D]``, else
            ``"channel"``).
        fit_batches: training batches a JEM's chains fit it on when training starts (:meth:`Chains.fit
            <jemkit.sampling.Chains.fit>`).

    Example::

        >>> domain = InputDomain().fit(torch.randn(500, 13) * 3 + 5)  # tabular rows, per-feature box
        >>> u = domain.to_unit(x)  # in [-1, 1] for data inside the box
    """

    low: Tensor | None
    high: Tensor | None
    mean: Tensor | None
    std: Tensor | None

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        per: Granularity = "auto",
        fit_batches: int = 50,
    ) -> None:
        super().__init__()
        if (low is None) != (high is None):
            raise ValueError(f"declare both low and high of an InputDomain, or neither; got low={low}, high={high}")
        if low is not None and not float(high) > float(low):
            raise ValueError(f"InputDomain needs low < high, got low={low!r}, high={high!r}")
        if per not in ("auto", "global", "channel", "feature"):
            raise ValueError(f"per must be 'auto', 'global', 'channel' or 'feature', got {per!r}")
        check_integer("fit_batches", fit_batches)
        self.declared = None if low is None else (float(low), float(high))
        self.per = per
        self.fit_batches = fit_batches
        # Plain tensors with hand-written state-dict hooks (below): their shape is only known once data is seen,
        # and checkpoints written before the domain existed have none of them.
        self.low = self.high = self.mean = self.std = None
        self._map_cache: tuple[tuple[Any, ...], tuple[Tensor, Tensor, bool]] | None = None  # see _unit_map
        if self.declared is not None:
            self.low, self.high = torch.tensor(self.declared[0]), torch.tensor(self.declared[1])

    def init_args(self) -> dict[str, Any]:
        low, high = self.declared if self.declared is not None else (None, None)
        return {"low": low, "high": high, "per": self.per, "fit_batches": self.fit_batches}

    # ------------------------------------------------------------------ fitting
    @property
    def is_fitted(self) -> bool:
        """Whether the data's statistics are known (always true of the box of a declared domain)."""
        return self.mean is not None

    def granularity(self, input_shape: Sequence[int]) -> str:
        """``"feature"``, ``"channel"`` or ``"global"`` for inputs of ``input_shape`` (one sample, no batch)."""
        if self.per != "auto":
            return self.per
        return "feature" if len(input_shape) == 1 else "channel"

    @torch.no_grad()
    def fit(self, x: Tensor) -> InputDomain:
        """Fit the box (unless declared), mean and standard deviation on inputs ``x [N, *shape]``."""
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"InputDomain.fit needs a batch [N, *shape] with N >= 1, got shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("InputDomain.fit got NaN or inf inputs: clean the data")
        x = x.float()
        dims = self._reduce_dims(x)
        keep = {"dim": dims, "keepdim": True}
        self.mean, self.std = x.mean(**keep)[0], x.std(**keep, correction=0)[0].clamp_min(_MIN_HALF_RANGE)
        if self.declared is None:
            self.low, self.high = x.amin(**keep)[0], x.amax(**keep)[0]
        elif self.outside_fraction(x) > 0:
            low, high = float(x.min()), float(x.max())
            warnings.warn(
                f"training inputs lie in [{low:.4g}, {high:.4g}] but the declared "
                f"InputDomain(low={self.declared[0]:g}, high={self.declared[1]:g}) keeps the chains inside it: "
                f"leave domain unset to fit it on the data, or declare InputDomain(low={low:.4g}, high={high:.4g})",
                UserWarning,
                stacklevel=2,
            )
        return self

    def _reduce_dims(self, x: Tensor) -> tuple[int, ...]:
        per = self.granularity(x.shape[1:])
        if per == "feature":
            return (0,)
        if per == "channel" and x.dim() > 2:
            return (0, *range(2, x.dim()))
        return tuple(range(x.dim()))

    # ------------------------------------------------------------------ coordinates
    def _box(self, like: Tensor) -> tuple[Tensor, Tensor]:
        if self.low is None:
            return torch.tensor(-1.0, device=like.device), torch.tensor(1.0, device=like.device)
        return self.low.to(like.device), self.high.to(like.device)

    def center_and_scale(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The box's center and half range, on ``like``'s device, broadcastable to one sample's shape."""
        low, high = self._box(like)
        return (low + high) / 2, ((high - low) / 2).clamp_min(_MIN_HALF_RANGE)

    def _unit_map(self, like: Tensor) -> tuple[Tensor, Tensor, bool]:
        """``(center, scale, identity)`` on ``like``'s device and dtype; ``identity`` when the box is ``[-1, 1]``.

        Every sampler step maps its chains through the domain, so the map is computed once per device, dtype and
        box (a box replaced or changed in place is seen by its tensors' identity and version counters) rather than in
        six small operations per call. Values are those :meth:`center_and_scale` gives, converted as before, so the
        maps are bit for bit what they were. Nothing computed in inference mode is kept: it could not be saved for a
        later backward.
        """
        try:
            versions = None if self.low is None else (self.low._version, self.high._version)
        except RuntimeError:  # inference tensors have no version counter: compute afresh
            versions = False
        key = (self.low, self.high, versions, like.device, like.dtype)
        cached = self.__dict__.get("_map_cache")  # absent from InputDomains pickled by earlier versions
        if cached is not None and cached[0][0] is key[0] and cached[0][1] is key[1] and cached[0][2:] == key[2:]:
            return cached[1]
        center, scale = self.center_and_scale(like)
        center, scale = center.to(like.dtype), scale.to(like.dtype)
        identity = bool((center == 0).all()) and bool((scale == 1).all())  # once per box: a host read
        if versions is not False and not torch.is_inference_mode_enabled():
            self._map_cache = (key, (center, scale, identity))
        return center, scale, identity

    def to_unit(self, x: Tensor) -> Tensor:
        """Data units -> unit coordinates, where the box is ``[-1, 1]`` (``x`` itself when the box is ``[-1, 1]``)."""
        center, scale, identity = self._unit_map(x)
        return x if identity else (x - center) / scale

    def from_unit(self, u: Tensor) -> Tensor:
        """Unit coordinates -> data units (``u`` itself when the box is ``[-1, 1]``)."""
        center, scale, identity = self._unit_map(u)
        return u if identity else u * scale + center

    def scale_like(self, x: Tensor) -> Tensor:
        """The half range, broadcastable to ``x [B, *shape]``: the unit in which noise and steps are measured."""
        return self._unit_map(x)[1]

    # ------------------------------------------------------------------ checks and synthetic data
    def bounds(self) -> tuple[float, float]:
        """The box's overall lowest and highest value (for messages and plots)."""
        low, high = self._box(torch.empty(0))
        return float(low.min()), float(high.max())

    def outside_fraction(self, x: Tensor, margin: float = 0.1) -> float:
        """Fraction of the values of ``x [B, *shape]`` more than ``margin`` half-ranges outside the box."""
        return float((self.to_unit(x.float()).abs() > 1 + margin).float().mean())

    def uniform(self, n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """``n`` inputs drawn uniformly from the box: ``[n, *shape]``."""
        u = torch.rand((n, *shape), generator=generator) * 2 - 1
        return self.from_unit(u)

    def gaussian(self, n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """``n`` inputs from independent Gaussians with the data's mean and std, clamped into the box."""
        z = torch.randn((n, *shape), generator=generator)
        if self.mean is None:
            return self.from_unit((z * 0.5).clamp(-1, 1))
        low, high = self._box(z)
        return (z * self.std + self.mean).clamp(low.expand(shape), high.expand(shape))

    # ------------------------------------------------------------------ checkpoints
    def _apply(self, fn: Any, recurse: bool = True) -> InputDomain:
        super()._apply(fn, recurse)
        for name in _STATE:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_fitted:
            for name in _STATE:
                destination[prefix + name] = getattr(self, name).detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint without a domain (written before it existed, or before the domain was fitted) leaves it as is.
        stored = {name: state_dict.pop(prefix + name, None) for name in _STATE}
        if all(value is not None for value in stored.values()):
            for name, value in stored.items():
                setattr(self, name, value.detach().float().clone())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        if self.low is None:
            return f"per={self.per!r}, unfitted (unit box [-1, 1])"
        low, high = self.bounds()
        kind = "declared" if self.declared is not None else "fitted"
        return f"per={self.per!r}, {kind} box within [{low:.4g}, {high:.4g}]"


def domain_of(model: Any) -> InputDomain:
    """The model's input domain (a JEM's ``domain``), else an undeclared one: the unit box ``[-1, 1]``, jemkit's
    convention for a model that never saw data (the one place that fallback is written)."""
    domain = getattr(model, "domain", None)
    return domain if isinstance(domain, InputDomain) else InputDomain()
