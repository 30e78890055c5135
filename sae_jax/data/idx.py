"""IDX files: the format of MNIST, Fashion-MNIST and KMNIST, read, written and verified.

An edge module: it reads files and returns numpy arrays (images stay uint8
``[n, 28, 28]``, labels uint8 ``[n]``; scaling to float happens on the device).
Every problem raises ``DataError`` with a one-line message naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_jax.data.base import Dataset
from sae_jax.errors import DataError

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# sha256 of the uncompressed canonical files: gzip wrappers differ between mirrors,
# the content does not.
CANONICAL_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# The mirror that tensorflow-datasets downloads MNIST from.
DEFAULT_MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"


# Mirrors and sha256 of the .gz files as in tensorflow-datasets'
# url_checksums/fashion_mnist.txt and url_checksums/kmnist.txt.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
KMNIST_SHA256 = {
    "train-images-idx3-ubyte": "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
    "train-labels-idx1-ubyte": "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
    "t10k-images-idx3-ubyte": "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
    "t10k-labels-idx1-ubyte": "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
}


@dataclass(frozen=True)
class IdxDataset:
    """A dataset published as MNIST's four IDX files: where to download them, and the
    sha256 of each (``gz_sha256``: of the ``.gz`` file as published, as
    tensorflow-datasets' checksum lists give them; else of the uncompressed content)."""

    name: str
    title: str
    mirror: str
    sha256: dict[str, str]
    gz_sha256: bool


IDX_DATASETS = {
    "mnist": IdxDataset("mnist", "MNIST", DEFAULT_MIRROR, CANONICAL_SHA256, gz_sha256=False),
    "fashion_mnist": IdxDataset(
        "fashion_mnist",
        "Fashion-MNIST",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        FASHION_MNIST_SHA256,
        gz_sha256=True,
    ),
    "kmnist": IdxDataset(
        "kmnist",
        "KMNIST",
        "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
        KMNIST_SHA256,
        gz_sha256=True,
    ),
}


def idx_dataset(name: str) -> IdxDataset:
    """The ``IdxDataset`` called ``name``; ``DataError`` listing the known ones."""
    if name not in IDX_DATASETS:
        raise DataError(
            f"--dataset={name}: choose from {', '.join(IDX_DATASETS)} (or any "
            f"tensorflow-datasets image dataset with --data_source=tfds)"
        )
    return IDX_DATASETS[name]


# IDX type codes (third byte of the magic number) to numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_CODES = {dtype.str.lstrip("<>|="): code for code, dtype in _IDX_DTYPES.items()}


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of one IDX file into an array.

    Checks the magic number (two zero bytes, a known type code, 1 to 4 dimensions)
    and that the header's sizes account for exactly the bytes that follow.

    Args:
      raw: the uncompressed file content.
      name: the file's name, for error messages.

    Returns:
      An array of the header's shape and type, in native byte order.
    """
    if len(raw) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(raw)} bytes)")
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(f"{name}: not an IDX file (bad magic number 0x{raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated inside the IDX header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) < expected:
        raise DataError(
            f"{name}: truncated: the header promises shape {shape} ({expected} bytes) "
            f"but the file has {len(raw)} bytes"
        )
    if len(raw) > expected:
        raise DataError(
            f"{name}: the header says shape {shape} ({expected} bytes) but the file has "
            f"{len(raw) - expected} more bytes than that"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of ``array`` (uint8, int8, int16, int32, float32 or float64)."""
    array = np.asarray(array)
    code = _DTYPE_CODES.get(array.dtype.str.lstrip("<>|="))
    if code is None or not 1 <= array.ndim <= 4:
        raise ValueError(f"cannot write {array.dtype} [{array.ndim}-d] as IDX")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(_IDX_DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    raw = encode_idx(array)
    if str(path).endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
    Path(path).write_bytes(raw)


def _uncompressed(raw: bytes, name: str) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(f"{name}: truncated gzip stream (it ends before its end marker)") from None
    except (OSError, zlib.error) as e:
        raise DataError(f"{name}: corrupt gzip stream ({e})") from None


def _read_uncompressed(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return _uncompressed(raw, str(path))


_OWN_DATA_HINT = " (canonical MNIST); for your own IDX data turn verification off (--no_verify)"


def _check_sha256(
    raw: bytes,
    expected: str,
    name: str,
    what: str = "uncompressed content",
    hint: str = _OWN_DATA_HINT,
) -> None:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected:
        raise DataError(f"{name}: sha256 of the {what} is {digest}, expected {expected}{hint}")


def read_idx(path: str | os.PathLike[str], expected_sha256: str | None = None) -> np.ndarray:
    """Read one IDX file, gzipped or raw, optionally checking its content hash.

    The structure is checked first, so a damaged file is reported as such rather
    than as a hash mismatch.

    Args:
      path: the file.
      expected_sha256: the sha256 of the uncompressed bytes, or None to skip.

    Returns:
      The array (see ``parse_idx``).
    """
    path = Path(path)
    raw = _read_uncompressed(path)
    array = parse_idx(raw, str(path))
    if expected_sha256 is not None:
        _check_sha256(raw, expected_sha256, str(path))
    return array


def _find(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    return None


def has_idx_files(data_dir: str | os.PathLike[str] | None) -> bool:
    """Whether ``data_dir`` holds all four IDX files (MNIST's names, gzipped or raw)."""
    return data_dir is not None and all(
        _find(Path(data_dir), stem) for stem in MNIST_FILES.values()
    )


def _check_split(images: np.ndarray, labels: np.ndarray, image_file: str, label_file: str):
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{image_file}: expected uint8 images [n, rows, cols], got "
            f"{images.dtype} {list(images.shape)}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{label_file}: expected uint8 labels [n], got {labels.dtype} {list(labels.shape)}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{image_file} has {images.shape[0]} images but {label_file} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{label_file}: label {int(labels[bad])} at index {bad} is outside 0..9")


def load_idx_dir(
    data_dir: str | os.PathLike[str], verify: bool = True, dataset: str = "mnist"
) -> Dataset:
    """Load the four IDX files of ``dataset`` (MNIST's file names) from ``data_dir``.

    Args:
      data_dir: a folder holding ``train-images-idx3-ubyte[.gz]`` and the other three.
      verify: check each file against the dataset's published sha256 (turn off for
        your own data in IDX format): for MNIST the uncompressed content's, for
        Fashion-MNIST and KMNIST the ``.gz`` file's (a raw file is then refused).
      dataset: a name in ``IDX_DATASETS``.

    Returns:
      ``Dataset`` with images uint8 ``[n, rows, cols]`` and labels uint8 ``[n]``.
    """
    spec = idx_dataset(dataset)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    paths: dict[str, Path] = {}
    for key, stem in MNIST_FILES.items():
        path = _find(data_dir, stem)
        if path is None:
            raise DataError(f"{data_dir}: missing {stem}.gz (or {stem})")
        paths[key] = path
    raws = {key: _read_uncompressed(path) for key, path in paths.items()}
    arrays = {key: parse_idx(raw, str(paths[key])) for key, raw in raws.items()}
    for split in ("train", "test"):
        _check_split(
            arrays[f"{split}_images"],
            arrays[f"{split}_labels"],
            str(paths[f"{split}_images"]),
            str(paths[f"{split}_labels"]),
        )
    if verify:  # last: a file that is damaged or inconsistent is reported as such
        for key, path in paths.items():
            _verify(spec, path, raws[key])
    return Dataset(
        arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]
    )


def _verify(spec: IdxDataset, path: Path, raw: bytes) -> None:
    """Check one file of ``spec`` against its published sha256 (see ``IdxDataset``)."""
    stem = path.name.removesuffix(".gz")
    if not spec.gz_sha256:
        _check_sha256(raw, spec.sha256[stem], str(path))
        return
    if path.suffix != ".gz":
        raise DataError(
            f"{path}: {spec.title}'s published sha256 is of {stem}.gz; keep the .gz file "
            f"to verify it, or turn verification off (--no_verify)"
        )
    hint = (
        f" ({spec.title}'s file as published); for your own IDX data turn verification "
        f"off (--no_verify)"
    )
    _check_sha256(path.read_bytes(), spec.sha256[stem], str(path), "file", hint)
