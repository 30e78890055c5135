"""Recipes on top of ``fit``: greedy pretraining, softmax stage, fine-tuning, evaluation.

Recipes take device arrays and callbacks; they never open files or print. Images
may be uint8 ``[n, features]`` (scaled to ``[0, 1]`` on the device, per batch) or
floating point.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sae_jax import losses
from sae_jax.config import Config, LayerConfig
from sae_jax.corruption import corrupt
from sae_jax.engine import EpochCallback, LossFn, Params, fit, make_optimizer, map_batches
from sae_jax.models import (
    Autoencoder,
    FrozenLayer,
    activation_fn,
    autoencoder,
    classifier,
    compose,
    init_params,
    softmax_head,
)

History = list[dict[str, float]]
# on_epoch(stage, epoch, metrics, seconds), with epoch counted from 1.
StageCallback = Callable[[str, int, dict[str, float], float], None]


def to_float(x: jax.Array) -> jax.Array:
    """uint8 pixels ``[..., f]`` to float32 in ``[0, 1]``; float input is returned as is."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x


def layer_loss(module: Autoencoder, layer: LayerConfig) -> LossFn:
    """The pretraining loss of one autoencoder layer, ``(params, (x,), key) -> (loss, terms)``.

    ``x`` ``[batch, in]`` is corrupted with ``layer.noise`` (when not "none") before it
    is encoded; the reconstruction is always compared with the clean ``x``.
    """
    reduce = jnp.sum if layer.batch_reduction == "sum" else jnp.mean

    def loss_fn(params: Params, batch: tuple[jax.Array, ...], key: jax.Array):
        x = to_float(batch[0])
        h, z = module.apply(params, corrupt(key, x, layer.noise, layer.noise_level))
        if layer.reconstruction == "cross_entropy":
            rec = losses.bernoulli_cross_entropy(z, x)
        else:
            rec = losses.squared_error(activation_fn(layer.decoder_activation)(z), x)
        terms = {"reconstruction": reduce(rec)}
        if layer.beta:
            terms["sparsity"] = layer.beta * losses.kl_sparsity(h, layer.rho)
        if layer.l1:
            terms["l1"] = layer.l1 * reduce(losses.l1_activity(h))
        if layer.contractive:
            kernel = params["params"]["encoder"]["kernel"]
            terms["contractive"] = layer.contractive * reduce(losses.contractive_penalty(h, kernel))
        if layer.weight_decay:
            terms["weight_decay"] = layer.weight_decay * losses.l2_weight_decay(params)
        return sum(terms.values()), terms

    return loss_fn


def classifier_loss(module: nn.Module, weight_decay: float = 0.0) -> LossFn:
    """Mean softmax cross-entropy (+ weight decay) of ``module``'s logits.

    ``(params, (x [batch, in], labels [batch]), key) -> (loss, terms)``.
    """

    def loss_fn(params: Params, batch: tuple[jax.Array, ...], key: jax.Array):
        del key
        x, y = batch
        logits = module.apply(params, to_float(x))
        terms = {"cross_entropy": jnp.mean(losses.softmax_cross_entropy(logits, y))}
        if weight_decay:
            terms["weight_decay"] = weight_decay * losses.l2_weight_decay(params)
        return sum(terms.values()), terms

    return loss_fn


@partial(jax.jit, static_argnums=(0, 3))
def _encode(module: Autoencoder, params: Params, x: jax.Array, batch_size: int) -> jax.Array:
    encode = lambda b: module.apply(params, to_float(b), method=Autoencoder.encode)
    return map_batches(encode, x, batch_size)


def encode_dataset(layers: list[FrozenLayer], x: jax.Array, batch_size: int) -> jax.Array:
    """The code of ``x`` ``[n, in]`` after ``layers`` (bottom first): ``[n, features]``."""
    for layer in layers:
        x = _encode(layer.module, layer.params, x, batch_size)
    return x


@partial(jax.jit, static_argnums=(0, 4))
def _evaluate(module: nn.Module, params: Params, x: jax.Array, y: jax.Array, batch_size: int):
    def batch_stats(batch):
        xb, yb = batch
        logits = module.apply(params, to_float(xb))
        return losses.softmax_cross_entropy(logits, yb), jnp.argmax(logits, -1) == yb

    ce, correct = map_batches(batch_stats, (x, y), batch_size)
    return jnp.mean(correct), jnp.mean(ce)


def evaluate(
    module: nn.Module, params: Params, x: jax.Array, y: jax.Array, batch_size: int
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier (or softmax head).

    Args:
      module: a Flax module mapping ``[batch, in]`` to logits ``[batch, classes]``.
      params: its params.
      x: ``[n, in]`` inputs, evaluated ``batch_size`` rows at a time.
      y: ``[n]`` integer labels.

    Returns:
      ``{"accuracy": float in [0, 1], "loss": float}``.
    """
    accuracy, loss = jax.device_get(_evaluate(module, params, x, y, batch_size))
    return {"accuracy": float(accuracy), "loss": float(loss)}


def pretrain_layer(
    layer: LayerConfig,
    in_features: int,
    x: jax.Array,
    *,
    key: jax.Array,
    batch_size: int,
    bias_init: str = "uniform",
    name: str = "pretrain",
    on_epoch: EpochCallback | None = None,
) -> tuple[FrozenLayer, History]:
    """Train one autoencoder layer on ``x`` ``[n, in_features]`` and freeze it."""
    module = autoencoder(layer, in_features, bias_init)
    init_key, fit_key = jax.random.split(key)
    result = fit(
        layer_loss(module, layer),
        init_params(module, init_key, in_features),
        make_optimizer(layer.optimizer),
        (x,),
        batch_size=batch_size,
        epochs=layer.epochs,
        key=fit_key,
        name=name,
        on_epoch=on_epoch,
    )
    return FrozenLayer(module, result.state.params), result.history


def train_classifier(
    module: nn.Module,
    params: Params,
    data: tuple[jax.Array, jax.Array],
    optimizer_config: Any,
    *,
    epochs: int,
    key: jax.Array,
    batch_size: int,
    weight_decay: float = 0.0,
    name: str = "finetune",
    on_epoch: EpochCallback | None = None,
) -> tuple[Params, History]:
    """Train ``module`` (softmax head or whole stack) on ``(x, labels)`` with cross-entropy."""
    result = fit(
        classifier_loss(module, weight_decay),
        params,
        make_optimizer(optimizer_config),
        data,
        batch_size=batch_size,
        epochs=epochs,
        key=key,
        name=name,
        on_epoch=on_epoch,
    )
    return result.state.params, result.history


@dataclass
class StageRecord:
    """One stage of a run: its name, epochs, wall seconds and final mean loss."""

    name: str
    epochs: int
    wall_s: float
    final_loss: float | None
    history: History = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The record without its per-epoch history, as JSON-ready data."""
        return {
            "name": self.name,
            "epochs": self.epochs,
            "wall_s": self.wall_s,
            "final_loss": self.final_loss,
        }


@dataclass
class PipelineResult:
    """What ``run_pipeline`` returns."""

    layers: list[FrozenLayer]
    params: Params  # the fine-tuned classifier, see models.Classifier
    test: dict[str, float]
    stages: list[StageRecord]


def run_pipeline(
    config: Config,
    train: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array] | None = None,
    *,
    on_epoch: StageCallback | None = None,
) -> PipelineResult:
    """Greedy layer-wise pretraining, the softmax stage, and end-to-end fine-tuning.

    Args:
      config: a validated ``Config``.
      train: images ``[n, input_features]`` (uint8 or float) and labels ``[n]``.
      test: the same for the test set; when given, the test accuracy is measured
        after every softmax and fine-tuning epoch and at the end.
      on_epoch: ``on_epoch(stage, epoch, metrics, seconds)`` after every epoch, with
        ``epoch`` counted from 1; ``metrics`` holds ``test_accuracy`` where measured.

    Returns:
      ``PipelineResult`` with the frozen layers, the fine-tuned classifier params,
      the test metrics and one ``StageRecord`` per stage.
    """
    x, y = train
    keys = jax.random.split(jax.random.PRNGKey(config.seed), len(config.layers) + 2)
    stages: list[StageRecord] = []

    def hook(stage: str, module: nn.Module | None = None, test_x: jax.Array | None = None):
        def on_fit_epoch(epoch: int, state, metrics: dict[str, float], seconds: float) -> None:
            if module is not None and test is not None:
                metrics["test_accuracy"] = evaluate(
                    module, state.params, test_x, test[1], config.eval_batch_size
                )["accuracy"]
            if on_epoch is not None:
                on_epoch(stage, epoch + 1, metrics, seconds)

        return on_fit_epoch

    def timed(name: str, epochs: int, run: Callable[[], tuple[Any, History]]) -> Any:
        start = time.perf_counter()
        out, history = run()
        final = history[-1]["loss"] if history else None
        stages.append(StageRecord(name, epochs, time.perf_counter() - start, final, history))
        return out

    # Greedy layer-wise pretraining: layer k trains on the codes of layers 1..k-1.
    layers: list[FrozenLayer] = []
    codes, in_features = x, config.input_features
    for i, layer in enumerate(config.layers):
        name = f"pretrain_{i + 1}"
        if layers:
            codes = encode_dataset(layers[-1:], codes, config.eval_batch_size)
        layers.append(
            timed(
                name,
                layer.epochs,
                partial(
                    pretrain_layer,
                    layer,
                    in_features,
                    codes,
                    key=keys[i],
                    batch_size=config.batch_size,
                    bias_init=config.bias_init,
                    name=name,
                    on_epoch=hook(name),
                ),
            )
        )
        in_features = layer.features
    top_codes = encode_dataset(layers[-1:], codes, config.eval_batch_size)
    del codes

    # Softmax-only stage on the top code (the encoders stay frozen).
    head = softmax_head(config)
    head_key, softmax_key = jax.random.split(keys[-2])
    test_codes = encode_dataset(layers, test[0], config.eval_batch_size) if test else None
    head_params = timed(
        "softmax",
        config.softmax_epochs,
        partial(
            train_classifier,
            head,
            init_params(head, head_key, head.in_features),
            (top_codes, y),
            config.softmax_optimizer,
            epochs=config.softmax_epochs,
            key=softmax_key,
            batch_size=config.batch_size,
            weight_decay=config.softmax_weight_decay,
            name="softmax",
            on_epoch=hook("softmax", head, test_codes),
        ),
    )
    del top_codes, test_codes

    # End-to-end fine-tuning of the whole stack.
    model = classifier(config)
    params = timed(
        "finetune",
        config.finetune_epochs,
        partial(
            train_classifier,
            model,
            compose(layers, head_params),
            (x, y),
            config.finetune_optimizer,
            epochs=config.finetune_epochs,
            key=keys[-1],
            batch_size=config.batch_size,
            weight_decay=config.finetune_weight_decay,
            name="finetune",
            on_epoch=hook("finetune", model, test[0] if test else None),
        ),
    )
    test_metrics = evaluate(model, params, test[0], test[1], config.eval_batch_size) if test else {}
    return PipelineResult(layers, params, test_metrics, stages)
