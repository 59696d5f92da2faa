"""Fashion-MNIST from the idx files Debian ships, with nothing to download.

    apt-get install dataset-fashion-mnist      # /usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz

The idx format (LeCun's MNIST layout): a big-endian magic number whose third byte names the element
type and whose fourth byte is the number of dimensions, then one big-endian uint32 per dimension,
then the elements in C order. Files may be gzipped or not; both are read. ``CBS_FASHION_MNIST``
points at another folder holding the same four files.

Images come back as (N, 1, 28, 28) float32 in [-1, 1] (byte values 0..255 scaled linearly), labels
as int64: the same convention as the digits set in ``metrics``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cbs_convert.errors import UserError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# idx element type codes -> big-endian numpy dtypes
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """One idx file (gzipped or not) as a numpy array of its own shape and type."""
    path = Path(path)
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise UserError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: idx header cut short")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise UserError(f"{path}: idx header promises {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass
class ImageSplit:
    train_x: torch.Tensor  # (N, 1, H, W) float32 in [-1, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("CBS_FASHION_MNIST") or DEFAULT_DIR)


def load_fashion_mnist(folder=None) -> ImageSplit:
    """The official 60,000 / 10,000 split: models train on the first, FD is measured on the second."""
    folder = Path(folder) if folder is not None else fashion_mnist_dir()
    found = {key: _find(folder, stem) for key, stem in FILES.items()}
    missing = [FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise UserError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}[.gz]); install it with "
            f"`{INSTALL_HINT}`, or point CBS_FASHION_MNIST at a folder holding the four idx files"
        )
    arrays = {key: read_idx(path) for key, path in found.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_x"], arrays[f"{part}_y"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{folder}: {part} images {images.shape} and labels {labels.shape} do not pair up")

    def pixels(a):
        return torch.from_numpy(a.astype(np.float32) / 127.5 - 1.0)[:, None]

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    return ImageSplit(pixels(arrays["train_x"]), labels(arrays["train_y"]), pixels(arrays["test_x"]), labels(arrays["test_y"]))
