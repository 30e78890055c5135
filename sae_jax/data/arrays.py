"""Your own data: arrays from an ``.npz``, ``.npy`` or CSV file.

Formats:
  ``.npz``: arrays ``x`` (images ``[n, ...]``), optional ``y`` (integer labels
  ``[n]``), optional ``x_test`` and ``y_test``.
  ``.npy``: one array, the training images ``[n, ...]`` (no labels).
  ``.csv``: one example a row, numbers only, an optional header row; the label
  column, if any, is named by ``label_column`` (a header name, or a 0-based index).

Images of any shape are flattened to ``[n, features]``. uint8 pixels are scaled to
``[0, 1]`` on the device; floats must already be in ``[0, 1]`` unless standardized
(see ``standardization``). A CSV whose values are all integers in 0..255 is read as
uint8 pixels. Every problem raises ``DataError`` naming the file and what is wrong.
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path

import numpy as np

from sae_jax.data.base import Dataset
from sae_jax.errors import DataError

NPZ_ARRAYS = ("x", "y", "x_test", "y_test")
FORMATS = (".npz", ".npy", ".csv")


def load_arrays(
    path: str | os.PathLike[str],
    *,
    label_column: str | None = None,
    standardize: bool = False,
) -> Dataset:
    """Load a user's own data (see the module's docstring for the formats).

    Args:
      path: the file; its suffix names the format.
      label_column: for CSV, the column holding the labels (header name or index).
      standardize: the images will be standardized, so any finite numbers are allowed
        (otherwise uint8, or floats in ``[0, 1]``).

    Returns:
      ``Dataset`` with images ``[n, features]`` (uint8 or float32), labels int32 ``[n]``
      or None, and the test split (None when the file has none).
    """
    path = Path(path).expanduser()
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: unknown format {path.suffix!r}; use {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if label_column is not None and path.suffix != ".csv":
        raise DataError(f"--label_column={label_column}: only for CSV files, not {path.name}")
    try:
        if path.suffix == ".npz":
            arrays = _npz(path)
        elif path.suffix == ".npy":
            arrays = {"x": np.load(path, allow_pickle=False)}
        else:
            arrays = _csv(path, label_column)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read it as {path.suffix} ({e})") from None
    x = _images(arrays["x"], f"{path}: x", standardize)
    y = _labels(arrays.get("y"), len(x), f"{path}: y")
    x_test = y_test = None
    if "x_test" in arrays:
        x_test = _images(arrays["x_test"], f"{path}: x_test", standardize)
        if x_test.shape[1] != x.shape[1]:
            raise DataError(
                f"{path}: x_test has {x_test.shape[1]} features per example, x has {x.shape[1]}"
            )
        y_test = _labels(arrays.get("y_test"), len(x_test), f"{path}: y_test")
    if (y is None) != (y_test is None) and x_test is not None:
        raise DataError(f"{path}: labels for one split only: give both y and y_test, or neither")
    return Dataset(x, y, x_test, y_test, source=f"{path.suffix[1:]} file {path}")


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        names = list(f.keys())
        unknown = [name for name in names if name not in NPZ_ARRAYS]
        if unknown:
            raise DataError(
                f"{path}: unknown array {unknown[0]!r}; expected x, and optionally y, "
                f"x_test, y_test"
            )
        if "x" not in names:
            raise DataError(f"{path}: no array 'x' (the training images); it holds {names}")
        if "y_test" in names and "x_test" not in names:
            raise DataError(f"{path}: y_test without x_test")
        return {name: f[name] for name in names}


def _csv(path: Path, label_column: str | None) -> dict[str, np.ndarray]:
    """Rows of numbers, an optional header; the label column split off as ``y``."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        numbered = [(reader.line_num, row) for row in reader if row]  # blank lines skipped
    if not numbered:
        raise DataError(f"{path}: empty CSV file")
    header = None
    if not all(_is_number(v) for v in numbered[0][1]):
        header, numbered = [name.strip() for name in numbered[0][1]], numbered[1:]
    rows = [row for _, row in numbered]
    width = len(header) if header is not None else len(rows[0])
    for line, row in numbered:
        if len(row) != width:
            raise DataError(f"{path}: line {line} has {len(row)} values, expected {width}")
        bad = next((v for v in row if not _is_number(v)), None)
        if bad is not None:
            raise DataError(f"{path}: line {line}: {bad!r} is not a number")
    if not rows:
        raise DataError(f"{path}: no examples (only a header)")
    values = np.asarray(rows, np.float64)
    if label_column is None:
        return {"x": _maybe_pixels(values)}
    column = _column(label_column, header, width, path)
    return {"x": _maybe_pixels(np.delete(values, column, axis=1)), "y": values[:, column]}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _column(label_column: str, header: list[str] | None, width: int, path: Path) -> int:
    if header is not None and label_column in header:
        return header.index(label_column)
    if label_column.isdigit() and int(label_column) < width:
        return int(label_column)
    names = f"its columns are {', '.join(header[:5])}..." if header else "it has no header"
    raise DataError(f"{path}: no label column {label_column!r} ({names}; or give an index)")


def _maybe_pixels(values: np.ndarray) -> np.ndarray:
    """CSV values that are all integers in 0..255 (some above 1) as uint8 pixels."""
    whole = np.all(np.isfinite(values)) and np.all(values == np.round(values))
    if whole and values.min() >= 0 and 1 < values.max() <= 255:
        return values.astype(np.uint8)
    return values


def _images(x: np.ndarray, name: str, standardize: bool) -> np.ndarray:
    """``x`` ``[n, ...]`` flattened to ``[n, features]``, checked, uint8 or float32."""
    if x.ndim < 2 or x.shape[0] == 0 or x.size == 0:
        raise DataError(f"{name}: expected examples [n, ...] with n >= 1, got shape {x.shape}")
    x = x.reshape(len(x), -1)
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{name}: expected numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.integer) and not standardize:
        raise DataError(
            f"{name}: {x.dtype} values; pass uint8 pixels (0..255), floats in [0, 1], "
            f"or --standardize"
        )
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{name}: {x[row, col]} at example {row}, feature {col}")
    if not standardize and (x.min() < 0 or x.max() > 1):
        got = f"max {x.max():g}" if x.max() > 1 else f"min {x.min():g}"
        raise DataError(
            f"{name}: float values must be in [0, 1] (got {got}); scale them, or pass --standardize"
        )
    return x


def _labels(y: np.ndarray | None, n: int, name: str) -> np.ndarray | None:
    """Integer labels ``[n]`` >= 0 as int32 (floats only when whole numbers)."""
    if y is None:
        return None
    if y.shape != (n,):
        raise DataError(f"{name}: expected one label per example, shape ({n},); got {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            i = int(np.argmax(~np.isfinite(y) | (y != np.round(y))))
            raise DataError(f"{name}: label {y[i]} at example {i} is not a whole number")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: expected integer labels, got dtype {y.dtype}")
    if y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(f"{name}: label {y[i]} at example {i} is negative")
    return y.astype(np.int32)


def standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of ``x`` ``[n, features]`` (float32
    ``[features]`` each; a constant feature's deviation is taken as 1)."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(0), x.std(0)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` as float32 ``[n, features]`` (uint8 pixels taken as they are)."""
    return ((np.asarray(x, np.float32) - mean) / std).astype(np.float32)
