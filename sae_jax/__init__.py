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
    "ConfigError": "sae_jax.errors",
    "get_preset": "sae_jax.config.presets",
    "PRESETS": "sae_jax.config.presets",
    # models
    "Autoencoder": "sae_jax.models",
    "Classifier": "sae_jax.models",
    "Encoder": "sae_jax.models",
    "FrozenLayer": "sae_jax.models",
    "compose": "sae_jax.models",
    # training
    "TrainState": "sae_jax.training.loop",
    "FitResult": "sae_jax.training.loop",
    "NonFiniteLossError": "sae_jax.errors",
    "fit": "sae_jax.training.loop",
    "make_optimizer": "sae_jax.training.optim",
    "layer_loss": "sae_jax.training.objectives",
    "classifier_loss": "sae_jax.training.objectives",
    "pretrain_layer": "sae_jax.training.layerwise",
    "run_stage": "sae_jax.training.stage",
    "Stage": "sae_jax.training.stage",
    "StageRecord": "sae_jax.training.stage",
    "encode_dataset": "sae_jax.training.evaluate",
    "evaluate": "sae_jax.training.evaluate",
    "run_pipeline": "sae_jax.training.pipeline",
    "sweep": "sae_jax.training.sweep",
    "model_config": "sae_jax.training.sweep",
    "grid": "sae_jax.training.sweep",
    "search": "sae_jax.training.search",
    "Range": "sae_jax.training.search",
    "SearchResult": "sae_jax.training.search",
    "pretrain_stack": "sae_jax.training.layerwise",
    "PipelineResult": "sae_jax.training.pipeline",
    # configs as files
    "load_config": "sae_jax.config.files",
    "apply_overrides": "sae_jax.config.files",
    # data, what a run leaves, the trained model, the commands
    "load_idx_dir": "sae_jax.data",
    "DataError": "sae_jax.errors",
    "run_mnist": "sae_jax.commands.train",
    "load_model": "sae_jax.inference",
    "RunStore": "sae_jax.workdir.checkpoint",
    "TrainedModel": "sae_jax.inference",
    "load_mnist": "sae_jax.data",
    "DataSpec": "sae_jax.data",
    "load_arrays": "sae_jax.data",
    "evaluate_saved": "sae_jax.commands.saved",
    "encode_saved": "sae_jax.commands.saved",
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
