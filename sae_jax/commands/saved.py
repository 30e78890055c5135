"""Using a finished run: its test accuracy, and its codes of a dataset."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sae_jax.commands.prepare import load_data
from sae_jax.config.files import RUN_KEY, read_config
from sae_jax.data import DEFAULT_DATA, DataSpec
from sae_jax.errors import UserError
from sae_jax.files import user_path, write_bytes_atomic
from sae_jax.inference import load_model
from sae_jax.training.evaluate import evaluate


def saved_data(workdir: Path, data: DataSpec) -> DataSpec:
    """``data``, or, where it names MNIST by default, the data that the run in
    ``workdir`` recorded in its ``config.json`` (its own file and label column, or
    another dataset); a run that standardized its inputs standardizes these too."""
    saved = read_config(workdir / "config.json").get(RUN_KEY, {}).get("data", {})
    return data.with_run_options(saved)


def evaluate_saved(
    workdir: str | os.PathLike[str],
    *,
    data: DataSpec = DEFAULT_DATA,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """The test accuracy and loss of the model saved in ``workdir`` (on its own data,
    which ``saved_data`` finds, when the run had its own)."""
    workdir = user_path(workdir, "--workdir")
    model = load_model(workdir)
    config = model.config
    data = saved_data(workdir, data)
    _, dataset = load_data(config, data, log)
    if model.params is None or dataset.test_labels is None:
        what = ""
        if model.params is None and dataset.train_labels is None:
            what = "no classifier (its data had no labels)"
        elif model.params is None:
            what = (
                "no fine-tuned classifier yet (it stopped before fine-tuning ended; "
                "run the same command again to resume it)"
            )
        raise UserError(
            f"{workdir}: nothing to evaluate: the run has "
            + (what or f"no labelled test split in {data.path}")
        )
    x = model.inputs(dataset.test_images)
    metrics = evaluate(
        model.module, model.params, x, jnp.asarray(dataset.test_labels), config.eval_batch_size
    )
    log(
        f"{workdir}: test_accuracy {metrics['accuracy']:.4f} test_loss {metrics['loss']:.4f} "
        f"on {len(x)} test images"
    )
    return metrics


SPLITS = ("train", "test")


def encode_saved(
    workdir: str | os.PathLike[str],
    *,
    split: str = "test",
    depth: int | None = None,
    pretrained: bool | None = None,
    data: DataSpec = DEFAULT_DATA,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """The codes of a split of the data, as the run used it (its ``train_examples`` /
    ``test_examples``), by the stack saved in ``workdir``.

    Args:
      split: ``train`` (a validation split included) or ``test``.
      depth: the layer whose code to give (1-based; default the top).
      pretrained: True for the stack as pretrained, before fine-tuning; False for the
        fine-tuned one; None (default) for the fine-tuned one where there is one.
      data: where the images come from: the run's own data by default (see
        ``saved_data``), or any other file or dataset with images of the same size.

    Returns:
      float32 ``[n, features of layer depth]``.
    """
    if split not in SPLITS:
        raise UserError(f"--split={split}: choose from {', '.join(SPLITS)}")
    workdir = user_path(workdir, "--workdir")
    model = load_model(workdir)
    data = saved_data(workdir, data)
    _, dataset = load_data(model.config, data, log)
    x = dataset.train_images if split == "train" else dataset.test_images
    if x is None:
        raise UserError(f"--split=test: {data.path} has no test split (x_test)")
    if x.shape[1] != model.config.input_features:
        raise UserError(
            f"the images have {x.shape[1]} features, the model in {workdir} takes "
            f"{model.config.input_features}"
        )
    if pretrained is None:
        pretrained = model.params is None
    try:
        encode = model.encoder(depth) if pretrained else partial(model.encode, depth=depth)
        batch = model.config.eval_batch_size
        codes = [np.asarray(encode(x[i : i + batch])) for i in range(0, len(x), batch)]
    except ValueError as e:  # a depth out of range, or no such stack in this run
        raise UserError(f"--depth={depth}: {e}" if "depth" in str(e) else str(e)) from None
    stack = "pretrained" if pretrained else "fine-tuned"
    log(f"encoded the {split} split ({len(x)} examples) with the {stack} stack of {workdir}")
    return np.concatenate(codes).astype(np.float32)


# The errors of a place that cannot hold a new file (a user's mistake in --out).
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


def write_codes(path: str | os.PathLike[str], codes: np.ndarray) -> Path:
    """Write ``codes`` as an ``.npy`` file, atomically (no half-written file is left);
    ``UserError`` naming ``--out`` when it cannot be a new ``.npy`` file there."""
    out = user_path(path, "--out")
    if out.suffix != ".npy":
        raise UserError(f"--out={path}: name a .npy file")
    if not out.parent.is_dir():
        raise UserError(f"--out={path}: the folder {out.parent} does not exist")
    buffer = io.BytesIO()
    np.save(buffer, codes, allow_pickle=False)
    try:
        write_bytes_atomic(out, buffer.getvalue())
    except OSError as e:
        if e.errno not in NOT_WRITABLE:  # a full disk or an I/O error: not the user's
            raise
        raise UserError(f"--out={path}: cannot write it ({e.strerror or e})") from None
    return out
