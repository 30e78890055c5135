"""MNIST from local IDX files, a verified download, tensorflow-datasets, or a bundled sample.

This is an edge module: it reads files and the network and returns numpy arrays.
Images stay uint8 ``[n, 28, 28]`` and labels uint8 ``[n]``; scaling to float
happens on the device. Every problem with the data raises ``DataError`` with a
one-line message that names the file (or URL) at fault.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sae_jax.files import user_path

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
MIRROR_ENV = "SAE_JAX_MNIST_MIRROR"
CACHE_ENV = "SAE_JAX_CACHE_DIR"
SOURCES = ("auto", "idx", "download", "tfds", "sample")
SAMPLE_PATH = Path(__file__).parent / "_data" / "mnist_sample.npz"
SAMPLE_SIZES = (1000, 500)  # training and test examples in the bundled sample

# IDX type codes (third byte of the magic number) to numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_CODES = {dtype.str.lstrip("<>|="): code for code, dtype in _IDX_DTYPES.items()}

Log = Callable[[str], None]
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")  # Mnist's arrays


class DataError(ValueError):
    """A data file is missing or malformed, or a download failed; the message names it."""


@dataclass(frozen=True)
class DataSpec:
    """Where to find MNIST: the arguments of ``load_mnist`` that a user chooses."""

    source: str = "auto"
    data_dir: str | None = None
    cache_dir: str | None = None
    mirror: str | None = None
    verify: bool = True
    path: str | None = None  # your own data (``sae_jax.data.arrays``) instead
    label_column: str | None = None
    standardize: bool = False

    def run_options(self) -> dict[str, Any]:
        """What of these settings changes the data a run trains on, where it differs
        from MNIST's defaults (the own data's path made absolute): a run records it."""
        options = {
            "path": str(user_path(self.path).resolve()) if self.path else None,
            "label_column": self.label_column,
            "standardize": self.standardize,
        }
        defaults = {"path": None, "label_column": None, "standardize": False}
        return {k: v for k, v in options.items() if v != defaults[k]}

    def load(self, need: tuple[int | None, int | None] = (None, None), log: Log = print) -> Mnist:
        """The data: your own file (``path``), else ``load_mnist`` with these settings;
        ``need``: training and test examples."""
        if self.path is not None:
            from sae_jax._arrays import load_arrays

            data = load_arrays(
                user_path(self.path), label_column=self.label_column, standardize=self.standardize
            )
            log(f"data: {data.source}")
            return data
        return load_mnist(
            self.source,
            self.data_dir,
            cache_dir=self.cache_dir,
            mirror=self.mirror,
            verify=self.verify,
            need=need,
            log=log,
        )


DEFAULT_DATA = DataSpec()  # the "auto" source with its defaults


class Mnist(NamedTuple):
    """MNIST as uint8 arrays: images ``[n, 28, 28]`` and labels ``[n]``, and where they
    came from (``source``, as ``load_mnist`` reports it). Your own data
    (``DataSpec.path``) comes in the same shape of tuple: images ``[n, features]``
    uint8 or float32, int32 labels or None (no labels), and None for a missing
    test split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str = ""

    def head(self, n_train: int | None, n_test: int | None) -> Mnist:
        """The first ``n_train`` training and ``n_test`` test examples (None: all)."""
        cut = lambda a, n: None if a is None else a[:n]
        return self._replace(
            train_images=cut(self.train_images, n_train),
            train_labels=cut(self.train_labels, n_train),
            test_images=cut(self.test_images, n_test),
            test_labels=cut(self.test_labels, n_test),
        )

    def sha256(self) -> dict[str, str]:
        """The sha256 of each array's bytes (C order), to tell which data a run used."""
        return {
            name: hashlib.sha256(np.ascontiguousarray(getattr(self, name)).tobytes()).hexdigest()
            for name in ARRAYS
            if getattr(self, name) is not None
        }


# --------------------------------------------------------------------------- IDX


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
    """Whether ``data_dir`` holds all four MNIST IDX files (gzipped or raw)."""
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


def load_idx_dir(data_dir: str | os.PathLike[str], verify: bool = True) -> Mnist:
    """Load the four canonical MNIST IDX files from ``data_dir``.

    Args:
      data_dir: a folder holding ``train-images-idx3-ubyte[.gz]`` and the other three.
      verify: check the sha256 of each file's uncompressed content against the
        canonical MNIST values (turn off for your own data in IDX format).

    Returns:
      ``Mnist`` with images uint8 ``[n, rows, cols]`` and labels uint8 ``[n]``.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    paths = {}
    for key, stem in MNIST_FILES.items():
        paths[key] = _find(data_dir, stem)
        if paths[key] is None:
            raise DataError(f"{data_dir}: missing {stem}.gz (or {stem})")
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
        for key, raw in raws.items():
            _check_sha256(raw, CANONICAL_SHA256[MNIST_FILES[key]], str(paths[key]))
    return Mnist(**arrays)


# --------------------------------------------------------------------------- download


def default_cache_dir() -> Path:
    """``$SAE_JAX_CACHE_DIR``, else ``~/.cache/sae_jax``; MNIST goes in its ``mnist/``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sae_jax")


def mnist_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloaded MNIST files live: ``<cache_dir or default_cache_dir()>/mnist``."""
    return Path(cache_dir or default_cache_dir()) / "mnist"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _progress_printer(name: str) -> Callable[[int, int, bool], None]:
    """A progress bar on a terminal's stderr; otherwise one line per finished file."""
    stream = sys.stderr
    tty = stream.isatty()

    def show(done: int, total: int, finished: bool) -> None:
        if tty:
            bar = ""
            if total:
                filled = 30 * done // total
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done // total:3d}% "
            stream.write(f"\r  {name:<28} {bar}{_size(done)}" + ("\n" if finished else ""))
        elif finished:
            stream.write(f"  downloaded {name} ({_size(done)})\n")
        stream.flush()

    return show


def _fetch(url: str, dest, timeout: float, progress) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "sae_jax"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while chunk := response.read(1 << 16):
            dest.write(chunk)
            done += len(chunk)
            progress(done, total, False)
        if total and done != total:
            raise http.client.IncompleteRead(b"", total - done)
        progress(done, total, True)


def download_file(
    url: str,
    path: Path,
    expected_sha256: str | None,
    *,
    timeout: float = 10.0,
    retries: int = 3,
    progress: bool = True,
) -> None:
    """Download ``url`` to ``path`` via a temporary file, verify it, then rename it.

    The content (gunzipped) must parse as IDX and, when ``expected_sha256`` is given,
    match that hash. On any failure nothing is left at ``path`` or beside it.
    Connection errors, timeouts and 5xx answers are retried ``retries`` times in
    all, with a short back-off; other HTTP errors are not.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    show = _progress_printer(path.name) if progress else (lambda *a: None)
    last_error = "no attempt made"
    for attempt in range(retries):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                _fetch(url, f, timeout, show)
            raw = _uncompressed(Path(tmp).read_bytes(), url)
            if expected_sha256 is not None:
                _check_sha256(
                    raw, expected_sha256, url, "downloaded content", "; nothing was saved"
                )
            parse_idx(raw, url)
            os.replace(tmp, path)
            return
        except urllib.error.HTTPError as e:
            last_error = f"HTTP {e.code} {e.reason}"
            if e.code < 500:
                break
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            if isinstance(e, http.client.IncompleteRead):
                reason = f"the connection closed {e.expected} bytes before the end of the file"
            last_error = str(reason)
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise DataError(
        f"cannot download {url} ({last_error}); with no network, point --data_dir at a "
        f"folder holding the four MNIST IDX files"
    )


def download_mnist(
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
    *,
    verify: bool = True,
    timeout: float = 10.0,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Fetch the four MNIST ``.gz`` files that are not yet in the cache.

    Args:
      cache_dir: the cache root (default ``default_cache_dir()``); files go to
        ``<cache_dir>/mnist``.
      mirror: base URL (default ``$SAE_JAX_MNIST_MIRROR``, else the mirror that
        tensorflow-datasets uses).
      verify: check the canonical content hashes.

    Returns:
      The folder holding the four files.
    """
    folder = mnist_cache_dir(cache_dir)
    base = (mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR).rstrip("/") + "/"
    for stem in MNIST_FILES.values():
        if _find(folder, stem) is None:
            download_file(
                base + f"{stem}.gz",
                folder / f"{stem}.gz",
                CANONICAL_SHA256[stem] if verify else None,
                timeout=timeout,
                retries=retries,
                progress=progress,
            )
    return folder


# --------------------------------------------------------------------------- tfds, sample


def load_tfds(data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Mnist:
    """MNIST through tensorflow-datasets' ``data_source`` (no TensorFlow needed).

    The examples come in the order of the prepared tensorflow-datasets files, which
    is not the canonical IDX order. Needs the ``tfds`` extra.

    Args:
      data_dir: tensorflow-datasets' data folder (default: its own default).
      download: let tensorflow-datasets download and prepare MNIST if needed.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "tensorflow-datasets is not installed (pip install 'sae-jax[tfds]')"
        ) from None
    try:
        splits = tfds.data_source(
            "mnist", split=["train", "test"], data_dir=data_dir, download=download
        )
    except Exception as e:  # tfds raises many kinds; report them as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tensorflow-datasets could not load mnist: {first}") from None
    arrays = []
    for source in splits:
        records = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(r["image"]).reshape(28, 28) for r in records])
        labels = np.asarray([r["label"] for r in records])
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError("tensorflow-datasets mnist: labels outside 0..9")
        arrays += [images.astype(np.uint8), labels.astype(np.uint8)]
    return Mnist(*arrays)


def tfds_prepared(data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether tensorflow-datasets is installed and holds a prepared MNIST."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # it warns about every folder it finds missing
    try:
        import tensorflow_datasets as tfds

        return bool(tfds.builder("mnist", data_dir=data_dir).is_prepared())
    except Exception:  # not installed, or no usable copy: this source is unavailable
        return False
    finally:
        absl_logger.setLevel(level)


def load_sample() -> Mnist:
    """The bundled sample: the first 1,000 training and 500 test MNIST digits."""
    with np.load(SAMPLE_PATH) as f:
        return Mnist(*(f[key] for key in ARRAYS))


def write_sample(mnist: Mnist, path: str | os.PathLike[str]) -> None:
    """Save the first ``SAMPLE_SIZES`` training / test examples as a compressed ``.npz``."""
    np.savez_compressed(path, **mnist.head(*SAMPLE_SIZES)._asdict())


# --------------------------------------------------------------------------- one entry


def load_mnist(
    source: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
    verify: bool = True,
    need: tuple[int | None, int | None] = (None, None),
    progress: bool = True,
    log: Log = print,
) -> Mnist:
    """Load MNIST from ``source``.

    Sources:
      ``idx``: the four IDX files in ``data_dir``.
      ``download``: the cache, filled from the mirror where files are missing.
      ``tfds``: tensorflow-datasets (``data_dir`` is then its data folder).
      ``sample``: the bundled 1,000 / 500 digits.
      ``auto``: ``data_dir`` if it holds the files, then the bundled sample when
        ``need`` (training, test examples; None: all) fits in it, then the cache,
        then a prepared tensorflow-datasets copy, then a download.

    Paths are relative to the current directory, with ``~`` expanded.

    Returns:
      ``Mnist`` (uint8 images ``[n, 28, 28]``, labels ``[n]``); which source was used
      is passed to ``log`` and kept in ``Mnist.source``.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose from {', '.join(SOURCES)}")
    data_dir = user_path(data_dir) if data_dir is not None else None
    cache_dir = user_path(cache_dir) if cache_dir is not None else None

    def found(what: str, mnist: Mnist) -> Mnist:
        log(f"MNIST: {what}")
        return mnist._replace(source=what)

    if source == "idx":
        if data_dir is None:
            raise DataError("the idx source needs a data directory (--data_dir)")
        return found(f"IDX files in {data_dir}", load_idx_dir(data_dir, verify))
    if source == "tfds":
        return found(
            f"tensorflow-datasets{f' in {data_dir}' if data_dir else ''}", load_tfds(data_dir)
        )
    if source == "sample":
        return found(f"bundled sample {SAMPLE_PATH.name}", load_sample())
    if source == "auto":
        cache = mnist_cache_dir(cache_dir)
        if has_idx_files(data_dir):
            return load_mnist("idx", data_dir, verify=verify, log=log)
        if data_dir is not None:
            log(f"MNIST: no IDX files in {data_dir}, looking elsewhere")
        if None not in need and need[0] <= SAMPLE_SIZES[0] and need[1] <= SAMPLE_SIZES[1]:
            return load_mnist("sample", log=log)
        if has_idx_files(cache):
            return load_mnist("idx", cache, verify=verify, log=log)
        if tfds_prepared():
            return load_mnist("tfds", log=log)
    folder = download_mnist(cache_dir, mirror, verify=verify, progress=progress)
    return found(
        f"IDX files in the cache {folder} (downloaded where missing)", load_idx_dir(folder, verify)
    )
