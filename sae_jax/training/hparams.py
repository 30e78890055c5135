"""What may differ between the models of one sweep or search: one pytree per model.

``hparams_of(config)`` reads every value that vmapped models may hold apart into an
``HParams``; the losses, the optimizers and dropout read these leaves and nothing
else of the config's numbers. A sweep is a list of configs that differ only in these
values (``check_models``): their pytrees are stacked with a leading model axis
(``stack``); a single run is the pytree of its one config, through the same stages.

``SWEEPABLE`` says once what a sweep or a search may vary by name: how a value is
written into a config (for every pretraining layer at once), whether it changes
pretraining (models that agree in those share one pretraining), and when a value
would change nothing, which is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np

from sae_jax.config import Config, LayerConfig
from sae_jax.errors import ConfigError

# The loss terms of a pretraining layer that a weight switches on.
TERMS = ("beta", "l1", "contractive", "weight_decay")


class LayerHParams(NamedTuple):
    """One pretraining layer's values: its loss terms, its noise level (0: no
    corruption, whatever the kind) and its optimizer's learning rate; scalars, or
    ``[models]`` arrays in a sweep."""

    rho: Any
    beta: Any
    l1: Any
    contractive: Any
    weight_decay: Any
    noise_level: Any
    learning_rate: Any


class HParams(NamedTuple):
    """Every value of a ``Config`` that vmapped models may hold apart."""

    layers: tuple[LayerHParams, ...]
    softmax_learning_rate: Any
    finetune_learning_rate: Any
    input_keep: Any
    hidden_keep: Any

    @property
    def pretraining(self) -> tuple[Any, ...]:
        """What pretraining and the softmax stage read (the rest is fine-tuning's)."""
        return self.layers, self.softmax_learning_rate

    @property
    def dropout(self) -> dict[str, Any]:
        """Fine-tuning's keep probabilities, as ``classifier_loss`` takes them."""
        return {"input_keep": self.input_keep, "hidden_keep": self.hidden_keep}


def layer_hparams(layer: LayerConfig) -> LayerHParams:
    """The values of one layer, as float32 scalars."""
    values = [getattr(layer, name) for name in LayerHParams._fields[:-1]]
    return LayerHParams(*np.asarray([*values, layer.optimizer.learning_rate], np.float32))


def hparams_of(config: Config) -> HParams:
    """The ``HParams`` of ``config``: float32 scalars."""
    return HParams(
        tuple(layer_hparams(layer) for layer in config.layers),
        np.float32(config.softmax_optimizer.learning_rate),
        np.float32(config.finetune_optimizer.learning_rate),
        np.float32(config.finetune_input_keep),
        np.float32(config.finetune_hidden_keep),
    )


def stack(configs: Sequence[Config]) -> HParams:
    """The ``HParams`` of each config, stacked: every leaf ``[models]``."""
    trees = [hparams_of(c) for c in configs]
    return jax.tree.map(lambda *values: np.asarray(values, np.float32), *trees)


def pretraining_rows(hp: HParams) -> np.ndarray:
    """``[models, values]``: each model's pretraining values (``HParams.pretraining``)."""
    columns = [np.asarray(v) for v in jax.tree.leaves(hp.pretraining)]
    return np.stack(columns, axis=1).astype(np.float64)


def structure(config: Config) -> Config:
    """``config`` with every ``HParams`` value set to one constant: what the models of
    one sweep must share (shapes, loop lengths, kinds of loss and noise, seeds aside)."""
    zero: dict[str, Any] = {name: 0.0 for name in LayerHParams._fields[:-1]}
    layers = tuple(
        dataclasses.replace(layer, **zero, optimizer=_rate(layer.optimizer, 1.0))
        for layer in config.layers
    )
    return config.replace(
        layers=layers,
        seed=0,
        softmax_optimizer=_rate(config.softmax_optimizer, 1.0),
        finetune_optimizer=_rate(config.finetune_optimizer, 1.0),
        finetune_input_keep=1.0,
        finetune_hidden_keep=1.0,
    )


def active_terms(layers: Sequence[LayerConfig]) -> tuple[str, ...]:
    """The loss terms of ``TERMS`` whose weight is not 0 in any of ``layers`` (the same
    layer of every model of a sweep): those the loss computes."""
    return tuple(t for t in TERMS if any(getattr(layer, t) for layer in layers))


def uses_dropout(configs: Sequence[Config]) -> bool:
    """Whether any model fine-tunes with a keep probability below 1."""
    return any(min(c.finetune_input_keep, c.finetune_hidden_keep) < 1.0 for c in configs)


def _rate(optimizer: Any, rate: float) -> Any:
    return dataclasses.replace(optimizer, learning_rate=rate)


@dataclass(frozen=True)
class Sweepable:
    """A name that a sweep or a search may vary.

    ``write(config, value)`` is the config of a model with that value;
    ``pretraining`` whether it changes pretraining (or the softmax stage);
    ``unused(config)`` why it would change nothing for ``config`` (None: it acts).
    """

    name: str
    pretraining: bool
    write: Callable[[Config, float], Config]
    unused: Callable[[Config], str | None]


def _layer_value(name: str) -> Callable[[Config, float], Config]:
    """Write ``name`` into every pretraining layer (a noise level: every layer that has
    noise; a layer without keeps its level of 0)."""

    def write(config: Config, value: float) -> Config:
        def one(layer: LayerConfig) -> LayerConfig:
            if name == "noise_level" and layer.noise == "none":
                return layer
            change: dict[str, Any] = {name: float(value)}
            return dataclasses.replace(layer, **change)

        return config.replace(layers=tuple(one(layer) for layer in config.layers))

    return write


def _write_pretrain_rate(config: Config, value: float) -> Config:
    layers = tuple(
        dataclasses.replace(la, optimizer=_rate(la.optimizer, float(value))) for la in config.layers
    )
    return config.replace(layers=layers)


def _field_rate(field: str) -> Callable[[Config, float], Config]:
    return lambda config, value: config.replace(
        **{field: _rate(getattr(config, field), float(value))}
    )


def _field(field: str) -> Callable[[Config, float], Config]:
    return lambda config, value: config.replace(**{field: float(value)})


def _no_pretraining(config: Config) -> str | None:
    if all(layer.epochs == 0 for layer in config.layers):
        return "every pretraining layer has 0 epochs"
    return None


def _rho_unused(config: Config) -> str | None:
    if all(layer.beta == 0 for layer in config.layers):
        return "rho is the sparsity target of the KL term, and every layer's beta is 0"
    return _no_pretraining(config)


def _noise_unused(config: Config) -> str | None:
    if all(layer.noise == "none" for layer in config.layers):
        return (
            "every layer's noise is 'none': set --config.layers.N.noise (masking, gaussian "
            "or salt_and_pepper); a noise_level of 0 then means no corruption"
        )
    return _no_pretraining(config)


def _no_stage(field: str) -> Callable[[Config], str | None]:
    return lambda config: f"{field} is 0" if getattr(config, field) == 0 else None


def _sweepables() -> dict[str, Sweepable]:
    entries = [
        Sweepable("rho", True, _layer_value("rho"), _rho_unused),
        *(Sweepable(t, True, _layer_value(t), _no_pretraining) for t in TERMS),
        Sweepable("noise_level", True, _layer_value("noise_level"), _noise_unused),
        Sweepable("pretrain_learning_rate", True, _write_pretrain_rate, _no_pretraining),
        Sweepable(
            "softmax_learning_rate",
            True,
            _field_rate("softmax_optimizer"),
            _no_stage("softmax_epochs"),
        ),
        Sweepable(
            "finetune_learning_rate",
            False,
            _field_rate("finetune_optimizer"),
            _no_stage("finetune_epochs"),
        ),
        Sweepable("input_keep", False, _field("finetune_input_keep"), _no_stage("finetune_epochs")),
        Sweepable(
            "hidden_keep", False, _field("finetune_hidden_keep"), _no_stage("finetune_epochs")
        ),
    ]
    return {entry.name: entry for entry in entries}


SWEEPABLE: dict[str, Sweepable] = _sweepables()
SWEEP_NAMES = tuple(SWEEPABLE)
PRETRAINING_NAMES = tuple(name for name, s in SWEEPABLE.items() if s.pretraining)


def with_values(config: Config, values: Mapping[str, float]) -> Config:
    """``config`` with each named value of ``SWEEPABLE`` written in."""
    for name, value in values.items():
        if name not in SWEEPABLE:
            raise ConfigError(f"cannot sweep {name!r}; choose from {', '.join(SWEEP_NAMES)}")
        config = SWEEPABLE[name].write(config, value)
    return config


def model_config(
    config: Config, seeds: Sequence[int], hparams: Mapping[str, Sequence[float]] | None, i: int
) -> Config:
    """The config of model ``i`` of a sweep (``seeds`` and ``hparams``: one entry per
    model), for training it alone."""
    values = {name: v[i] for name, v in (hparams or {}).items()}
    return with_values(config, values).replace(seed=seeds[i])


def model_configs(
    config: Config, seeds: Sequence[int], hparams: Mapping[str, Sequence[float]] | None
) -> list[Config]:
    """The config of every model of a sweep (``model_config``), not yet validated.

    Raises:
      ValueError: for a list of ``hparams`` not as long as ``seeds``.
    """
    for name, values in (hparams or {}).items():
        if len(values) != len(seeds):
            raise ValueError(f"hparams[{name!r}] has {len(values)} values for {len(seeds)} seeds")
    return [model_config(config, seeds, hparams, i) for i in range(len(seeds))]


def check_used(configs: Sequence[Config], names: Sequence[str]) -> None:
    """Refuse a swept name that changes nothing for every one of ``configs``.

    Raises:
      ConfigError: naming the name and why.
    """
    for name in names:
        reasons = [SWEEPABLE[name].unused(c) for c in configs]
        if all(reasons):
            raise ConfigError(f"{name} changes nothing here: {reasons[0]}")


def check_models(
    config: Config,
    seeds: Sequence[int],
    hparams: Mapping[str, Sequence[float]] | None = None,
    used: bool = True,
) -> list[Config]:
    """The validated config of each model of a sweep (see ``model_config``).

    Raises:
      ConfigError: for a name not in ``SWEEP_NAMES``, the first model whose config
        does not validate, and (with ``used``) a name that changes nothing
        (``check_used``); the message names the field.
    """
    models = [model.validate() for model in model_configs(config, seeds, hparams)]
    if used:
        check_used(models, list(hparams or {}))
    return models


def check_sweep(configs: Sequence[Config]) -> None:
    """Raise ``ValueError`` unless ``configs`` differ only in ``HParams`` values and
    seeds, so that they train as one vmapped program."""
    first = structure(configs[0])
    for i, config in enumerate(configs[1:], 1):
        other = structure(config)
        if other != first:
            fields = [f.name for f in dataclasses.fields(first)]
            differ = [f for f in fields if getattr(first, f) != getattr(other, f)]
            raise ValueError(
                f"model {i} differs from model 0 in {', '.join(differ)}, which cannot vary "
                f"within one sweep (only {', '.join(SWEEP_NAMES)} and the seed can)"
            )
