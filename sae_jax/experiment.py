"""The MNIST experiment as a library function: load, train, report, write the summary.

``experiments/mnist.py`` only parses flags and calls ``run_mnist``; tests and
notebooks call it directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sae_jax.config import Config, ConfigError
from sae_jax.data import load_mnist
from sae_jax.recipes import run_pipeline

PLATFORMS = ("cpu", "gpu", "tpu")


class UserError(ValueError):
    """A mistake in what the user asked for (a flag, a path); the message names it."""


def select_platform(platform: str) -> None:
    """Make ``platform`` (cpu, gpu or tpu) JAX's backend; call before any computation.

    ``cpu`` and ``tpu`` restrict JAX to that backend; ``gpu`` lets JAX pick its GPU
    plugin (CUDA or ROCm) and checks that it became the default backend.
    """
    if platform not in PLATFORMS:
        raise UserError(f"--platform={platform}: choose from {', '.join(PLATFORMS)}")
    if platform != "gpu":
        jax.config.update("jax_platforms", platform)
    try:
        backend = jax.default_backend()
    except Exception as e:  # backend initialisation raises RuntimeError or worse
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--platform={platform}: no {platform} backend here ({reason})") from None
    if backend != platform:
        raise UserError(f"--platform={platform}: no {platform} backend here (found {backend})")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_epoch(
    stage: str, epoch: int, epochs: int, metrics: dict[str, float], seconds: float
) -> str:
    """One progress line, e.g. ``pretrain_1 epoch 3/10 loss 1234.5 (...) 2.31s``."""
    terms = " ".join(
        f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("loss", "test_accuracy")
    )
    line = f"{stage:<10} epoch {epoch:>3}/{epochs} loss {metrics['loss']:.6g}"
    if terms:
        line += f" ({terms})"
    if "test_accuracy" in metrics:
        line += f" test_accuracy {metrics['test_accuracy']:.4f}"
    return f"{line} {seconds:.2f}s"


def _stage_epochs(config: Config) -> dict[str, int]:
    epochs = {f"pretrain_{i + 1}": layer.epochs for i, layer in enumerate(config.layers)}
    epochs.update(softmax=config.softmax_epochs, finetune=config.finetune_epochs)
    return epochs


def run_mnist(
    config: Config,
    workdir: str | os.PathLike[str],
    *,
    data_source: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``config`` on MNIST and write ``workdir/summary.json``.

    The data come from ``sae_jax.data.load_mnist(data_source, data_dir, ...)``.

    Returns:
      The summary: ``test_accuracy`` (0..1), ``test_loss``, ``total_wall_s``,
      ``config``, ``stages`` (``{name, epochs, wall_s, final_loss}``),
      ``finetune_test_accuracy`` (one per epoch), ``platform``, ``devices``.

    Raises:
      ConfigError, DataError, UserError: for the user's mistakes.
      NonFiniteLossError: when a loss turns NaN or infinite.
    """
    start = time.perf_counter()
    config.validate()
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir={workdir}: exists and is not a directory")
    mnist = load_mnist(
        data_source,
        data_dir,
        cache_dir=cache_dir,
        mirror=mirror,
        verify=verify,
        need=(config.train_examples, config.test_examples),
        log=log,
    )
    features = int(np.prod(mnist.train_images.shape[1:]))
    if features != config.input_features:
        raise ConfigError(
            f"input_features={config.input_features} but the images have {features} pixels"
        )
    n_train, n_test = config.train_examples, config.test_examples
    x_train = mnist.train_images.reshape(len(mnist.train_images), -1)[:n_train]
    x_test = mnist.test_images.reshape(len(mnist.test_images), -1)[:n_test]
    config.validate(num_train=len(x_train))
    log(
        f"{config.name}: {len(x_train)} training / {len(x_test)} test images, "
        f"layers {[config.input_features, *(layer.features for layer in config.layers)]}, "
        f"{jax.default_backend()} x{jax.device_count()}"
    )
    train = (jax.device_put(x_train), jax.device_put(mnist.train_labels[:n_train]))
    test = (jax.device_put(x_test), jax.device_put(mnist.test_labels[:n_test]))
    epochs = _stage_epochs(config)

    def on_epoch(stage: str, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        log(format_epoch(stage, epoch, epochs[stage], metrics, seconds))

    result = run_pipeline(config, train, test, on_epoch=on_epoch)
    finetune = next(s for s in result.stages if s.name == "finetune")
    summary = {
        "test_accuracy": result.test["accuracy"],
        "test_loss": result.test["loss"],
        "total_wall_s": time.perf_counter() - start,
        "config": dataclasses.asdict(config),
        "stages": [s.summary() for s in result.stages],
        "finetune_test_accuracy": [h["test_accuracy"] for h in finetune.history],
        "platform": jax.default_backend(),
        "devices": jax.device_count(),
        "versions": {"jax": jax.__version__},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / "summary.json", summary)
    log(
        f"test_accuracy {summary['test_accuracy']:.4f} total {summary['total_wall_s']:.1f}s "
        f"-> {workdir / 'summary.json'}"
    )
    return summary
