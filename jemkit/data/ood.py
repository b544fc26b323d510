"""Out-of-distribution sets that need no download, for scoring how well ``-E(x)`` separates data from non-data.

The JEM papers rank inputs by ``log p(x)`` and report how well that separates the test set from other data sets
(SVHN, CIFAR-100, CelebA) and from synthetic inputs (noise, constant images, interpolations). The synthetic ones
are built here, from a seed and the in-distribution test set only, so OOD evaluation works offline, in tests and
in CI. They are ordinary ``torch.utils.data.Dataset`` objects yielding ``(image, -1)`` pairs (label ``-1`` means
"no class"), so the same loaders, collate functions and evaluation loops serve in- and out-of-distribution data.

Every set is a pure function of ``(seed, index)``: item ``i`` is the same whatever order items are read in, in
whichever worker process, and two sets built with the same arguments are identical. The noise and constant sets are
drawn in ``[-1, 1]``; :func:`make_ood_dataset` with the JEM's ``domain`` maps them into the data's own box, so they
test the inputs a model can meet whatever the data's units. Nothing here assumes images: a "pixel" is any input value
(a feature of a tabular row, a time step of a signal).

- :class:`UniformNoise`, :class:`GaussianNoise`: pixel-wise noise (Gaussian noise clamped to the data range).
- :class:`ConstantImages`: one random value per channel, the "constant" set of the OOD literature.
- :class:`PixelShuffled`: each in-distribution image with its pixels permuted: the same pixel values (so the same
  marginal statistics), no structure.
- :class:`Interpolated`: JEM's "interp", the mean of two random in-distribution images.
- :class:`Mirrored`: each in-distribution input upside down (``vflip``, images only) or with its values mirrored
  in the data's box (``invert``: dark becomes light). Near-OOD: the same objects, statistics close to the data's.
- :func:`mnist_style_digits`: scikit-learn's real handwritten digits drawn as MNIST draws them (a 20x20 digit
  centred in a 28x28 black square), the classic near-OOD set beside Fashion-MNIST.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from jemkit.checks import check_choice, check_integer

__all__ = [
    "IMAGE_ONLY_SETS",
    "OOD_SETS",
    "Mirrored",
    "mnist_style_digits",
    "ood_sets_for",
    "ConstantImages",
    "GaussianNoise",
    "Interpolated",
    "PixelShuffled",
    "UniformNoise",
    "InDomain",
    "check_ood_dataset",
    "make_ood_dataset",
]

OOD_SETS: tuple[str, ...] = ("uniform", "gaussian", "constant", "shuffled", "interp", "vflip", "invert")
"""Names accepted by :func:`make_ood_dataset` (``vflip`` for images only: :func:`ood_sets_for`)."""

IMAGE_ONLY_SETS: tuple[str, ...] = ("vflip",)
"""The sets that only images ``[C, H, W]`` have."""

OOD_LABEL = -1
"""The label every OOD item carries: "no class"."""


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    try:
        if not shape:
            raise ValueError("empty")
        for size in shape:
            check_integer("size", size)
    except ValueError:
        expected = "a non-empty sequence of positive integers"
        raise ValueError(f"input_shape must be {expected}, got {input_shape!r}") from None
    return shape


def _image_of(item: object) -> Tensor:
    """The image of a dataset item: ``item[0]`` of an ``(image, label)`` pair, or the item itself."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(image, Tensor):
        raise TypeError(
            f"expected dataset items to be (image Tensor, label) pairs or image Tensors, got an image of type "
            f"{type(image).__name__} (add a ToTensor-style transform)"
        )
    return image


class _SeededDataset(Dataset):
    """Base of the OOD sets: ``num_samples`` items, item ``i`` drawn from its own generator seeded by ``(seed, i)``."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = check_integer("num_samples", num_samples)
        self.seed = check_integer("seed", seed, minimum=0)
        # a per-class salt, so that two different sets with the same seed do not share random streams
        self._salt = zlib.crc32(type(self).__name__.encode())

    def __len__(self) -> int:
        return self.num_samples

    def _index(self, index: int) -> int:
        i = operator.index(index)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {index} is out of range for {type(self).__name__} of length {self.num_samples}")
        return i

    def _generator(self, stream: int, index: int) -> torch.Generator:
        """A fresh CPU generator for ``(seed, set, stream, index)``; stream 0 makes items, 1 is for set-level draws."""
        state = np.random.SeedSequence([self.seed, self._salt, stream, index]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = self._index(index)
        return self._make(i, self._generator(0, i)), OOD_LABEL

    def _make(self, index: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError


class UniformNoise(_SeededDataset):
    """Images of i.i.d. uniform pixels in ``[low, high)``: float32 ``input_shape`` each, label ``-1``.

    Args:
        num_samples: number of images.
        input_shape: shape of one image without the batch dimension, e.g. ``(1, 8, 8)`` or ``(3, 32, 32)``.
        low: lower bound of the pixel values (default: bottom of the data range).
        high: upper bound of the pixel values (default: top of the data range).
        seed: seed; item ``i`` depends only on ``(seed, i)``.
    """

    def __init__(
        self, num_samples: int, input_shape: Sequence[int], low: float = -1.0, high: float = 1.0, seed: int = 0
    ) -> None:
        super().__init__(num_samples, seed)
        self.input_shape = _check_shape(input_shape)
        if not low < high:
            raise ValueError(f"UniformNoise needs low < high, got low={low!r}, high={high!r}")
        self.low, self.high = float(low), float(high)

    def _make(self, index: int, generator: torch.Generator) -> Tensor:
        return torch.rand(self.input_shape, generator=generator) * (self.high - self.low) + self.low


class GaussianNoise(_SeededDataset):
    """Images of i.i.d. Gaussian pixels ``N(mean, std^2)`` clamped to ``[-1, 1]``: float32 ``input_shape``, label -1.

    Args:
        num_samples: number of images.
        input_shape: shape of one image without the batch dimension.
        mean: mean of the pixel values before clamping.
        std: standard deviation of the pixel values before clamping, > 0.
        seed: seed; item ``i`` depends only on ``(seed, i)``.
    """

    def __init__(
        self, num_samples: int, input_shape: Sequence[int], mean: float = 0.0, std: float = 0.5, seed: int = 0
    ) -> None:
        super().__init__(num_samples, seed)
        self.input_shape = _check_shape(input_shape)
        if not std > 0:
            raise ValueError(f"GaussianNoise needs std > 0, got {std!r}")
        self.mean, self.std = float(mean), float(std)

    def _make(self, index: int, generator: torch.Generator) -> Tensor:
        return (torch.randn(self.input_shape, generator=generator) * self.std + self.mean).clamp(-1.0, 1.0)


class ConstantImages(_SeededDataset):
    """Images whose every pixel of a channel has one value, uniform in ``[-1, 1)`` per channel and image.

    The "constant" OOD set of the literature: no texture and no edges, yet often assigned a high likelihood by
    generative models. Channels are the first dimension of ``input_shape``; a 1-D shape gets one value per entry.

    Args:
        num_samples: number of images.
        input_shape: shape of one image without the batch dimension, ``(C, ...)``.
        seed: seed; item ``i`` depends only on ``(seed, i)``.
    """

    def __init__(self, num_samples: int, input_shape: Sequence[int], seed: int = 0) -> None:
        super().__init__(num_samples, seed)
        self.input_shape = _check_shape(input_shape)

    def _make(self, index: int, generator: torch.Generator) -> Tensor:
        channels = self.input_shape[0]
        values = torch.rand(channels, generator=generator) * 2.0 - 1.0
        return values.view(channels, *([1] * (len(self.input_shape) - 1))).expand(self.input_shape).clone()


class PixelShuffled(_SeededDataset):
    """Each reference image with its pixel positions randomly permuted (one seeded permutation per item).

    For images ``[C, H, W]`` the ``H * W`` positions are permuted and the channels of a pixel move together; a
    1-D input ``[D]`` has its entries permuted. Every image keeps exactly its own pixel values, hence the marginal
    pixel statistics of the data, while all spatial structure is destroyed.

    Args:
        dataset: the in-distribution dataset whose items are ``(image, label)`` pairs or images.
        seed: seed; item ``i`` depends only on ``(seed, i)`` and the reference.
        num_samples: number of items. ``None`` (default): one per reference image, item ``i`` shuffling reference
            image ``i``. Otherwise the reference images are taken in a seeded random order (cycling if
            ``num_samples > len(dataset)``), so a prefix of a class-sorted dataset is not used.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_samples: int | None = None) -> None:
        n_ref = len(dataset)  # type: ignore[arg-type]
        if n_ref < 1:
            raise ValueError("PixelShuffled needs a non-empty reference dataset")
        super().__init__(n_ref if num_samples is None else num_samples, seed)
        self.dataset = dataset
        self._order: Tensor | None = None
        if num_samples is not None:
            self._order = torch.randperm(n_ref, generator=self._generator(1, 0))

    def source_index(self, index: int) -> int:
        """Index of the reference image that item ``index`` shuffles."""
        i = self._index(index)
        return i if self._order is None else int(self._order[i % len(self._order)])

    def _make(self, index: int, generator: torch.Generator) -> Tensor:
        image = _image_of(self.dataset[self.source_index(index)])
        if image.dim() == 1:
            return image[torch.randperm(image.numel(), generator=generator)]
        flat = image.reshape(image.shape[0], -1)
        perm = torch.randperm(flat.shape[1], generator=generator).to(image.device)
        return flat[:, perm].reshape(image.shape)


class Interpolated(_SeededDataset):
    """JEM's "interp" set: item ``i`` is ``(x_a + x_b) / 2`` for two distinct, randomly drawn reference images.

    Such blends look image-like at a glance but are not digits/objects; a good density model should rank them
    below the data.

    Args:
        dataset: the in-distribution dataset (at least two items), ``(image, label)`` pairs or images.
        seed: seed; the pair of item ``i`` depends only on ``(seed, i)`` (see :meth:`source_indices`).
        num_samples: number of items (default: ``len(dataset)``).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_samples: int | None = None) -> None:
        n_ref = len(dataset)  # type: ignore[arg-type]
        if n_ref < 2:
            raise ValueError(f"Interpolated needs a reference dataset of at least 2 items, got {n_ref}")
        super().__init__(n_ref if num_samples is None else num_samples, seed)
        self.dataset = dataset
        self._n_ref = n_ref

    def source_indices(self, index: int) -> tuple[int, int]:
        """The two distinct reference indices ``(a, b)`` whose images item ``index`` averages."""
        i = self._index(index)
        generator = self._generator(0, i)
        a = int(torch.randint(self._n_ref, (1,), generator=generator))
        b = int(torch.randint(self._n_ref - 1, (1,), generator=generator))
        return a, b + (b >= a)

    def _make(self, index: int, generator: torch.Generator) -> Tensor:
        a, b = self.source_indices(index)
        return (_image_of(self.dataset[a]) + _image_of(self.dataset[b])) / 2.0


class Mirrored(Dataset):
    """Every reference input mirrored: ``"vflip"`` turns an image ``[C, H, W]`` upside down; ``"invert"`` mirrors
    each value in the box of ``domain`` (``low + high - x`` per channel or feature; without a domain, in ``[-1, 1]``:
    ``-x``), so dark becomes light and the range is kept. Items ``(input, -1)``."""

    def __init__(self, dataset: Dataset, how: str, domain: object | None = None) -> None:
        check_choice("mirror", how, ("vflip", "invert"))
        if len(dataset) < 1:  # type: ignore[arg-type]
            raise ValueError(f"cannot build OOD set {how!r}: the reference dataset is empty")
        shape = tuple(_image_of(dataset[0]).shape)
        if how == "vflip" and len(shape) != 3:
            raise ValueError(f"the OOD set 'vflip' turns images [C, H, W] upside down; the inputs have shape {shape}")
        self.dataset, self.how, self.domain = dataset, how, domain

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = _image_of(self.dataset[index])
        if self.how == "vflip":
            return x.flip(-2), OOD_LABEL
        if self.domain is None:
            return -x, OOD_LABEL
        return self.domain.from_unit(-self.domain.to_unit(x.unsqueeze(0)))[0], OOD_LABEL


def mnist_style_digits(size: int = 28) -> TensorDataset:
    """scikit-learn's 1,797 handwritten digits drawn as MNIST draws its own: each 8x8 digit enlarged (bilinear) to a
    20x20 box centred in a 28x28 black square, white ink, in ``[-1, 1]``; ``size`` 32 pads to 32x32 as
    ``pad_to_32`` does. Items ``([1, size, size], -1)``: the near-OOD set of a Fashion-MNIST model."""
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    if size not in (28, 32):
        raise ValueError(f"MNIST-style digits are 28x28 (or padded to 32x32), got size {size!r}")
    digits = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16.0  # ink in [0, 1]
    box = F.interpolate(digits, size=(20, 20), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    pad = 4 + (size - 28) // 2
    images = F.pad(box, (pad, pad, pad, pad)) * 2.0 - 1.0
    return TensorDataset(images, torch.full((len(images),), OOD_LABEL, dtype=torch.long))


def ood_sets_for(input_shape: Sequence[int]) -> list[str]:
    """The built-in sets that fit inputs of ``input_shape`` (one input, no batch): all of :data:`OOD_SETS` for
    images, all but :data:`IMAGE_ONLY_SETS` otherwise."""
    image = len(tuple(input_shape)) == 3
    return [name for name in OOD_SETS if image or name not in IMAGE_ONLY_SETS]


class InDomain(Dataset):
    """A set drawn in ``[-1, 1]`` mapped into an input domain's box (``domain.from_unit``): uniform noise becomes
    uniform over the data's box, and so on. Items ``(input, -1)``."""

    def __init__(self, dataset: Dataset, domain: object) -> None:
        self.dataset, self.domain = dataset, domain

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.domain.from_unit(_image_of(self.dataset[index])), OOD_LABEL


def make_ood_dataset(
    name: str, reference: Dataset, num_samples: int | None = None, seed: int = 0, domain: object | None = None
) -> Dataset:
    """Build the OOD set called ``name`` (one of :data:`OOD_SETS`) to match the in-distribution ``reference``.

    The input shape is read from ``reference[0]``'s image; the noise and constant sets use their default
    parameters (uniform in ``[-1, 1]``, Gaussian ``std = 0.5`` clamped), mapped into ``domain``'s box when a
    :class:`~jemkit.sampling.InputDomain` is given (a JEM's ``domain``): uniform over the data's box, Gaussian around
    its center with a quarter of its width as standard deviation, constants anywhere in it.

    Args:
        name: ``"uniform"``, ``"gaussian"``, ``"constant"``, ``"shuffled"``, ``"interp"``, ``"vflip"`` (images) or
            ``"invert"`` (mirrored in ``domain``'s box).
        reference: the in-distribution (test) dataset, items ``(image, label)``.
        num_samples: number of OOD items (default: ``len(reference)``).
        seed: seed of the OOD set.

    Returns:
        A ``Dataset`` of ``(image, -1)`` pairs with images shaped like the reference's.

    Example::

        dm = DigitsDataModule()
        dm.setup("test")
        ood = make_ood_dataset("interp", dm.test_dataset)  # 270 blends of two test digits, [1, 8, 8] each
    """
    check_choice("OOD set", name, OOD_SETS)
    n_ref = len(reference)  # type: ignore[arg-type]
    if n_ref < 1:
        raise ValueError(f"cannot build OOD set {name!r}: the reference dataset is empty")
    n = n_ref if num_samples is None else num_samples
    if name == "shuffled":
        return PixelShuffled(reference, seed=seed, num_samples=num_samples)
    if name == "interp":
        return Interpolated(reference, seed=seed, num_samples=num_samples)
    if name in ("vflip", "invert"):
        mirrored = Mirrored(reference, name, domain)
        return mirrored if num_samples is None else Subset(mirrored, range(min(num_samples, n_ref)))
    shape = tuple(_image_of(reference[0]).shape)
    if name == "uniform":
        dataset: Dataset = UniformNoise(n, shape, seed=seed)
    elif name == "gaussian":
        dataset = GaussianNoise(n, shape, seed=seed)
    else:
        dataset = ConstantImages(n, shape, seed=seed)
    return InDomain(dataset, domain) if domain is not None else dataset


def check_ood_dataset(dataset: Dataset, input_shape: Sequence[int], name: str) -> int:
    """Check that an OOD set can be fed to a model with inputs of ``input_shape``; return its length.

    Only the first item is inspected (reading every item of a large set would cost a full pass).

    Args:
        dataset: the OOD dataset; items ``(image, label)`` pairs or images.
        input_shape: the model's input shape without the batch dimension, e.g. ``(1, 8, 8)``.
        name: the set's name, used in the error messages.

    Raises:
        ValueError: if the set is empty or its images are not shaped ``input_shape``.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"OOD set {name!r} is empty")
    shape = tuple(_image_of(dataset[0]).shape)
    expected = tuple(input_shape)
    if shape != expected:
        raise ValueError(f"OOD set {name!r} has inputs of shape {shape} but the model expects {expected}")
    return n
