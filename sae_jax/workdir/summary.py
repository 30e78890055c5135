"""What a run reports: ``summary.json``'s content, where the numbers came from, and
the figures."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from sae_jax.config import Config
from sae_jax.config.files import config_to_json
from sae_jax.corruption import corrupt
from sae_jax.data import Mnist
from sae_jax.files import write_text_atomic
from sae_jax.models import to_float
from sae_jax.training.pipeline import PipelineResult

FIGURES = ("filters.png", "reconstructions.png", "curves.png")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def provenance(mnist: Mnist) -> dict[str, Any]:
    """What a run's numbers depend on besides its config: the command line, the
    versions of Python and the libraries, and the data (source and sha256)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "command": shlex.join(sys.orig_argv),
        "cwd": os.getcwd(),
        "versions": versions,
        "data": {"source": mnist.source, "sha256": mnist.sha256()},
    }


def run_summary(
    config: Config, result: PipelineResult, dataset: Mnist, mesh: Mesh | None, pretrain: bool
) -> dict[str, Any]:
    """``summary.json``'s content, without ``total_wall_s`` and figures."""
    summary = {
        "test_accuracy": result.test.get("accuracy"),
        "test_loss": result.test.get("loss"),
        "config": config_to_json(config),
        "stages": [s.summary() for s in result.stages],
    }
    finetune = next((s for s in result.stages if s.name == "finetune"), None)
    judged = "validation_accuracy" if config.validation_examples else "test_accuracy"
    if finetune is not None and (config.validation_examples or result.test):
        summary[f"finetune_{judged}"] = [h[judged] for h in finetune.history]
    summary |= {
        "platform": jax.default_backend(),
        "devices": mesh.size if mesh is not None else 1,
        "processes": jax.process_count(),
        "pretrained": pretrain,
        "classifier": finetune is not None,
        **provenance(dataset),
    }
    if config.validation_examples and finetune is not None:
        summary["finetune_best_epoch"] = finetune.best_epoch
        summary["test_accuracy_before_finetune"] = result.test_before_finetune.get("accuracy")
    return summary


def write_figures(
    workdir: Path,
    config: Config,
    result: PipelineResult,
    x: np.ndarray | jax.Array,
    write: bool = True,
) -> list[Path]:
    """``curves.png`` in ``workdir`` and, when the inputs are square images,
    ``filters.png`` and ``reconstructions.png`` (of the first 10 of ``x``
    ``[n, features]``); the paths. With ``write`` False only the paths.

    Drawn from host copies of the params, so that one process of several can draw."""
    side = math.isqrt(config.input_features)
    square = side * side == config.input_features
    paths = [workdir / name for name in FIGURES if square or name == "curves.png"]
    if not write:
        return paths
    from sae_jax.workdir import figures  # matplotlib is imported only when figures are drawn

    figures.save_curves(result.stages, workdir / "curves.png")
    if not square:
        return paths
    first, layer = result.layers[0], config.layers[0]
    params = jax.device_get(first.params)  # the first layer's, replicated
    kernel = np.asarray(params["params"]["encoder"]["kernel"])
    figures.save_filters(kernel, workdir / "filters.png", shape=(side, side))
    round_trip = _round_trip(first.module, layer.noise)
    original, corrupted, reconstructed = jax.device_get(
        round_trip(params, np.asarray(x[:10]), np.uint32(config.seed), layer.noise_level)
    )
    figures.save_reconstructions(
        original,
        reconstructed,
        workdir / "reconstructions.png",
        corrupted=corrupted if layer.noise != "none" else None,
        shape=(side, side),
    )
    return paths


@lru_cache(maxsize=16)
def _round_trip(module: nn.Module, noise: str) -> Callable:
    """One program: images ``[k, features]`` scaled to [0, 1], corrupted with ``noise``
    (from the key of ``seed``) and reconstructed by the autoencoder ``module``."""

    def run(params: Any, x: jax.Array, seed: jax.Array, level: float):
        x = to_float(x)
        corrupted = corrupt(jax.random.PRNGKey(seed), x, noise, level)
        return x, corrupted, module.apply(params, corrupted, method=_decode_encode)

    return jax.jit(run)


def _decode_encode(module: nn.Module, x: jax.Array) -> jax.Array:
    return module.decode(module.encode(x))
