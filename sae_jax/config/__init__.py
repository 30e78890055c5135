"""Configs: what an experiment is, before any array exists.

Modules, in import order:

- ``schema``: the frozen dataclasses ``Config``, ``LayerConfig``, ``OptimizerConfig``
  and their validation (``Config.validate`` raises ``ConfigError`` naming the field).
- ``presets``: the named presets (``PRESETS``, ``get_preset``), each with its source.
- ``files``: configs from a run's ``config.json`` or a ``get_config()`` Python file,
  and ``--config.<field>=<value>`` overrides.

Every name of ``schema`` and ``presets`` is importable from ``sae_jax.config``.
"""

from sae_jax.config.presets import *  # noqa: F403
from sae_jax.config.presets import __all__ as _preset_names
from sae_jax.config.schema import (
    ACTIVATIONS,
    BIAS_INITS,
    DECODER_ACTIVATIONS,
    DTYPES,
    MATMUL_PRECISIONS,
    NOISES,
    OPTIMIZERS,
    RECONSTRUCTIONS,
    REDUCTIONS,
    Config,
    LayerConfig,
    OptimizerConfig,
)
from sae_jax.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "BIAS_INITS",
    "DECODER_ACTIVATIONS",
    "DTYPES",
    "MATMUL_PRECISIONS",
    "NOISES",
    "OPTIMIZERS",
    "RECONSTRUCTIONS",
    "REDUCTIONS",
    "Config",
    "ConfigError",
    "LayerConfig",
    "OptimizerConfig",
    *_preset_names,
]
