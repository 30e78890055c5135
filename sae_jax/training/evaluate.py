"""Encoding and evaluation on the device, in batches inside one compiled program: the
codes of a frozen stack, and a classifier's accuracy and cross-entropy (for one
model, or for every model of a sweep at once).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sae_jax import losses
from sae_jax.models import (
    Autoencoder,
    FrozenLayer,
    to_float,
)
from sae_jax.parallel import to_host
from sae_jax.training.loop import Params, map_batches


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
    on_host: bool = True,
) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of a classifier (or softmax head).

    Args:
      module: a Flax module mapping ``[batch, in]`` to logits ``[batch, classes]``.
      params: its params (with a leading model axis when ``models``).
      x: ``[n, in]`` inputs (or ``[models, n, in]``), ``batch_size`` rows at a time.
      y: ``[n]`` integer labels.

    Returns:
      ``{"accuracy": float in [0, 1], "loss": float}``; lists with ``models``; with
      ``on_host=False``, device arrays (``[]`` or ``[models]``) not waited for.
    """
    x_axis = _model_axis(x, models)
    accuracy, loss = _evaluate(module, params, x, y, batch_size, models, x_axis)
    if not on_host:
        return {"accuracy": accuracy, "loss": loss}
    accuracy, loss = to_host((accuracy, loss))
    return {"accuracy": np.asarray(accuracy).tolist(), "loss": np.asarray(loss).tolist()}
