"""MNIST from the four canonical IDX files (gzipped or raw).

This is an edge module: it reads files and returns numpy arrays. Images stay
uint8 ``[n, 28, 28]``; scaling to float happens on the device.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third byte of the magic number) to numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file."""


class Mnist(NamedTuple):
    """MNIST as uint8 arrays: images ``[n, 28, 28]`` and labels ``[n]``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of one IDX file into an array.

    Checks the magic number (two zero bytes, a known type code, 1 to 4 dimensions)
    and that the header's sizes match the length of the data.

    Args:
      raw: the uncompressed file content.
      name: the file's name, for error messages.

    Returns:
      An array of the header's shape and type (native byte order).
    """
    if len(raw) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(raw)} bytes)")
    zero, type_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or type_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(f"{name}: bad IDX magic number 0x{raw[:4].hex()}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{name}: the header promises shape {shape} ({expected} bytes) "
            f"but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file, gzipped (``.gz``) or raw, into an array."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read or decompress ({e})") from None
    return parse_idx(raw, str(path))


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{data_dir}: missing {stem}.gz (or {stem})")


def load_idx_dir(data_dir: str | os.PathLike[str]) -> Mnist:
    """Load the four canonical MNIST IDX files from ``data_dir``.

    Returns:
      ``Mnist`` with images uint8 ``[n, 28, 28]`` and labels uint8 ``[n]``.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    arrays = {key: read_idx(_find(data_dir, stem)) for key, stem in MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        image_file, label_file = MNIST_FILES[f"{split}_images"], MNIST_FILES[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{image_file}: expected uint8 images [n, rows, cols]")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DataError(f"{label_file}: expected uint8 labels [n]")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{image_file} has {images.shape[0]} images but {label_file} "
                f"has {labels.shape[0]} labels"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{label_file}: label {int(labels.max())} is outside 0..9")
    return Mnist(**arrays)
