"""Sweeps from the command line: a grid of hyperparameter values times seeds, trained as
one ``vmap``-ed program per stage, reported as one row per grid point.

``sae-jax sweep`` (``sae_jax.cli.sweep``) parses flags and calls ``run_sweep``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.commands.prepare import hold_workdir, prepare
from sae_jax.config import Config
from sae_jax.config.files import config_to_json
from sae_jax.data import DEFAULT_DATA, DataSpec, Mnist
from sae_jax.errors import UserError
from sae_jax.files import stopped
from sae_jax.parallel import data_axis_devices, default_mesh, is_primary, unused_devices_line
from sae_jax.training.hparams import check_models
from sae_jax.training.pipeline import run_pipeline
from sae_jax.training.stage import StageRecord
from sae_jax.training.sweep import grid, sweep
from sae_jax.workdir.summary import provenance, write_json_atomic

NO_RESUME = "a sweep keeps no checkpoints: the same command starts it over"


def _test_error(accuracy: list[float]) -> dict[str, float]:
    """The mean and sample standard deviation (0 for one model) of the test error."""
    errors = 1.0 - np.asarray(accuracy, np.float64)
    std = float(errors.std(ddof=1)) if len(errors) > 1 else 0.0
    return {"test_error_mean": float(errors.mean()), "test_error_std": std}


def _per_point(
    points: list[dict[str, float]], seeds: list[int], accuracy: list[float]
) -> list[dict[str, Any]]:
    """The models of each grid point (value-major: ``len(seeds)`` in a row)."""
    n = len(seeds)
    return [
        {"hparams": point, "seeds": list(seeds), "test_accuracy": accuracy[p * n : (p + 1) * n]}
        | _test_error(accuracy[p * n : (p + 1) * n])
        for p, point in enumerate(points)
    ]


def _log_table(runs: list[dict[str, Any]], names: list[str], log: Callable[[str], None]) -> None:
    """One markdown row per grid point and pretraining choice, then the separate runs."""
    columns = ["pretraining", *names, "test error (mean +- sample sd over seeds)", "per seed"]
    log(f"| {' | '.join(columns)} | sweep wall (s) |")
    log("| --- " * (len(columns) + 1) + "|")
    for run in runs:
        for point in run["points"]:
            cells = ["yes" if run["pretrain"] else "no"]
            cells += [f"{point['hparams'][name]:g}" for name in names]
            cells.append(f"{point['test_error_mean']:.4f} +- {point['test_error_std']:.4f}")
            cells.append(" ".join(f"{1 - a:.4f}" for a in point["test_accuracy"]))
            log(f"| {' | '.join(cells)} | {run['wall_s']:.1f} |")
    for run in runs:
        if "separate_wall_s" in run:
            log(
                f"{'with' if run['pretrain'] else 'without'} pretraining: one sweep "
                f"{run['wall_s']:.1f}s vs {len(run['test_accuracy'])} separate runs "
                f"{run['separate_wall_s']:.1f}s: separate/sweep = "
                f"{run['separate_over_sweep']:.2f}"
            )


def run_sweep(
    config: Config,
    workdir: str | os.PathLike[str],
    *,
    seeds: list[int],
    hparams: dict[str, list[float]] | None = None,
    study: str | None = None,
    compare_separate: bool = False,
    data: DataSpec = DEFAULT_DATA,
    wait: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a grid of models in one compiled program per stage; write ``sweep.json``.

    Every combination of the ``hparams`` values (a list per name in ``SWEEP_NAMES``)
    is trained with every seed, value-major (see ``selection.grid``); every model's
    config is checked before the data is loaded. Prints one row per combination:
    the mean and sample standard deviation of the test error over the seeds.

    Args:
      study: ``"pretraining"`` also trains the same models without pretraining and
        reports the test error of both (Erhan et al., 2010).
      compare_separate: also train the models one after another, and report the
        time of both ways and their ratio.
      wait: if another run holds ``workdir`` (``run.lock``), wait for it to end
        instead of refusing.

    Returns:
      ``{"seeds", "hparams", "model_seeds", "model_hparams" (what ``sweep`` was
      given), "runs": [{"pretrain", "test_accuracy": [one per model],
      "test_error_mean", "test_error_std" (over all its models), "wall_s",
      "points": [{"hparams", "seeds", "test_accuracy", "test_error_mean",
      "test_error_std"}]}], ...}``.
    """
    if study not in (None, "pretraining"):
        raise UserError(f"--study={study}: the only study is 'pretraining'")
    model_seeds, model_hparams, points = grid(seeds, hparams)
    check_models(config, model_seeds, model_hparams)
    devices = data_axis_devices(len(model_seeds), config.batch_size)
    ready = prepare(config, workdir, data, log, devices)
    workdir, config, mnist = ready.workdir, ready.config, ready.data
    if mnist.train_labels is None or mnist.test_labels is None or mnist.test_images is None:
        raise UserError(
            f"{data.path}: a sweep compares test errors, so it needs labels and a test split "
            f"(y, x_test and y_test)"
        )
    log(
        f"{config.name}: {len(model_seeds)} models at once ({len(points)} grid points x "
        f"{len(seeds)} seeds), {len(mnist.train_images) - config.validation_examples} "
        f"training / {config.validation_examples} validation / {len(mnist.test_images)} test "
        f"examples, layers {config.layer_sizes}"
    )
    with hold_workdir(workdir, wait=wait, log=log):
        runs = []
        for pretrain in (True, False) if study == "pretraining" else (True,):
            log(f"-- {'with' if pretrain else 'without'} pretraining")
            try:
                run = _train_grid(config, mnist, model_seeds, model_hparams, pretrain, log)
                if compare_separate:
                    _train_separately(run, config, mnist, model_seeds, model_hparams)
            except KeyboardInterrupt as e:
                raise stopped(e, "during the sweep", NO_RESUME) from None
            run["points"] = _per_point(points, seeds, run["test_accuracy"])
            runs.append(run)
        summary = {
            "config": config_to_json(config),
            "seeds": list(seeds),
            "hparams": hparams or {},
            "model_seeds": model_seeds,
            "model_hparams": model_hparams,
            "runs": runs,
            "platform": jax.default_backend(),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            **provenance(mnist),
        }
        if is_primary():
            write_json_atomic(workdir / "sweep.json", summary)
    _log_table(runs, list(hparams or {}), log)
    return summary


def _arrays(mnist: Mnist) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """The training and test splits on the device (the pipeline holds out the config's
    validation examples from the first, as for a single run)."""
    return (
        (jnp.asarray(mnist.train_images), jnp.asarray(mnist.train_labels)),
        (jnp.asarray(mnist.test_images), jnp.asarray(mnist.test_labels)),
    )


def _train_grid(
    config: Config,
    mnist: Mnist,
    model_seeds: list[int],
    model_hparams: dict[str, list[float]],
    pretrain: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One ``sweep`` over every model; its accuracies, test error and wall time."""

    def on_epoch(stage: str, epoch: int, metrics: dict[str, Any], seconds: float) -> None:
        line = f"{stage:<10} epoch {epoch:>3} mean loss {np.nanmean(metrics['loss']):.6g}"
        for name in ("validation_accuracy", "test_accuracy"):
            if name in metrics:
                line += f" mean {name} {np.mean(metrics[name]):.4f}"
        log(f"{line} {seconds:.2f}s")

    start = time.perf_counter()
    mesh = default_mesh(models=len(model_seeds), batch_size=config.batch_size)
    if (unused := unused_devices_line(config.batch_size, mesh)) is not None:
        log(unused)
    if mesh is not None:
        shape = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
        log(f"{len(model_seeds)} models over {mesh.size} devices ({shape})")
    train, test = _arrays(mnist)
    result = sweep(
        config,
        train,
        test,
        seeds=model_seeds,
        hparams=model_hparams or None,
        pretrain=pretrain,
        on_epoch=on_epoch,
        mesh=mesh,
    )
    wall = time.perf_counter() - start
    accuracy = result.test["accuracy"]
    return {
        "pretrain": pretrain,
        "test_accuracy": accuracy,
        **_test_error(accuracy),
        "wall_s": wall,
        "diverged": result.diverged(),
        "stages": [_stage_json(record) for record in result.stages],
    }


def _stage_json(record: StageRecord) -> dict[str, Any]:
    """A stage of a sweep, per model: its loss per epoch, its best epoch (with a
    validation split), the epochs it trained and whether it diverged."""
    return {
        "name": record.name,
        "loss": [np.asarray(epoch["loss"], np.float64).tolist() for epoch in record.history],
        "best_epoch": record.best_epoch,
        "epochs_trained": record.epochs_trained,
        "diverged": record.diverged,
    }


def _train_separately(
    run: dict[str, Any],
    config: Config,
    mnist: Mnist,
    model_seeds: list[int],
    model_hparams: dict[str, list[float]],
) -> None:
    """Train the models of ``run`` one after another; add their accuracies and time."""
    start = time.perf_counter()
    train, test = _arrays(mnist)
    alone = [
        run_pipeline(model, train, test, pretrain=run["pretrain"]).test["accuracy"]
        for model in check_models(config, model_seeds, model_hparams)
    ]
    run["separate_wall_s"] = time.perf_counter() - start
    run["separate_test_accuracy"] = alone
    run["separate_over_sweep"] = run["separate_wall_s"] / run["wall_s"]
