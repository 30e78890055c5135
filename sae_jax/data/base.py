"""What every data source returns: a ``Dataset`` of numpy arrays, or a ``DataError``."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

Log = Callable[[str], None]
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")  # Dataset's arrays


class Dataset(NamedTuple):
    """A dataset as numpy arrays, and where it came from (``source``, as the loader
    reports it).

    From IDX files (MNIST, Fashion-MNIST, KMNIST): uint8 images ``[n, 28, 28]`` and
    uint8 labels ``[n]``. From tensorflow-datasets: uint8 images ``[n, H, W]`` or
    ``[n, H, W, C]``. From your own file (``sae_jax.data.arrays``): images
    ``[n, features]`` uint8 or float32, int32 labels or None (no labels), and None
    for a missing test split.
    """

    train_images: np.ndarray
    train_labels: np.ndarray | None
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    source: str = ""

    def head(self, n_train: int | None, n_test: int | None) -> Dataset:
        """The first ``n_train`` training and ``n_test`` test examples (None: all)."""
        cut = lambda a, n: None if a is None else a[:n]
        return self._replace(
            train_images=self.train_images[:n_train],
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


Mnist = Dataset  # the name it had when MNIST was the only dataset
