"""The train command as a library function: load, train with checkpoints, report,
write the summary (``run_mnist``).

``sae-jax train`` (``sae_jax.cli.train``) only parses flags and calls ``run_mnist``; tests and
notebooks call it directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TextIO

import jax
from jax.sharding import Mesh

from sae_jax.commands.prepare import hold_workdir, npz_bytes, prepare
from sae_jax.commands.progress import Progress
from sae_jax.config import Config
from sae_jax.data import DEFAULT_DATA, DataSpec, Mnist
from sae_jax.errors import UserError
from sae_jax.files import CHECKPOINT_EVERY, stopped, write_bytes_atomic
from sae_jax.parallel import (
    data_axis_devices,
    default_mesh,
    is_primary,
    layout_line,
    unused_devices_line,
)
from sae_jax.training.layerwise import pretrain_stack
from sae_jax.training.pipeline import PipelineResult, run_pipeline
from sae_jax.training.stage import StageCallback
from sae_jax.workdir.checkpoint import STANDARDIZATION, RunStore
from sae_jax.workdir.summary import provenance, run_summary, write_figures, write_json_atomic
from sae_jax.workdir.tensorboard import TensorBoard, check_available


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
    checkpoint_every: float = CHECKPOINT_EVERY,
) -> dict[str, Any]:
    """Run ``config`` on MNIST (or the data ``data`` names) with checkpoints in
    ``workdir``, resuming what is there.

    Writes to ``workdir`` (relative to the current directory, ``~`` expanded):
    orbax checkpoints, saved in the background, of an epoch every
    ``checkpoint_every`` seconds (0: every epoch), of the end of every stage, and of
    the epoch in progress on SIGINT or SIGTERM (see ``sae_jax.workdir.checkpoint``),
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
        ``<workdir>/tensorboard/`` (see ``sae_jax.workdir.tensorboard``; needs tensorboardX).

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
    ready = prepare(
        config, workdir, data, log, data_devices=data_axis_devices(batch_size=config.batch_size)
    )
    workdir, config, dataset = ready.workdir, ready.config, ready.data
    with hold_workdir(workdir, wait=wait, log=log):
        options: dict[str, Any] = {"pretrain": False} if not pretrain else {}
        if own := data.run_options():
            options["data"] = own
        store = RunStore(
            workdir, config, restart=restart, log=log, options=options or None,
            data=provenance(dataset)["data"], checkpoint_every=checkpoint_every,
        )  # fmt: skip
        if ready.standardization is not None and is_primary():
            mean, std = ready.standardization
            write_bytes_atomic(workdir / STANDARDIZATION, npz_bytes(mean=mean, std=std))
        board = TensorBoard(workdir / "tensorboard") if tensorboard and is_primary() else None
        with store, board or nullcontext():  # the store's end waits for its saves
            progress = Progress(config, log, progress_stream)
            on_epoch = progress if board is None else _both(progress, board.epoch)
            try:
                result, mesh = _train(
                    config, dataset, store, data_parallel, pretrain, log, on_epoch
                )
            except KeyboardInterrupt as e:
                store.close()  # what is in flight commits first: the message says what is saved
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
    mesh = default_mesh(force=data_parallel, batch_size=config.batch_size)
    log(
        f"{config.name}: {n_train} training / {n_val} validation / {n_test} test examples"
        f"{'' if y is not None else ' without labels (pretraining only)'}, layers "
        f"{config.layer_sizes}, {jax.default_backend()} x{mesh.size if mesh else 1}"
        f"{' (data parallel)' if mesh else ''}{_processes()}, workdir {store.workdir}"
    )
    if (unused := unused_devices_line(config.batch_size, mesh)) is not None:
        log(unused)
    if mesh is not None:
        log(layout_line(x.nbytes + (0 if y is None else y.nbytes), mesh))
    if y is None:
        if not pretrain:
            raise UserError("--no_pretraining: the data has no labels, so nothing to fine-tune")
        layers, stages = pretrain_stack(config, x, on_epoch=on_epoch, store=store, mesh=mesh)
        return PipelineResult(layers, None, {}, stages), mesh
    test = None
    if dataset.test_labels is not None:
        assert dataset.test_images is not None  # test labels come with test images
        test = (dataset.test_images, dataset.test_labels)
    result = run_pipeline(  # which holds out the validation split and places the splits
        config, (x, y), test, on_epoch=on_epoch, store=store, mesh=mesh, pretrain=pretrain
    )
    return result, mesh


def _processes() -> str:
    """``" over N processes"`` in a run of several processes, else nothing."""
    return f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""
