"""The MNIST experiment as a library function: load, train, report, write the summary.

``experiments/mnist.py`` only parses flags and calls ``run_mnist``; tests and
notebooks call it directly.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
from jax.sharding import Mesh

from sae_jax.checkpoint import STANDARDIZATION, RunStore
from sae_jax.config import Config, ConfigError
from sae_jax.data import DEFAULT_DATA, IDX_DATASETS, DataSpec, Mnist, default_cache_dir
from sae_jax.data.arrays import standardization, standardize
from sae_jax.files import (
    CheckpointError,
    WorkdirLock,
    make_workdir,
    stopped,
    user_path,
    write_bytes_atomic,
)
from sae_jax.parallel import broadcast_int, default_mesh, initialize_distributed, is_primary
from sae_jax.pipeline import PipelineResult, run_pipeline
from sae_jax.progress import Progress
from sae_jax.recipes import pretrain_stack
from sae_jax.report import run_summary, write_figures, write_json_atomic
from sae_jax.stages import StageCallback
from sae_jax.tensorboard import TensorBoard, check_available

PLATFORMS = ("cpu", "gpu", "tpu")


class UserError(ValueError):
    """A mistake in what the user asked for (a flag, a path); the message names it."""


def select_platform(platform: str, distributed: dict[str, Any] | None = None) -> None:
    """Make ``platform`` (cpu, gpu or tpu) JAX's backend; call before any computation.

    ``cpu`` and ``tpu`` restrict JAX to that backend; ``gpu`` lets JAX pick its GPU
    plugin (CUDA or ROCm) and checks that it became the default backend. With
    ``distributed`` (arguments of ``parallel.initialize_distributed``, possibly
    empty), this process first joins a multi-host run.
    """
    if platform not in PLATFORMS:
        raise UserError(f"--platform={platform}: choose from {', '.join(PLATFORMS)}")
    if platform != "gpu":
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
            what = f"no {platform} backend here"
        raise UserError(f"--platform={platform}: {what} ({reason})") from None
    if backend != platform:
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
    flat = lambda images: None if images is None else images.reshape(len(images), -1)
    dataset = dataset._replace(
        train_images=flat(dataset.train_images), test_images=flat(dataset.test_images)
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
    config: Config, workdir: str | os.PathLike[str], data: DataSpec, log: Callable[[str], None]
) -> Prepared:
    """Check the config and the workdir, then load the data (before anything compiles)."""
    config.validate()
    if not str(workdir):
        raise UserError("--workdir is empty: name a folder")
    workdir = user_path(workdir)
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
        scale = lambda x: None if x is None else standardize(x, *stats)
        dataset = dataset._replace(
            train_images=scale(dataset.train_images), test_images=scale(dataset.test_images)
        )
    return Prepared(workdir, config, dataset, stats)


@contextmanager
def hold_workdir(workdir: Path, *, wait: bool, log: Callable[[str], None]) -> Iterator[None]:
    """Create ``workdir`` and hold its lock for the run: a context manager.

    Process 0 of a run of several processes holds the lock for all; when it cannot,
    every process raises ``CheckpointError`` (process 0 with the holder's name).
    """
    make_workdir(workdir)
    lock, refused = WorkdirLock(workdir, wait=wait, log=log), None
    if is_primary():
        try:
            lock.__enter__()
        except CheckpointError as e:
            refused = e
    if broadcast_int(refused is not None):
        raise refused or CheckpointError(f"--workdir={workdir}: process 0 could not lock it")
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def run_mnist(
    config: Config,
    workdir: str | os.PathLike[str],
    *,
    data: DataSpec = DEFAULT_DATA,
    restart: bool = False,
    figures: bool = True,
    data_parallel: bool = False,
    pretrain: bool = True,
    wait: bool = False,
    log: Callable[[str], None] = print,
    progress_stream: TextIO | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Run ``config`` on MNIST (or the data ``data`` names) with checkpoints in
    ``workdir``, resuming what is there.

    Writes to ``workdir`` (relative to the current directory, ``~`` expanded):
    orbax checkpoints after every epoch (see ``sae_jax.checkpoint``),
    ``metrics.jsonl``, ``summary.json``, ``run.lock`` and, with ``figures``,
    ``filters.png``, ``reconstructions.png`` and ``curves.png``. One run at a time
    holds a workdir: another is refused, or waits with ``wait``.

    Args:
      data_parallel: split every minibatch over all devices even when there is
        only one (with several devices this happens anyway).
      pretrain: False fine-tunes the stack from its random initialisation (the
        no-pretraining baseline; recorded in the workdir, so a pretrained run there
        is refused).
      progress_stream: a terminal to draw progress bars on; None prints one line
        per epoch through ``log``.
      tensorboard: also write every epoch's metrics, the hparams and the figures to
        ``<workdir>/tensorboard/`` (see ``sae_jax.tensorboard``; needs tensorboardX).

    Returns:
      The summary: ``test_accuracy`` (0..1), ``test_loss``, ``total_wall_s`` (this
      process), ``config``, ``stages`` (``{name, epochs, wall_s, final_loss}``, the
      wall time summed over every run that worked on the stage),
      ``finetune_test_accuracy`` (one per epoch; ``finetune_validation_accuracy``,
      ``finetune_best_epoch`` and ``test_accuracy_before_finetune`` instead with a
      validation split), ``pretrained``, ``platform``, ``devices``, and what makes
      the run traceable: ``command``, ``versions``, ``data`` (source and sha256).

    Raises:
      ConfigError, DataError, UserError, CheckpointError: for the user's mistakes.
      NonFiniteLossError: when a loss turns NaN or infinite.
      OSError: when the workdir cannot be written (a full disk), naming the file.
      Stopped: on SIGINT (or SIGTERM, see ``files.stop_on_sigterm``), saying where.
    """
    start = time.perf_counter()
    if tensorboard:
        check_available()  # a user mistake, found before anything is written
    ready = prepare(config, workdir, data, log)
    workdir, config, dataset = ready.workdir, ready.config, ready.data
    with hold_workdir(workdir, wait=wait, log=log):
        options = {"pretrain": False} if not pretrain else {}
        if own := data.run_options():
            options["data"] = own
        store = RunStore(workdir, config, restart=restart, log=log, options=options or None)
        if ready.standardization is not None and is_primary():
            mean, std = ready.standardization
            write_bytes_atomic(workdir / STANDARDIZATION, npz_bytes(mean=mean, std=std))
        board = TensorBoard(workdir / "tensorboard") if tensorboard and is_primary() else None
        with board or nullcontext():
            progress = Progress(config, log, progress_stream)
            on_epoch = progress if board is None else _both(progress, board.epoch)
            try:
                result, mesh = _train(
                    config, dataset, store, data_parallel, pretrain, log, on_epoch
                )
            except KeyboardInterrupt as e:
                raise stopped(e, store.where()) from None
            summary = run_summary(config, result, dataset, mesh, pretrain)
            summary["total_wall_s"] = time.perf_counter() - start
            paths = []
            if figures and pretrain:
                x = dataset.test_images if dataset.test_images is not None else dataset.train_images
                paths = write_figures(workdir, config, result, x, write=is_primary())
                summary["figures"] = [str(p) for p in paths]
            if is_primary():
                write_json_atomic(workdir / "summary.json", summary)
            if board is not None:
                results = {k: summary[k] for k in ("test_accuracy", "test_loss")}
                board.hparams(summary["config"], results)
                board.images(paths)
    accuracy = summary.get("test_accuracy")
    log(
        (f"test_accuracy {accuracy:.4f} " if accuracy is not None else "")
        + f"total {summary['total_wall_s']:.1f}s -> {workdir / 'summary.json'}"
    )
    return summary


def _both(first: StageCallback, second: StageCallback) -> StageCallback:
    """An ``on_epoch`` callback that calls ``first``, then ``second``."""

    def on_epoch(stage: str, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        first(stage, epoch, metrics, seconds)
        second(stage, epoch, metrics, seconds)

    return on_epoch


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The ``.npz`` file of ``arrays``, for ``write_bytes_atomic``."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _train(
    config: Config,
    dataset: Mnist,
    store: RunStore,
    data_parallel: bool,
    pretrain: bool,
    log: Callable[[str], None],
    on_epoch: StageCallback,
) -> tuple[PipelineResult, Mesh | None]:
    """Run the pipeline on the data, over all devices when there are several; the last
    ``config.validation_examples`` training images are the validation split. Data
    without labels is only pretrained (``pretrain_stack``)."""
    n_val = config.validation_examples
    x, y = dataset.train_images, dataset.train_labels
    n_train = len(x) - n_val
    n_test = 0 if dataset.test_images is None else len(dataset.test_images)
    mesh = default_mesh(force=data_parallel)
    log(
        f"{config.name}: {n_train} training / {n_val} validation / {n_test} test examples"
        f"{'' if y is not None else ' without labels (pretraining only)'}, layers "
        f"{config.layer_sizes}, {jax.default_backend()} x{mesh.size if mesh else 1}"
        f"{' (data parallel)' if mesh else ''}{_processes()}, workdir {store.workdir}"
    )
    if y is None:
        if not pretrain:
            raise UserError("--no_pretraining: the data has no labels, so nothing to fine-tune")
        layers, stages = pretrain_stack(config, x, on_epoch=on_epoch, store=store, mesh=mesh)
        return PipelineResult(layers, None, {}, stages), mesh
    validation = (x[n_train:], y[n_train:]) if n_val else None
    test = None
    if dataset.test_labels is not None:
        test = (dataset.test_images, dataset.test_labels)
    result = run_pipeline(  # which places the splits on the mesh
        config,
        (x[:n_train], y[:n_train]),
        test,
        on_epoch=on_epoch,
        store=store,
        mesh=mesh,
        validation=validation,
        pretrain=pretrain,
    )
    return result, mesh


def _processes() -> str:
    """``" over N processes"`` in a run of several processes, else nothing."""
    return f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""
