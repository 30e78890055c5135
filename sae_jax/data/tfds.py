"""Any tensorflow-datasets image dataset, through its ``data_source`` (no TensorFlow).

Needs the ``tfds`` extra (``pip install 'sae-jax[tfds]'``); Colab has it. The dataset
must have an ``image`` feature (uint8) and an integer ``label``, and ``train`` and
``test`` splits.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from sae_jax.data.base import Dataset
from sae_jax.errors import DataError


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "tensorflow-datasets is not installed (pip install 'sae-jax[tfds]')"
        ) from None
    return tfds


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_tfds(
    name: str = "mnist", data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> Dataset:
    """The ``train`` and ``test`` splits of tensorflow-datasets' dataset ``name``.

    The examples come in the order of the prepared tensorflow-datasets files (for
    MNIST, not the canonical IDX order).

    Args:
      name: a tensorflow-datasets name, e.g. ``mnist``, ``fashion_mnist``, ``cifar10``.
      data_dir: tensorflow-datasets' data folder (default: its own default).
      download: let tensorflow-datasets download and prepare the dataset if needed.

    Returns:
      ``Dataset``: uint8 images ``[n, H, W]`` (one channel) or ``[n, H, W, C]``, and
      uint8 (int32 beyond 255 classes) labels ``[n]``.
    """
    tfds = _tfds()
    try:
        splits = tfds.data_source(
            name, split=["train", "test"], data_dir=data_dir, download=download
        )
    except Exception as e:  # tfds raises many kinds; report them as one line
        raise DataError(f"tensorflow-datasets could not load {name}: {_first_line(e)}") from None
    arrays: list[np.ndarray] = []
    for split, source in zip(("train", "test"), splits, strict=True):
        records = [source[i] for i in range(len(source))]
        if not records:
            raise DataError(f"tensorflow-datasets {name}: the {split} split is empty")
        if not {"image", "label"} <= set(records[0]):
            raise DataError(
                f"tensorflow-datasets {name}: not an image classification dataset (its "
                f"features are {', '.join(sorted(records[0]))}; sae_jax needs image and label)"
            )
        images = np.stack([np.asarray(r["image"]) for r in records])
        if images.dtype != np.uint8:
            raise DataError(f"tensorflow-datasets {name}: images are {images.dtype}, not uint8")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        labels = np.asarray([r["label"] for r in records])
        if labels.size and labels.min() < 0:
            raise DataError(f"tensorflow-datasets {name}: negative labels in {split}")
        arrays += [images, labels.astype(np.uint8 if labels.max() < 256 else np.int32)]
    train_images, train_labels, test_images, test_labels = arrays
    return Dataset(train_images, train_labels, test_images, test_labels)


def tfds_prepared(name: str = "mnist", data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether tensorflow-datasets is installed and holds a prepared copy of ``name``."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # it warns about every folder it finds missing
    try:
        import tensorflow_datasets as tfds

        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except Exception:  # not installed, or no usable copy: this source is unavailable
        return False
    finally:
        absl_logger.setLevel(level)
