"""IDX files, the format of MNIST and Fashion-MNIST, read wherever they lie: gzipped or not, in a folder of their own
(Debian's ``dataset-fashion-mnist`` puts the four gzipped files in ``/usr/share/datasets/fashion-mnist/``) or in
torchvision's layout (``<root>/FashionMNIST/raw/``, unzipped).

torchvision reads only its own layout and checks its own checksums, so Debian's files (or gzipped ones) send it to
the network; jemkit reads the files itself. An IDX file is a big-endian header (two zero bytes, a type code, the
number of dimensions, then one uint32 per dimension) followed by the values.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["IDX_SPLITS", "find_idx_folder", "idx_path", "read_idx", "read_idx_split"]

_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The four files of an MNIST-style set, by split: ``(images, labels)`` without the ``.gz`` a copy may carry."""

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> Tensor:
    """The array an IDX file holds, as a tensor of its own type (``uint8`` for MNIST-style images and labels).

    Gzipped files are recognised by their first bytes, whatever their name. ``ValueError`` names the file when its
    header or size does not fit the format."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise ValueError(f"{path} is not an IDX file: it does not start with two zero bytes and a known type code")
    dtype, ndim = _TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} holds {len(raw) - header} bytes of data but its header announces shape {shape} of {dtype} "
            f"({expected} bytes): the file is truncated or not an IDX file"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))


def idx_path(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (the plain file first), else ``None``."""
    for name in (stem, f"{stem}.gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def find_idx_folder(candidates: Sequence[str | Path]) -> Path | None:
    """The first of ``candidates`` holding all four files of :data:`IDX_SPLITS` (each plain or gzipped)."""
    stems = [stem for pair in IDX_SPLITS.values() for stem in pair]
    for folder in map(Path, candidates):
        if all(idx_path(folder, stem) is not None for stem in stems):
            return folder
    return None


def read_idx_split(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """``(images [N, H, W] uint8, labels [N] int64)`` of ``split`` (``"train"`` or ``"test"``) from ``folder``."""
    image_stem, label_stem = IDX_SPLITS[split]
    image_path, label_path = idx_path(folder, image_stem), idx_path(folder, label_stem)
    if image_path is None or label_path is None:
        raise FileNotFoundError(f"{folder} holds no {image_stem}[.gz] and {label_stem}[.gz]")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(
            f"{image_path} and {label_path} do not form an image set: images {tuple(images.shape)} (expected "
            f"[N, H, W]) and labels {tuple(labels.shape)} (expected [N])"
        )
    return images, labels.long()
