"""Greedy layer-wise pretraining: one autoencoder layer trained and frozen
(``pretrain_layer``), and a stack in which layer k learns to reconstruct the codes of
layers 1..k-1 (``pretrain_layers``, ``pretrain_stack``); each layer is one stage
(``sae_jax.training.stage.run_stage``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from sae_jax.config import Config, LayerConfig
from sae_jax.models import FrozenLayer, autoencoder, config_numerics, init_params
from sae_jax.training.evaluate import _model_axis, encode_dataset
from sae_jax.training.hparams import LayerHParams, active_terms, hparams_of, layer_hparams
from sae_jax.training.loop import Params, legacy_key, place_data
from sae_jax.training.objectives import layer_loss
from sae_jax.training.stage import Stage, StageCallback, StageRecord, StageStore, run_stage


def split2(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a key ``[2]`` (or keys ``[models, 2]``) in two, model by model."""
    keys = jax.vmap(jax.random.split)(key) if key.ndim == 2 else jax.random.split(key)
    return keys[..., 0, :], keys[..., 1, :]


def init_stage_params(module: nn.Module, key: jax.Array, in_features: int) -> Params:
    """``init_params`` for one key ``[2]`` or for each of ``[models, 2]`` keys, by one
    compiled program (compiled once per module and key shape)."""
    return _init_program(module, in_features, key.ndim == 2, False)(key)[0]


def split_init(module: nn.Module, key: jax.Array, in_features: int) -> tuple[Params, jax.Array]:
    """``split2(key)``'s first half initialises ``module`` (``init_stage_params``);
    returns the params and the second half, by one compiled program."""
    return _init_program(module, in_features, key.ndim == 2, True)(key)


@lru_cache(maxsize=256)
def _init_program(module: nn.Module, in_features: int, models: bool, split: bool) -> Callable:
    def init(key: jax.Array) -> tuple[Params, jax.Array | None]:
        init_key, rest = split2(key) if split else (key, None)
        one = lambda k: init_params(module, k, in_features)
        return (jax.vmap(one)(init_key) if models else one(init_key)), rest

    return jax.jit(init)


def pretrain_layer(
    layer: LayerConfig,
    in_features: int,
    x: jax.Array,
    *,
    key: jax.Array,
    batch_size: int,
    bias_init: str = "uniform",
    name: str = "pretrain",
    store: StageStore | None = None,
    on_epoch: StageCallback | None = None,
    mesh: Mesh | None = None,
    models: int | None = None,
    hparams: LayerHParams | None = None,
    terms: Sequence[str] | None = None,
    numerics: Mapping[str, Any] | None = None,
) -> tuple[FrozenLayer, StageRecord]:
    """Train one autoencoder layer on ``x`` ``[n, in_features]`` and freeze it.

    ``hparams`` (by default the layer's own, ``hparams.layer_hparams``) gives the loss
    terms' weights, the noise level and the learning rate; ``terms`` the penalties the
    loss computes (see ``layer_loss``). With ``models``, ``key`` is ``[models, 2]``,
    every ``hparams`` leaf ``[models]``, ``x`` is shared ``[n, in]`` or per model
    ``[models, n, in]``, and the frozen params carry a leading model axis.
    ``numerics``: the module's ``dtype``, ``param_dtype`` and ``precision``
    (``models.config_numerics`` of a config; by default float32 throughout).
    """
    module = autoencoder(layer, in_features, bias_init, **(numerics or {}))
    hparams = layer_hparams(layer) if hparams is None else hparams
    params, fit_key = split_init(module, legacy_key(key), in_features)
    stage = Stage(
        name,
        layer_loss(module, layer, terms, shared=True),  # the values come from hparams
        layer.optimizer,
        layer.epochs,
        batch_size,
        reduction=layer.batch_reduction,
        hparams=hparams,
        learning_rate=hparams.learning_rate,
    )
    params, record = run_stage(
        stage,
        params,
        (x,),
        key=fit_key,
        store=store,
        on_epoch=on_epoch,
        mesh=mesh,
        models=models,
        data_axis=_model_axis(x, models),
    )
    return FrozenLayer(module, params), record


def stage_keys(configs: Sequence[Config], models: bool) -> jax.Array:
    """One key per stage: each pretraining layer, the softmax stage, fine-tuning.

    ``[layers + 2, 2]`` for one config; with ``models`` ``[layers + 2, models, 2]``,
    model ``i``'s keys being those its own run with ``configs[i]`` would use. Made by
    one compiled program and returned as a host array, so picking a stage's key
    runs nothing on the device."""
    seeds = np.asarray([c.seed for c in configs], np.uint32)
    keys = np.asarray(_keys_program(len(configs[0].layers) + 2)(seeds))  # [models, k, 2]
    return keys.swapaxes(0, 1) if models else keys[0]


@lru_cache(maxsize=16)
def _keys_program(num_keys: int) -> Callable:
    def keys(seed: jax.Array) -> jax.Array:
        return jax.random.split(jax.random.PRNGKey(seed), num_keys)

    return jax.jit(jax.vmap(keys))


def pretrain_layers(
    configs: Sequence[Config],
    x: jax.Array,
    keys: jax.Array,
    hparams: tuple[LayerHParams, ...],
    common: dict[str, Any],
) -> tuple[list[FrozenLayer], list[StageRecord], jax.Array]:
    """Greedy layer-wise pretraining: layer k trains on the codes of layers 1..k-1.

    ``configs`` are the models' (one for a single run), ``hparams`` one
    ``LayerHParams`` per layer. Returns the frozen layers, their stage records and the
    top layer's codes of ``x`` (``[n, features]``, or ``[models, n, features]``)."""
    config, models = configs[0], bool(common["models"])
    layers: list[FrozenLayer] = []
    records: list[StageRecord] = []
    codes, in_features = x, config.input_features
    for i, layer in enumerate(config.layers):
        if layers:
            codes = encode_dataset(layers[-1:], codes, config.eval_batch_size, models)
        frozen, record = pretrain_layer(
            layer,
            in_features,
            codes,
            key=keys[i],
            bias_init=config.bias_init,
            numerics=config_numerics(config),
            name=f"pretrain_{i + 1}",
            hparams=hparams[i],
            terms=active_terms([c.layers[i] for c in configs]),
            **common,
        )
        layers.append(frozen)
        records.append(record)
        in_features = layer.features
    return layers, records, encode_dataset(layers[-1:], codes, config.eval_batch_size, models)


def pretrain_stack(
    config: Config,
    x: jax.Array | np.ndarray,
    *,
    on_epoch: StageCallback | None = None,
    store: StageStore | None = None,
    mesh: Mesh | None = None,
) -> tuple[list[FrozenLayer], list[StageRecord]]:
    """Greedy layer-wise pretraining of ``config``'s stack on unlabelled images alone.

    The same stages, keys and results as the pretraining part of ``run_pipeline``
    with the same config (stages ``pretrain_1`` ... ``pretrain_k``); for data
    without labels, or features without a classifier.

    Args:
      config: a validated ``Config`` (its softmax and fine-tuning fields are unused).
      x: images ``[n, input_features]``, uint8 or float.
      on_epoch, store, mesh: as for ``run_pipeline``.

    Returns:
      The frozen layers (bottom first; ``encode_dataset`` gives their codes) and one
      ``StageRecord`` per layer.
    """
    if x.ndim != 2 or x.shape[1] != config.input_features or x.shape[0] == 0:
        raise ValueError(
            f"train images: expected [n, {config.input_features}] with n >= 1; "
            f"got shape {tuple(x.shape)}"
        )
    common = {
        "batch_size": config.batch_size,
        "store": store,
        "on_epoch": on_epoch,
        "mesh": mesh,
        "models": None,
    }
    keys = stage_keys([config], models=False)
    hparams = hparams_of(config).layers
    layers, records, _ = pretrain_layers([config], place_data(x, mesh), keys, hparams, common)
    return layers, records
