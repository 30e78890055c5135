"""Data: MNIST and the datasets like it, tensorflow-datasets, and your own arrays.

Edge modules: they read files and the network and return numpy arrays in a
``Dataset``; every problem with the data raises ``DataError`` with a one-line
message that names the file (or URL) at fault.

  ``base``      the ``Dataset`` they return (``DataError`` lives in ``sae_jax.errors``)
  ``idx``       IDX files (MNIST, Fashion-MNIST, KMNIST): read, write, verify
  ``download``  verified downloads of those into a cache
  ``tfds``      any tensorflow-datasets image dataset
  ``arrays``    your own ``.npz``, ``.npy`` or CSV file

``load_dataset`` (``load_mnist`` for MNIST) picks a source; ``DataSpec`` holds what
a user chooses and loads it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_jax.data.arrays import load_arrays, standardization, standardize
from sae_jax.data.base import ARRAYS, Dataset, Log, Mnist
from sae_jax.data.download import (
    CACHE_ENV,
    MIRROR_ENV,
    dataset_cache_dir,
    default_cache_dir,
    download_file,
    download_idx,
    download_mnist,
    mnist_cache_dir,
)
from sae_jax.data.idx import (
    CANONICAL_SHA256,
    DEFAULT_MIRROR,
    IDX_DATASETS,
    MNIST_FILES,
    IdxDataset,
    encode_idx,
    has_idx_files,
    idx_dataset,
    load_idx_dir,
    parse_idx,
    read_idx,
    write_idx,
)
from sae_jax.data.tfds import load_tfds, tfds_prepared
from sae_jax.errors import DataError
from sae_jax.files import user_path

SOURCES = ("auto", "idx", "download", "tfds", "sample")
SAMPLE_PATH = Path(__file__).parent.parent / "_data" / "mnist_sample.npz"
SAMPLE_SIZES = (1000, 500)  # training and test examples in the bundled sample


@dataclass(frozen=True)
class DataSpec:
    """Where the data come from: the arguments of ``load_dataset`` that a user
    chooses, or (``path``) a file of your own (see ``sae_jax.data.arrays``)."""

    source: str = "auto"
    data_dir: str | None = None
    cache_dir: str | None = None
    mirror: str | None = None
    verify: bool = True
    path: str | None = None
    label_column: str | None = None
    standardize: bool = False
    dataset: str = "mnist"

    def run_options(self) -> dict[str, Any]:
        """What of these settings changes the data a run trains on, where it differs
        from MNIST's defaults (the own data's path made absolute): a run records it."""
        options = {
            "path": str(user_path(self.path).resolve()) if self.path else None,
            "label_column": self.label_column,
            "standardize": self.standardize,
            "dataset": self.dataset,
        }
        defaults = {"path": None, "label_column": None, "standardize": False, "dataset": "mnist"}
        return {k: v for k, v in options.items() if v != defaults[k]}

    def with_run_options(self, saved: dict[str, Any]) -> DataSpec:
        """The inverse of ``run_options``: where this spec names MNIST by default (no
        ``path``, dataset ``mnist``), the data a run recorded (``saved``); and a run that
        standardized its inputs standardizes these too."""
        spec = self
        if self.path is None and self.dataset == "mnist":
            spec = dataclasses.replace(self, **saved)
        return dataclasses.replace(
            spec, standardize=spec.standardize or bool(saved.get("standardize"))
        )

    def load(self, need: tuple[int | None, int | None] = (None, None), log: Log = print) -> Dataset:
        """The data: your own file (``path``), else ``load_dataset`` with these settings;
        ``need``: training and test examples."""
        if self.path is not None:
            data = load_arrays(
                user_path(self.path), label_column=self.label_column, standardize=self.standardize
            )
            log(f"data: {data.source}")
            return data
        return load_dataset(
            self.dataset,
            self.source,
            self.data_dir,
            cache_dir=self.cache_dir,
            mirror=self.mirror,
            verify=self.verify,
            need=need,
            log=log,
        )


DEFAULT_DATA = DataSpec()  # the "auto" source with its defaults


def load_sample() -> Dataset:
    """The bundled sample: the first 1,000 training and 500 test MNIST digits."""
    with np.load(SAMPLE_PATH) as f:
        return Dataset(*(f[key] for key in ARRAYS))


def write_sample(mnist: Dataset, path: str | os.PathLike[str]) -> None:
    """Save the first ``SAMPLE_SIZES`` training / test examples as a compressed ``.npz``."""
    np.savez_compressed(path, **mnist.head(*SAMPLE_SIZES)._asdict())


def load_dataset(
    dataset: str = "mnist",
    source: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
    verify: bool = True,
    need: tuple[int | None, int | None] = (None, None),
    progress: bool = True,
    log: Log = print,
) -> Dataset:
    """Load ``dataset`` (``mnist``, ``fashion_mnist``, ``kmnist``; with the ``tfds``
    source any tensorflow-datasets image dataset) from ``source``.

    Sources:
      ``idx``: the four IDX files in ``data_dir``.
      ``download``: the cache, filled from the mirror where files are missing.
      ``tfds``: tensorflow-datasets (``data_dir`` is then its data folder).
      ``sample``: the bundled 1,000 / 500 MNIST digits (MNIST only).
      ``auto``: ``data_dir`` if it holds the files, then (MNIST) the bundled sample
        when ``need`` (training, test examples; None: all) fits in it, then the
        cache, then a prepared tensorflow-datasets copy, then a download.

    Paths are relative to the current directory, with ``~`` expanded.

    Returns:
      ``Dataset`` (from IDX files uint8 images ``[n, 28, 28]``, labels ``[n]``); which
      source was used is passed to ``log`` and kept in ``Dataset.source``.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose from {', '.join(SOURCES)}")
    if source != "tfds":
        idx_dataset(dataset)  # a known name, or a DataError listing them
    title = IDX_DATASETS[dataset].title if dataset in IDX_DATASETS else dataset
    data_dir = user_path(data_dir) if data_dir is not None else None
    cache_dir = user_path(cache_dir) if cache_dir is not None else None
    again: dict[str, Any] = dict(
        verify=verify, progress=progress, log=log, cache_dir=cache_dir, mirror=mirror
    )

    def found(what: str, data: Dataset) -> Dataset:
        log(f"{title}: {what}")
        return data._replace(source=what)

    if source == "idx":
        if data_dir is None:
            raise DataError("the idx source needs a data directory (--data_dir)")
        return found(f"IDX files in {data_dir}", load_idx_dir(data_dir, verify, dataset))
    if source == "tfds":
        where = f" in {data_dir}" if data_dir else ""
        return found(f"tensorflow-datasets{where}", load_tfds(dataset, data_dir))
    if source == "sample":
        if dataset != "mnist":
            raise DataError(f"--data_source=sample: the bundled sample is MNIST's, not {dataset}")
        return found(f"bundled sample {SAMPLE_PATH.name}", load_sample())
    if source == "auto":
        if has_idx_files(data_dir):
            return load_dataset(dataset, "idx", data_dir, **again)
        if data_dir is not None:
            log(f"{title}: no IDX files in {data_dir}, looking elsewhere")
        n_train, n_test = need
        small = (
            n_train is not None
            and n_test is not None
            and n_train <= SAMPLE_SIZES[0]
            and n_test <= SAMPLE_SIZES[1]
        )
        if dataset == "mnist" and small:
            return load_dataset(dataset, "sample", log=log)
        cache = dataset_cache_dir(cache_dir, dataset)
        if has_idx_files(cache):
            return load_dataset(dataset, "idx", cache, **again)
        if tfds_prepared(dataset):
            return load_dataset(dataset, "tfds", log=log)
    folder = download_idx(dataset, cache_dir, mirror, verify=verify, progress=progress)
    data = load_idx_dir(folder, verify, dataset)
    return found(f"IDX files in the cache {folder} (downloaded where missing)", data)


def load_mnist(
    source: str = "auto", data_dir: str | os.PathLike[str] | None = None, **options: Any
) -> Dataset:
    """``load_dataset("mnist", source, data_dir, **options)``: MNIST (uint8 images
    ``[n, 28, 28]``, labels ``[n]``)."""
    return load_dataset("mnist", source, data_dir, **options)


__all__ = [
    "ARRAYS",
    "CACHE_ENV",
    "CANONICAL_SHA256",
    "DEFAULT_DATA",
    "DEFAULT_MIRROR",
    "IDX_DATASETS",
    "MIRROR_ENV",
    "MNIST_FILES",
    "SAMPLE_PATH",
    "SAMPLE_SIZES",
    "SOURCES",
    "DataError",
    "DataSpec",
    "Dataset",
    "IdxDataset",
    "Mnist",
    "dataset_cache_dir",
    "default_cache_dir",
    "download_file",
    "download_idx",
    "download_mnist",
    "encode_idx",
    "has_idx_files",
    "idx_dataset",
    "load_arrays",
    "load_dataset",
    "load_idx_dir",
    "load_mnist",
    "load_sample",
    "load_tfds",
    "mnist_cache_dir",
    "parse_idx",
    "read_idx",
    "standardization",
    "standardize",
    "tfds_prepared",
    "write_idx",
    "write_sample",
]
