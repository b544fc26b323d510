"""The persistent replay buffer of SGLD chains (Du & Mordatch 2019; JEM).

Short-run SGLD from noise gives poor samples; continuing chains across training steps gives good ones. The buffer
stores the chains' last states on the module's device, hands out a batch of start points (a fraction re-initialised
from the initial distribution so that the buffer never collapses) and takes back the refined samples. It is an
``nn.Module`` whose chains are plain tensors, not registered buffers (DDP would overwrite each rank's shard; see
``__init__``); its ``_save_to_state_dict`` / ``_load_from_state_dict`` and ``_apply`` carry them into Lightning
checkpoints and move them with ``.to(device)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from jemkit.checks import check_integer
from jemkit.energy import check_labels
from jemkit.sampling.init import InitialDistribution, UniformInit

__all__ = ["STORAGES", "ReplayBuffer"]

Storage = Literal["float32", "bf16", "uint8"]
STORAGES: dict[str, torch.dtype] = {"float32": torch.float32, "bf16": torch.bfloat16, "uint8": torch.uint8}
"""Storage name -> dtype of the stored chains (``float32`` follows the module's floating dtype, e.g. under
``.double()``; the compact ones keep theirs)."""
_UINT8_LEVELS = 254  # codes 0..254 across [-1, 1]: steps of 2 / 254, with the centre 0 at code 127


def encode(u: Tensor, dtype: torch.dtype, stochastic: bool = True) -> Tensor:
    """Chains ``u`` (unit coordinates, float) in a storage ``dtype``; compact dtypes round stochastically, so that a
    chain moving less than a rounding step per draw still moves on average.

    ``uint8`` covers the box ``[-1, 1]``: values outside are clamped into it and NaN is stored at the centre
    (a byte cannot hold it). ``bfloat16`` keeps the float32 range, infinities and NaN.
    """
    if dtype == torch.uint8:
        scaled = (torch.nan_to_num(u.float(), nan=0.0).clamp(-1.0, 1.0) + 1.0) * (_UINT8_LEVELS / 2)
        scaled = scaled + torch.rand_like(scaled) if stochastic else scaled + 0.5
        return scaled.floor_().clamp_(0, _UINT8_LEVELS).to(torch.uint8)
    if dtype == torch.bfloat16 and stochastic:
        # Add random low bits to the float32 pattern and truncate: rounds up with the probability of the remainder.
        u = u.float()
        bits = u.view(torch.int32)
        noisy = (bits + torch.randint_like(bits, 0, 1 << 16)).bitwise_and_(-(1 << 16)).view(torch.float32)
        return torch.where(torch.isfinite(noisy), noisy, u).to(torch.bfloat16)
    return u.to(dtype)


def decode(stored: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Stored chains as floats of ``dtype`` in unit coordinates (the inverse of :func:`encode` up to its rounding)."""
    if stored.dtype == torch.uint8:
        return stored.to(dtype) * (2.0 / _UINT8_LEVELS) - 1.0
    return stored.to(dtype)


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ReplayBuffer(nn.Module):
    """A fixed-size store of sampler states with random re-initialisation.

    In class-conditional mode slot ``i`` belongs to class ``i % num_classes`` (as in JEM), so drawing start points for
    given labels is pure index arithmetic on the device: no host synchronisation, no per-class lists.

    The shape of the stored samples may be left open (``input_shape=None``): the buffer is then filled on the first
    call to :meth:`initialize` (the module does this with the first batch), and a checkpoint of any shape loads into it.

    Args:
        capacity: number of stored samples (JEM default 10,000), across all ranks: under DDP each rank keeps an equal
            shard (:meth:`initialize` with ``world_size``), and checkpoints hold every shard.
        reinit_prob: probability that a drawn start point is replaced by a fresh draw from ``init`` (JEM default 0.05).
        init: initial distribution of fresh chains; default uniform on ``[-1, 1]``, except in a JEM, which gives a
            buffer built without one its default restarts (:func:`jemkit.presets.default_restarts`).
        input_shape: shape of one sample without the batch dimension, or ``None`` to set it later.
        num_classes: number of classes; required for ``conditional=True`` by the time the buffer is filled.
        conditional: store samples per class so that :meth:`sample` can be asked for given labels.
        storage: how chains are stored: ``"float32"`` (4 bytes a value), ``"bf16"`` (2 bytes: 8 significant bits) or
            ``"uint8"`` (1 byte: 255 levels across the box ``[-1, 1]`` of the unit coordinates, where chains are
            clamped). Compact storage rounds stochastically on every write; start points come back as float32.

    Example::

        >>> buffer = ReplayBuffer(capacity=100, input_shape=(2,))
        >>> x0, idx = buffer.sample(8)
        >>> buffer.update(idx, x0 * 0.5)
    """

    samples: Tensor
    labels: Tensor

    def __init__(
        self,
        capacity: int = 10_000,
        reinit_prob: float = 0.05,
        init: InitialDistribution | None = None,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        conditional: bool = False,
        storage: Storage = "float32",
    ) -> None:
        super().__init__()
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {sorted(STORAGES)}, got {storage!r}")
        check_integer("capacity", capacity)
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob!r}")
        if num_classes is not None:
            check_integer("num_classes", num_classes)
        self.capacity = int(capacity)  # the slots this rank holds (all of them without DDP)
        self.total_capacity = int(capacity)  # across all ranks
        self.reinit_prob = float(reinit_prob)
        self.init = init if init is not None else UniformInit()
        self.init_given = init is not None  # a JEM fills in its default restarts where none was chosen
        self.num_classes = num_classes
        self.conditional = conditional
        self.storage = storage
        # Plain tensors, not registered buffers: DDP broadcasts registered buffers from rank zero (at wrap time and on
        # every forward), which would overwrite each rank's own shard. _apply / _save_to_state_dict /
        # _load_from_state_dict below give them the behaviour of buffers otherwise (.to(device), checkpoints).
        self.samples = torch.empty(0, dtype=STORAGES[storage])
        self.labels = torch.empty(0, dtype=torch.long)
        if input_shape is not None:
            self.initialize(input_shape)

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this buffer (its total capacity, not this rank's shard)."""
        return {
            "capacity": self.total_capacity,
            "reinit_prob": self.reinit_prob,
            "init": self.init,
            "input_shape": self.input_shape,
            "num_classes": self.num_classes,
            "conditional": self.conditional,
            "storage": self.storage,
        }

    @property
    def is_initialized(self) -> bool:
        return self.samples.numel() > 0

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return tuple(self.samples.shape[1:]) if self.is_initialized else None

    @property
    def chain_dtype(self) -> torch.dtype:
        """The floating dtype start points come back in: the stored one for float32 storage (which follows the
        module's floating dtype), float32 for compact storage."""
        return self.samples.dtype if self.storage == "float32" and self.samples.is_floating_point() else torch.float32

    def _stored_dtype(self, chain_dtype: torch.dtype) -> torch.dtype:
        return chain_dtype if self.storage == "float32" else STORAGES[self.storage]

    def chains(self, idx: Tensor | None = None) -> Tensor:
        """The stored chains (all, or slots ``idx``) as floats in unit coordinates, whatever the storage."""
        return decode(self.samples if idx is None else self.samples[idx], self.chain_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes the stored chains take (this rank's shard)."""
        return self.samples.numel() * self.samples.element_size()

    @torch.no_grad()
    def initialize(
        self,
        input_shape: Sequence[int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        world_size: int = 1,
    ) -> None:
        """Fill every slot of this rank's shard (``capacity / world_size`` slots) with fresh draws from ``init``
        (drawn in ``dtype``; stored in it with float32 storage, encoded otherwise)."""
        if self.conditional and self.num_classes is not None and self.total_capacity < self.num_classes:
            raise ValueError(
                f"capacity {self.total_capacity} is smaller than num_classes {self.num_classes}: no slot for some "
                "classes"
            )
        if self.conditional and self.num_classes and self.total_capacity % self.num_classes:
            used = self.total_capacity - self.total_capacity % self.num_classes
            warnings.warn(
                f"ReplayBuffer: capacity {self.total_capacity} is not a multiple of num_classes {self.num_classes}; a "
                f"class-conditional buffer gives every class as many slots, so it keeps {used}: pass capacity={used} "
                f"or {used + self.num_classes}",
                UserWarning,
                stacklevel=2,
            )
            self.total_capacity = used
        self.capacity = self.shard_size(world_size)
        self._fill(input_shape, device, dtype)

    @torch.no_grad()
    def ensure_initialized(
        self, input_shape: Sequence[int], device: torch.device | str | None = None, world_size: int = 1
    ) -> None:
        """Initialise the buffer unless it already holds this rank's shard (e.g. restored from a checkpoint)."""
        if not self.is_initialized or self.capacity != self.shard_size(world_size):
            self.initialize(input_shape, device, self.chain_dtype, world_size)

    def _fill(self, input_shape: Sequence[int], device: torch.device | str | None, dtype: torch.dtype) -> None:
        input_shape = tuple(int(s) for s in input_shape)
        if any(s < 1 for s in input_shape):
            raise ValueError(f"input_shape must have positive sizes, got {input_shape}")
        device = device if device is not None else self.samples.device
        if self.conditional and self.num_classes is None:
            raise ValueError("a conditional ReplayBuffer needs num_classes before it can be filled")
        if self.conditional and self.capacity < self.num_classes:
            raise ValueError(
                f"capacity {self.capacity} is smaller than num_classes {self.num_classes}: no slot for some classes"
            )
        labels = self._slot_labels(device)
        fresh = self.init.sample(self.capacity, input_shape, device=device, dtype=dtype, y=labels)
        self.samples = encode(fresh, self._stored_dtype(dtype))
        self.labels = labels if labels is not None else torch.empty(0, dtype=torch.long, device=device)

    def _slot_labels(self, device: torch.device | str) -> Tensor | None:
        if not self.conditional:
            return None
        return torch.arange(self.capacity, device=device) % self.num_classes

    @torch.no_grad()
    def reset(self) -> None:
        """Re-initialise every slot (keeps the shape); used after a divergence."""
        if self.is_initialized:
            self._fill(self.samples.shape[1:], self.samples.device, self.chain_dtype)

    @torch.no_grad()
    def reinit_nonfinite(self) -> int:
        """Replace every slot holding NaN or inf with a fresh draw; returns how many were replaced (a host sync).

        A chain that went non-finite stays non-finite and poisons every batch it is drawn into.
        """
        if not self.is_initialized:
            return 0
        bad = ~torch.isfinite(self.samples.flatten(1)).all(dim=1)
        count = int(bad.sum())
        if count:
            labels = self.labels[bad] if self.conditional else None
            fresh = self.init.sample(count, self.samples.shape[1:], self.samples.device, self.chain_dtype, labels)
            self.samples[bad] = encode(fresh, self.samples.dtype)
        return count

    def _check_ready(self) -> None:
        if not self.is_initialized:
            raise RuntimeError("the ReplayBuffer has no input shape yet: call initialize(input_shape) first")

    @torch.no_grad()
    def sample(self, batch_size: int, y: Tensor | None = None, restarts: bool = True) -> tuple[Tensor, Tensor]:
        """Draw start points: returns ``(x0 [batch_size, *shape], slot indices [batch_size])``.

        With labels ``y [batch_size]`` (conditional buffers only) every start point comes from a slot of its class.
        With ``restarts`` (training), each start point is independently replaced by a fresh draw with probability
        ``reinit_prob``; without, the start points are what the buffer holds (pictures, FID).
        """
        self._check_ready()
        device = self.samples.device
        if y is None:
            idx = torch.randint(0, self.capacity, (batch_size,), device=device)
        else:
            if not self.conditional:
                raise ValueError("labels were given but this ReplayBuffer is not conditional (conditional=False)")
            check_labels(y, batch_size)
            slots_per_class = self.capacity // self.num_classes
            rows = torch.randint(0, slots_per_class, (batch_size,), device=device)
            idx = y.to(device).long() + rows * self.num_classes
        x0 = self.chains(idx)
        if restarts and self.reinit_prob > 0:
            labels = self.labels[idx] if self.conditional else None
            fresh = self.init.sample(batch_size, x0.shape[1:], device=device, dtype=x0.dtype, y=labels)
            reinit = torch.rand(batch_size, device=device) < self.reinit_prob
            x0 = torch.where(reinit.view(-1, *([1] * (x0.dim() - 1))), fresh, x0)
        return x0, idx

    @torch.no_grad()
    def update(self, idx: Tensor, x: Tensor) -> None:
        """Write refined samples ``x [B, *shape]`` back into slots ``idx [B]``."""
        self._check_ready()
        if x.shape[1:] != self.samples.shape[1:] or x.shape[0] != idx.shape[0]:
            raise ValueError(
                f"cannot write samples of shape {tuple(x.shape)} at {tuple(idx.shape)} indices into a buffer of "
                f"samples shaped {tuple(self.samples.shape[1:])}"
            )
        self.samples[idx] = encode(x.detach(), self.samples.dtype)

    def shard_size(self, world_size: int) -> int:
        """Slots each of ``world_size`` ranks keeps of the ``total_capacity``."""
        lo, hi = self.shard_bounds(self.total_capacity, 0, world_size)
        return hi - lo

    def gather_shards(self) -> dict[str, Tensor]:
        """Every rank's ``samples`` and ``labels`` concatenated in rank order (what a checkpoint stores).

        A collective under DDP: every rank must call it (Lightning's ``on_save_checkpoint`` runs on all ranks).
        """
        state = {name: getattr(self, name) for name in self._STATE}
        _, world_size = _rank_and_world_size()
        if world_size == 1 or not self.is_initialized:
            return state
        gathered = {}
        for name, local in state.items():
            if local.numel() == 0:
                gathered[name] = local
                continue
            parts = [torch.empty_like(local) for _ in range(world_size)]
            torch.distributed.all_gather(parts, local.contiguous())
            gathered[name] = torch.cat(parts)
        return gathered

    def shard_bounds(self, total: int, rank: int, world_size: int) -> tuple[int, int]:
        """Slots ``[lo, hi)`` of a ``total``-slot buffer that rank ``rank`` of ``world_size`` keeps.

        Shards are equal, contiguous and (for conditional buffers) a multiple of ``num_classes`` long, so every shard
        keeps the ``slot % num_classes`` layout; up to ``world_size * num_classes - 1`` trailing slots are dropped.
        """
        block = self.num_classes if self.conditional and self.num_classes else 1
        per_rank = (total // world_size // block) * block
        if per_rank == 0:
            raise ValueError(
                f"capacity {total} cannot be split over {world_size} ranks"
                + (f" in blocks of num_classes={block}" if block > 1 else "")
                + f": pass capacity >= {world_size * block}"
            )
        return rank * per_rank, (rank + 1) * per_rank

    _STATE = ("samples", "labels")

    def _apply(self, fn: Any, recurse: bool = True) -> ReplayBuffer:
        super()._apply(fn, recurse)
        self.samples, self.labels = fn(self.samples), fn(self.labels)
        if self.storage != "float32" and self.samples.dtype != STORAGES[self.storage]:  # .double(), .half(): keep it
            self.samples = self.samples.to(STORAGES[self.storage])
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._STATE:
            value = getattr(self, name)
            destination[prefix + name] = value if keep_vars else value.detach()
        for key, value in getattr(self.init, "state_dict", dict)().items():  # e.g. a fitted GaussianInit
            destination[f"{prefix}init.{key}"] = value.detach()

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
        # A checkpoint holds every rank's shard (gathered when saving); each rank takes its own share, also when the
        # number of ranks changed. The stored shape is adopted, since it is only known once data has been seen.
        stored = {name: state_dict.pop(prefix + name, None) for name in self._STATE}
        init_state = {
            k[len(prefix) + 5 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + "init.")
        }
        if init_state and hasattr(self.init, "load_state_dict"):
            self.init.load_state_dict(init_state)
        elif init_state:  # e.g. a 0.2 BatchNorm checkpoint (Gaussian restarts) resumed into a JEM built with 0.3's
            warnings.warn(
                f"the checkpoint's replay buffer restarted its chains from a fitted distribution (state "
                f"{sorted(init_state)}), this one from {self.init!r}, which has none: resumed chains restart like this "
                "one. To keep the checkpoint's, load it with JEM.load_from_checkpoint or build the JEM with its buffer "
                "(e.g. buffer=ReplayBuffer(init=GaussianInit(uniform_fraction=0.5)))",
                stacklevel=2,
            )
        rank, world_size = _rank_and_world_size()
        if world_size > 1 and stored["samples"] is not None and stored["samples"].numel() > 0:
            lo, hi = self.shard_bounds(stored["samples"].shape[0], rank, world_size)
            stored = {k: v[lo:hi] if v is not None and v.numel() > 0 else v for k, v in stored.items()}
        for name, value in stored.items():
            if value is None:
                if strict:
                    missing_keys.append(prefix + name)
                continue
            current = getattr(self, name)
            if name == "samples" and value.dtype != current.dtype and value.numel() > 0:
                # stored in another storage (a checkpoint of a float32 buffer loaded into a compact one, ...)
                value = encode(decode(value.detach()), current.dtype, stochastic=False)
            setattr(self, name, value.detach().to(device=current.device, dtype=current.dtype, copy=True))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.is_initialized:
            replaced = self.reinit_nonfinite()
            if replaced:
                warnings.warn(
                    f"{prefix}samples held {replaced} non-finite chains (NaN/inf) in the checkpoint; they were "
                    "re-initialised from the initial distribution",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.capacity = int(self.samples.shape[0])
            if stored["samples"] is not None and stored["samples"].numel() > 0:
                self.total_capacity = self.capacity * world_size

    def extra_repr(self) -> str:
        shape = self.input_shape
        storage = f", storage={self.storage!r}" if self.storage != "float32" else ""
        return (
            f"capacity={self.capacity}, reinit_prob={self.reinit_prob}, conditional={self.conditional}, "
            f"input_shape={shape}, init={self.init!r}{storage}"
        )
