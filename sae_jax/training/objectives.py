"""The objectives that the stages minimise: one autoencoder layer's pretraining loss
and the classifier's softmax cross-entropy (with dropout and weight decay).

Each is ``loss_fn(params, batch, key, hparams=None) -> (loss, {name: term})`` for
``sae_jax.training.loop.fit``, its numbers read from ``hparams`` (see
``sae_jax.training.hparams``). Images may be uint8 ``[batch, features]`` (scaled to
``[0, 1]`` on the device) or floating point.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import linen as nn

from sae_jax import losses
from sae_jax.config import LayerConfig
from sae_jax.corruption import corrupt
from sae_jax.models import Autoencoder, activation_fn, to_float
from sae_jax.training.hparams import LayerHParams, active_terms, layer_hparams
from sae_jax.training.loop import LossFn, Params


def layer_loss(
    module: Autoencoder,
    layer: LayerConfig,
    terms: Sequence[str] | None = None,
    *,
    shared: bool = False,
) -> LossFn:
    """The pretraining loss of one autoencoder layer, ``(params, (x,), key, hparams)
    -> (loss, terms)``.

    ``x`` ``[batch, in]`` is corrupted with ``layer.noise`` at ``hparams.noise_level``
    before it is encoded; the reconstruction is always compared with the clean ``x``.
    ``hparams`` is a ``LayerHParams`` of (traced) scalars, by default the layer's own.
    ``terms`` names the penalties computed (of ``hparams.TERMS``; by default those whose
    weight in ``layer`` is not 0; a sweep passes those of any of its models).

    With ``shared``, every value comes from ``hparams`` (which is then required), so
    one loss, and so one compiled epoch, serves every layer of this module, kind of
    loss and ``terms``, whatever its values and epochs (a search's groups of one shape).
    """
    terms = active_terms([layer]) if terms is None else tuple(terms)
    kind = (layer.noise, layer.reconstruction, layer.decoder_activation,
            layer.batch_reduction, layer.reconstruction_scale)  # fmt: skip
    loss = _layer_loss(module, kind, terms)
    return loss if shared else _with_values(loss, layer_hparams(layer))


@lru_cache(maxsize=256)
def _with_values(loss: LossFn, own: LayerHParams) -> LossFn:
    """``loss`` with ``own`` for ``hparams`` when none are given."""

    def loss_fn(params: Params, batch: tuple[jax.Array, ...], key: jax.Array, hparams=None):
        return loss(params, batch, key, own if hparams is None else hparams)

    return loss_fn


@lru_cache(maxsize=256)  # the same kind of loss gives the same function, whose programs are reused
def _layer_loss(module: Autoencoder, kind: tuple, terms: tuple[str, ...]) -> LossFn:
    noise, reconstruction, decoder_activation, batch_reduction, scale = kind
    reduce = jnp.sum if batch_reduction == "sum" else jnp.mean

    def loss_fn(
        params: Params, batch: tuple[jax.Array, ...], key: jax.Array, hparams: LayerHParams
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        hp = hparams
        x = to_float(batch[0])
        # Flax types apply's result as ``Any | tuple[Any, variables]`` (the tuple: with
        # ``mutable``, not passed here); likewise below.
        h, z = cast(
            tuple[jax.Array, jax.Array],
            module.apply(params, corrupt(key, x, noise, hp.noise_level)),
        )
        if reconstruction == "cross_entropy":
            rec = losses.bernoulli_cross_entropy(z, x)
        else:
            rec = losses.squared_error(activation_fn(decoder_activation)(z), x)
        out = {"reconstruction": scale * reduce(rec)}  # x1.0 is exact
        if "beta" in terms:
            out["sparsity"] = hp.beta * losses.kl_sparsity(h, hp.rho)
        if "l1" in terms:
            out["l1"] = hp.l1 * reduce(losses.l1_activity(h))
        if "contractive" in terms:
            kernel = params["params"]["encoder"]["kernel"]
            out["contractive"] = hp.contractive * reduce(losses.contractive_penalty(h, kernel))
        if "weight_decay" in terms:
            out["weight_decay"] = hp.weight_decay * losses.l2_weight_decay(params)
        return sum(out.values()), out

    return loss_fn


@lru_cache(maxsize=256)  # the same classifier gives the same loss, whose programs are reused
def classifier_loss(
    module: nn.Module,
    weight_decay: float = 0.0,
    input_keep: float = 1.0,
    hidden_keep: float = 1.0,
    dropout: bool | None = None,
) -> LossFn:
    """Mean softmax cross-entropy (+ weight decay) of ``module``'s logits.

    ``(params, (x [batch, in], labels [batch]), key, hparams) -> (loss, terms)``. With
    ``dropout`` (by default: a keep probability below 1) the logits come from
    ``module.dropout_logits`` (a ``Classifier``) with the step's key and the keep
    probabilities of ``hparams`` (``{"input_keep", "hidden_keep"}``, by default the
    ones given here).
    """
    own = {"input_keep": input_keep, "hidden_keep": hidden_keep}
    dropout = min(input_keep, hidden_keep) < 1.0 if dropout is None else dropout

    def loss_fn(
        params: Params, batch: tuple[jax.Array, ...], key: jax.Array, hparams: Any = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        x, y = batch
        if dropout:
            keep = own if hparams is None else hparams
            logits = cast(
                jax.Array,
                module.apply(params, to_float(x), key, **keep, method="dropout_logits"),
            )
        else:
            logits = cast(jax.Array, module.apply(params, to_float(x)))
        terms = {"cross_entropy": jnp.mean(losses.softmax_cross_entropy(logits, y))}
        if weight_decay:
            terms["weight_decay"] = weight_decay * losses.l2_weight_decay(params)
        return cast(jax.Array, sum(terms.values())), terms  # terms is never empty: an array

    return loss_fn
