"""The objectives that the stages minimise: one autoencoder layer's pretraining loss
and the classifier's softmax cross-entropy (with dropout and weight decay).

Each is ``loss_fn(params, batch, key, hparams=None) -> (loss, {name: term})`` for
``sae_jax.training.loop.fit``. Images may be uint8 ``[batch, features]`` (scaled to
``[0, 1]`` on the device) or floating point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from sae_jax import losses
from sae_jax.config import LayerConfig
from sae_jax.corruption import corrupt
from sae_jax.models import (
    Autoencoder,
    activation_fn,
    to_float,
)
from sae_jax.training.loop import LossFn, Params

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
