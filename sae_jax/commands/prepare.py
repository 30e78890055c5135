"""Preparing a run before anything compiles: the platform, the compilation cache, the
data (fitted to the config, standardized when asked) and the workdir's lock.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sae_jax.config import Config
from sae_jax.config.files import config_from_json, read_config
from sae_jax.data import IDX_DATASETS, DataSpec, Mnist, default_cache_dir
from sae_jax.data.arrays import standardization, standardize
from sae_jax.errors import CheckpointError, ConfigError, UserError
from sae_jax.files import (
    WorkdirLock,
    check_workdir,
    make_workdir,
    mark_workdir,
    user_path,
)
from sae_jax.parallel import broadcast_int, initialize_distributed, is_primary

PLATFORMS = ("auto", "cpu", "gpu", "tpu")


def select_platform(platform: str, distributed: dict[str, Any] | None = None) -> None:
    """Make ``platform`` (auto, cpu, gpu or tpu) JAX's backend; call before any
    computation.

    ``auto`` takes the backend JAX finds first (TPU, else GPU, else CPU; or what
    ``JAX_PLATFORMS`` says). ``cpu`` and ``tpu`` restrict JAX to that backend; ``gpu``
    lets JAX pick its GPU plugin (CUDA or ROCm) and checks that it became the default
    backend. With ``distributed`` (arguments of ``parallel.initialize_distributed``,
    possibly empty), this process first joins a multi-host run.
    """
    if platform not in PLATFORMS:
        raise UserError(f"--platform={platform}: choose from {', '.join(PLATFORMS)}")
    if platform in ("cpu", "tpu"):
        jax.config.update("jax_platforms", platform)
    try:
        if distributed is not None:
            initialize_distributed(**distributed)
        backend = jax.default_backend()
    except Exception as e:  # backend initialisation raises RuntimeError or worse
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if distributed is not None:
            what = "cannot join the multi-host run"
        else:
            what = "no backend here" if platform == "auto" else f"no {platform} backend here"
        raise UserError(f"--platform={platform}: {what} ({reason})") from None
    if platform != "auto" and backend != platform:
        raise UserError(f"--platform={platform}: no {platform} backend here (found {backend})")


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Keep compiled XLA programs on disk, so a second run skips compilation.

    ``path`` defaults to ``<cache root>/jax`` (cache root: ``$SAE_JAX_CACHE_DIR`` or
    ``~/.cache/sae_jax``). Every program is cached, however fast it compiled.
    """
    path = user_path(path) if path is not None else default_cache_dir() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--compilation_cache={path}: cannot create it ({e.strerror})") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def load_data(config: Config, data: DataSpec, log: Callable[[str], None]) -> tuple[Config, Mnist]:
    """The examples ``config`` asks for, images flattened to ``[n, features]``, and the
    config fitted to them: ``input_features`` from the images and, for your own
    labelled data, ``num_classes`` from the largest label."""
    dataset = data.load(need=(config.train_examples, config.test_examples), log=log)
    dataset = dataset.head(config.train_examples, config.test_examples)
    flat = lambda images: images.reshape(len(images), -1)
    test = dataset.test_images
    dataset = dataset._replace(
        train_images=flat(dataset.train_images), test_images=None if test is None else flat(test)
    )
    features = dataset.train_images.shape[1]
    labels = [y for y in (dataset.train_labels, dataset.test_labels) if y is not None]
    classes = max(int(y.max()) for y in labels) + 1 if labels else config.num_classes
    fitted = config.replace(input_features=features)
    if data.path is not None or data.dataset not in IDX_DATASETS:  # classes unknown
        fitted = fitted.replace(num_classes=classes)
    elif classes > config.num_classes:
        raise ConfigError(f"num_classes={config.num_classes} but the data has label {classes - 1}")
    if fitted != config:
        log(
            f"the data has {features} features and {fitted.num_classes} classes: "
            f"input_features={features}, num_classes={fitted.num_classes}"
        )
    return fitted, dataset


@dataclass(frozen=True)
class Prepared:
    """A run's checked inputs: its workdir, its config fitted to the data, the data
    (images ``[n, features]``, standardized when asked), and the standardization's
    per-feature ``(mean, std)`` (None when not standardized)."""

    workdir: Path
    config: Config
    data: Mnist
    standardization: tuple[np.ndarray, np.ndarray] | None = None


def prepare(
    config: Config,
    workdir: str | os.PathLike[str],
    data: DataSpec,
    log: Callable[[str], None],
    data_devices: int = 1,
) -> Prepared:
    """Check the config and the workdir, then load the data (before anything compiles).

    ``data_devices``: the size of the data axis of the mesh the run trains on (see
    ``parallel.data_axis_devices``), over which ``config.batch_size`` must divide.
    """
    config.validate()
    if config.batch_size % data_devices:
        raise UserError(
            f"--config.batch_size={config.batch_size} does not divide over the "
            f"{data_devices} devices of the mesh's data axis: use a multiple of {data_devices}"
        )
    if not str(workdir):
        raise UserError("--workdir is empty: name a folder")
    workdir = user_path(workdir, "--workdir")
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir={workdir}: exists and is not a directory")
    config, dataset = load_data(config, data, log)
    try:
        config.validate(num_train=len(dataset.train_images))
    except ConfigError as e:
        raise ConfigError(f"{e} (--config.batch_size, --config.validation_examples)") from None
    stats = None
    if data.standardize:
        first = config.layers[0]
        if (first.decoder_activation, first.reconstruction) != ("linear", "squared_error"):
            raise ConfigError(
                "--standardize: layers[0] reconstructs standardized values, which may be any "
                "real number: set --config.layers.0.decoder_activation=linear (and "
                "reconstruction=squared_error)"
            )
        fit = dataset.train_images[: len(dataset.train_images) - config.validation_examples]
        stats = standardization(fit)
        scale = lambda x: standardize(x, *stats)
        test = dataset.test_images
        dataset = dataset._replace(
            train_images=scale(dataset.train_images),
            test_images=None if test is None else scale(test),
        )
    return Prepared(workdir, config, dataset, stats)


@contextmanager
def hold_workdir(workdir: Path, *, wait: bool, log: Callable[[str], None]) -> Iterator[None]:
    """Create ``workdir``, claim it and hold its lock for the run: a context manager.

    A run writes only into a folder that is new, empty or a sae_jax run's (see
    ``files.check_workdir``; a folder that an earlier version's run left is one too).
    Process 0 of a run of several processes claims and holds the lock for all; when
    it cannot, every process raises ``CheckpointError`` (process 0 with the reason).
    """
    make_workdir(workdir)
    lock, refused = WorkdirLock(workdir, wait=wait, log=log), None
    if is_primary():
        try:
            check_workdir(workdir, earlier_run)  # before anything is written there
            lock.__enter__()
        except CheckpointError as e:
            refused = e
    if broadcast_int(refused is not None):
        raise refused or CheckpointError(f"--workdir={workdir}: process 0 could not lock it")
    try:
        if is_primary():
            mark_workdir(workdir)
        yield
    finally:
        lock.__exit__(None, None, None)


def earlier_run(path: Path) -> bool:
    """Whether ``path`` holds what a run of a version that left no mark wrote: a
    ``config.json``, ``sweep.json`` or ``search.json`` with a valid sae_jax config."""
    try:
        if (path / "config.json").is_file():
            read_config(path / "config.json")
            return True
        for name in ("sweep.json", "search.json"):
            if (path / name).is_file():
                config_from_json(json.loads((path / name).read_text())["config"]).validate()
                return True
    except Exception:  # not JSON, not a config: not a sae_jax run's file
        return False
    return False


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The ``.npz`` file of ``arrays``, for ``write_bytes_atomic``."""
    buffer = io.BytesIO()
    # numpy's stub lets **arrays reach savez's allow_pickle: bool (numpy >= 2.1)
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()
