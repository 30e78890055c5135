"""Recipes on top of ``fit``: the layer and classifier losses, encoding, evaluation
one pretrained layer and a greedily pretrained stack (each stage runs through
``sae_jax.stages.run_stage``).

Recipes take device arrays and callbacks; they never open files or print. Images
may be uint8 ``[n, features]`` (scaled to ``[0, 1]`` on the device, per batch) or
floating point.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from sae_jax import losses
from sae_jax.config import Config, LayerConfig
from sae_jax.corruption import corrupt
from sae_jax.engine import (
    LossFn,
    Params,
    map_batches,
    place_data,
)
from sae_jax.models import (
    Autoencoder,
    FrozenLayer,
    activation_fn,
    autoencoder,
    init_params,
    to_float,
)
from sae_jax.parallel import to_host
from sae_jax.stages import StageCallback, StageRecord, StageStore, run_stage

SWEEPABLE = ("rho", "beta", "l1", "contractive", "weight_decay", "noise_level")
# Fine-tuning's dropout keep probabilities (Config.finetune_input_keep / _hidden_keep).
DROPOUT = ("input_keep", "hidden_keep")
# What a sweep's ``hparams`` may name: the loss terms above, two learning rates and
# the dropout keep probabilities.
SWEEP_NAMES = (*SWEEPABLE, "pretrain_learning_rate", "finetune_learning_rate", *DROPOUT)
# The sweep names that change pretraining (the others change fine-tuning only).
PRETRAINING_HPARAMS = (*SWEEPABLE, "pretrain_learning_rate")


def layer_loss(module: Autoencoder, layer: LayerConfig) -> LossFn:
    """The pretraining loss of one autoencoder layer, ``(params, (x,), key) -> (loss, terms)``.

    ``x`` ``[batch, in]`` is corrupted with ``layer.noise`` (when not "none") before it
    is encoded; the reconstruction is always compared with the clean ``x``. The
    keyword ``hparams`` may override any of ``SWEEPABLE`` with a (traced) scalar.
    """
    reduce = jnp.sum if layer.batch_reduction == "sum" else jnp.mean

    def loss_fn(params: Params, batch: tuple[jax.Array, ...], key: jax.Array, hparams=None):
        hp = {name: getattr(layer, name) for name in SWEEPABLE} | (hparams or {})
        x = to_float(batch[0])
        h, z = module.apply(params, corrupt(key, x, layer.noise, hp["noise_level"]))
        if layer.reconstruction == "cross_entropy":
            rec = losses.bernoulli_cross_entropy(z, x)
        else:
            rec = losses.squared_error(activation_fn(layer.decoder_activation)(z), x)
        terms = {"reconstruction": layer.reconstruction_scale * reduce(rec)}  # x1.0 is exact
        swept = hparams or {}
        if layer.beta or "beta" in swept:
            terms["sparsity"] = hp["beta"] * losses.kl_sparsity(h, hp["rho"])
        if layer.l1 or "l1" in swept:
            terms["l1"] = hp["l1"] * reduce(losses.l1_activity(h))
        if layer.contractive or "contractive" in swept:
            kernel = params["params"]["encoder"]["kernel"]
            terms["contractive"] = hp["contractive"] * reduce(losses.contractive_penalty(h, kernel))
        if layer.weight_decay or "weight_decay" in swept:
            terms["weight_decay"] = hp["weight_decay"] * losses.l2_weight_decay(params)
        return sum(terms.values()), terms

    return loss_fn


def classifier_loss(
    module: nn.Module, weight_decay: float = 0.0, input_keep: float = 1.0, hidden_keep: float = 1.0
) -> LossFn:
    """Mean softmax cross-entropy (+ weight decay) of ``module``'s logits.

    ``(params, (x [batch, in], labels [batch]), key) -> (loss, terms)``. With a keep
    probability below 1 (or ``hparams`` naming one of ``DROPOUT``), the logits come
    from ``module.dropout_logits`` (a ``Classifier``) with the step's key.
    """

    def loss_fn(params: Params, batch: tuple[jax.Array, ...], key: jax.Array, hparams=None):
        x, y = batch
        swept = {k: v for k, v in (hparams or {}).items() if k in DROPOUT}
        keep = {"input_keep": input_keep, "hidden_keep": hidden_keep} | swept
        if swept or input_keep < 1.0 or hidden_keep < 1.0:
            logits = module.apply(params, to_float(x), key, **keep, method="dropout_logits")
        else:
            logits = module.apply(params, to_float(x))
        terms = {"cross_entropy": jnp.mean(losses.softmax_cross_entropy(logits, y))}
        if weight_decay:
            terms["weight_decay"] = weight_decay * losses.l2_weight_decay(params)
        return sum(terms.values()), terms

    return loss_fn


def _model_axis(x: jax.Array, models: Any) -> int | None:
    """0 when ``x`` carries a model axis (``[models, n, in]``), None when it is shared."""
    return 0 if models and x.ndim == 3 else None


@partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _encode(module, params: Params, x: jax.Array, batch_size: int, models: bool, x_axis):
    def one(p, xs):
        encode = lambda b: module.apply(p, to_float(b), method=Autoencoder.encode)
        return map_batches(encode, xs, batch_size)

    return jax.vmap(one, in_axes=(0, x_axis))(params, x) if models else one(params, x)


def encode_dataset(
    layers: list[FrozenLayer], x: jax.Array, batch_size: int, models: bool = False
) -> jax.Array:
    """The code of ``x`` ``[n, in]`` after ``layers`` (bottom first): ``[n, features]``.

    With ``models``, the layers' params carry a leading model axis and so does the
    result (``[models, n, features]``); ``x`` may be shared or per model.
    """
    for layer in layers:
        x = _encode(layer.module, layer.params, x, batch_size, models, _model_axis(x, models))
    return x


@partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _evaluate(
    module, params: Params, x: jax.Array, y: jax.Array, batch_size: int, models: bool, x_axis
):
    def one(p, xs):
        def batch_stats(batch):
            xb, yb = batch
            logits = module.apply(p, to_float(xb))
            return losses.softmax_cross_entropy(logits, yb), jnp.argmax(logits, -1) == yb

        ce, correct = map_batches(batch_stats, (xs, y), batch_size)
        return jnp.mean(correct), jnp.mean(ce)

    return jax.vmap(one, in_axes=(0, x_axis))(params, x) if models else one(params, x)


def evaluate(
    module: nn.Module,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    batch_size: int,
    models: bool = False,
) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of a classifier (or softmax head).

    Args:
      module: a Flax module mapping ``[batch, in]`` to logits ``[batch, classes]``.
      params: its params (with a leading model axis when ``models``).
      x: ``[n, in]`` inputs (or ``[models, n, in]``), ``batch_size`` rows at a time.
      y: ``[n]`` integer labels.

    Returns:
      ``{"accuracy": float in [0, 1], "loss": float}``; lists with ``models``.
    """
    x_axis = _model_axis(x, models)
    accuracy, loss = to_host(_evaluate(module, params, x, y, batch_size, models, x_axis))
    return {"accuracy": np.asarray(accuracy).tolist(), "loss": np.asarray(loss).tolist()}


def split2(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a key ``[2]`` (or keys ``[models, 2]``) in two, model by model."""
    keys = jax.vmap(jax.random.split)(key) if key.ndim == 2 else jax.random.split(key)
    return keys[..., 0, :], keys[..., 1, :]


def init_stage_params(module: nn.Module, key: jax.Array, in_features: int) -> Params:
    """``init_params`` for one key ``[2]`` or for each of ``[models, 2]`` keys."""
    if key.ndim == 2:
        return jax.vmap(lambda k: init_params(module, k, in_features))(key)
    return init_params(module, key, in_features)


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
    hparams: dict[str, Any] | None = None,
    learning_rate: Any = None,
) -> tuple[FrozenLayer, StageRecord]:
    """Train one autoencoder layer on ``x`` ``[n, in_features]`` and freeze it.

    With ``models``, ``key`` is ``[models, 2]``, ``x`` is shared ``[n, in]`` or per
    model ``[models, n, in]``, and the frozen params carry a leading model axis.
    """
    module = autoencoder(layer, in_features, bias_init)
    init_key, fit_key = split2(key)
    params, record = run_stage(
        name,
        layer_loss(module, layer),
        init_stage_params(module, init_key, in_features),
        layer.optimizer,
        (x,),
        epochs=layer.epochs,
        key=fit_key,
        batch_size=batch_size,
        store=store,
        on_epoch=on_epoch,
        mesh=mesh,
        models=models,
        data_axis=_model_axis(x, models),
        hparams=hparams,
        learning_rate=learning_rate,
    )
    return FrozenLayer(module, params), record


def stage_keys(config: Config, seeds: list[int] | None) -> jax.Array:
    """One key per stage: each pretraining layer, the softmax stage, fine-tuning.

    ``[layers + 2, 2]``; with ``seeds`` ``[layers + 2, models, 2]``, model ``i``'s
    keys being those its own run with ``config.seed = seeds[i]`` would use."""
    num_keys = len(config.layers) + 2
    if seeds is None:
        return jax.random.split(jax.random.PRNGKey(config.seed), num_keys)
    return jnp.stack([jax.random.split(jax.random.PRNGKey(s), num_keys) for s in seeds], 1)


def pretrain_layers(
    config: Config,
    x: jax.Array,
    keys: jax.Array,
    hparams: dict[str, jax.Array] | None,
    learning_rate: jax.Array | None,
    common: dict[str, Any],
) -> tuple[list[FrozenLayer], list[StageRecord], jax.Array]:
    """Greedy layer-wise pretraining: layer k trains on the codes of layers 1..k-1.

    Returns the frozen layers, their stage records and the top layer's codes of ``x``
    (``[n, features]``, or ``[models, n, features]`` in a sweep)."""
    models = bool(common["models"])
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
            name=f"pretrain_{i + 1}",
            hparams=hparams,
            learning_rate=learning_rate,
            **common,
        )
        layers.append(frozen)
        records.append(record)
        in_features = layer.features
    return layers, records, encode_dataset(layers[-1:], codes, config.eval_batch_size, models)


def pretrain_stack(
    config: Config,
    x: jax.Array,
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
    keys = stage_keys(config, None)
    layers, records, _ = pretrain_layers(config, place_data(x, mesh), keys, None, None, common)
    return layers, records
