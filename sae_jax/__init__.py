"""sae_jax: autoencoders and stacked autoencoders in JAX/Flax.

The public names below load lazily, so ``import sae_jax.losses`` (or
``sae_jax.corruption``) pulls in only ``jax``: never Flax, Orbax or data code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # config
    "Config": "sae_jax.config",
    "LayerConfig": "sae_jax.config",
    "OptimizerConfig": "sae_jax.config",
    "ConfigError": "sae_jax.config",
    "get_preset": "sae_jax.presets",
    "PRESETS": "sae_jax.presets",
    # models
    "Autoencoder": "sae_jax.models",
    "Classifier": "sae_jax.models",
    "Encoder": "sae_jax.models",
    "FrozenLayer": "sae_jax.models",
    "compose": "sae_jax.models",
    # engine
    "TrainState": "sae_jax.engine",
    "FitResult": "sae_jax.engine",
    "NonFiniteLossError": "sae_jax.engine",
    "fit": "sae_jax.engine",
    "make_optimizer": "sae_jax.optim",
    # recipes
    "layer_loss": "sae_jax.recipes",
    "classifier_loss": "sae_jax.recipes",
    "pretrain_layer": "sae_jax.recipes",
    "run_stage": "sae_jax.stages",
    "StageRecord": "sae_jax.stages",
    "encode_dataset": "sae_jax.recipes",
    "evaluate": "sae_jax.recipes",
    "run_pipeline": "sae_jax.pipeline",
    "sweep": "sae_jax.selection",
    "model_config": "sae_jax.selection",
    "grid": "sae_jax.selection",
    "search": "sae_jax.selection",
    "Range": "sae_jax.selection",
    "SearchResult": "sae_jax.selection",
    "pretrain_stack": "sae_jax.recipes",
    "PipelineResult": "sae_jax.pipeline",
    # configs as files
    "load_config": "sae_jax.config_files",
    "apply_overrides": "sae_jax.config_files",
    # edges
    "load_idx_dir": "sae_jax.data",
    "DataError": "sae_jax.data",
    "run_mnist": "sae_jax.experiment",
    "load_model": "sae_jax.trained",
    "RunStore": "sae_jax.checkpoint",
    "TrainedModel": "sae_jax.trained",
    "load_mnist": "sae_jax.data",
    "DataSpec": "sae_jax.data",
    "load_arrays": "sae_jax.data",
    "evaluate_saved": "sae_jax.saved",
    "encode_saved": "sae_jax.saved",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sae_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
