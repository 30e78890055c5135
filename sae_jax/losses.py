"""Pure loss functions for autoencoders and their classifiers.

This module imports only ``jax``: other JAX projects can use it without pulling in
Flax, Orbax or any data code. Every function is a pure function of arrays, safe
under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

Per-example losses return ``[batch]``; reduce them (sum or mean) in the caller.

Any float precision goes in: bfloat16 and float16 inputs (and integers) are widened
to float32 before anything is summed, averaged or passed to a logarithm, so values
are float32 (float64 stays float64) and finite where float32's are; gradients come
back in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "bernoulli_cross_entropy",
    "contractive_penalty",
    "kl_divergence_bernoulli",
    "kl_sparsity",
    "l1_activity",
    "l2_weight_decay",
    "softmax_cross_entropy",
    "squared_error",
]

# Mean activations are clipped to [_EPS, 1 - _EPS] before the logarithms of the KL
# term, so a unit saturated at exactly 0 or 1 gives a finite value and gradient. (In
# float32: 1 - 1e-6 rounds to 1 in bfloat16 and float16.)
_EPS = 1e-6


def _wide(x: ArrayLike) -> jax.Array:
    """``x`` as an array of at least float32: bfloat16, float16 and integers widened."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def squared_error(reconstruction: ArrayLike, target: ArrayLike) -> jax.Array:
    """Squared error per example, summed over features.

    ``sum_i (reconstruction_i - target_i)^2`` over the last axis.

    Args:
      reconstruction: ``[..., features]``.
      target: ``[..., features]``, same shape.

    Returns:
      ``[...]``: one value per example.
    """
    diff = _wide(reconstruction) - _wide(target)
    return jnp.sum(jnp.square(diff), axis=-1)


def bernoulli_cross_entropy(logits: ArrayLike, target: ArrayLike) -> jax.Array:
    """Bernoulli cross-entropy per example from logits, summed over features.

    ``sum_i -[t_i log sigmoid(z_i) + (1 - t_i) log(1 - sigmoid(z_i))]``, computed
    stably as ``softplus(z) - z t`` (``jnp.logaddexp(z, 0)``, whose gradient is
    ``sigmoid(z)`` everywhere, ``z = 0`` included). Targets may be any value in
    ``[0, 1]`` (grey pixels), not only 0 or 1.

    Args:
      logits: ``[..., features]``, pre-sigmoid decoder outputs ``z``.
      target: ``[..., features]``, values in ``[0, 1]``.

    Returns:
      ``[...]``: one value per example.
    """
    z = _wide(logits)
    t = _wide(target)
    per_feature = jnp.logaddexp(z, 0.0) - z * t
    return jnp.sum(per_feature, axis=-1)


def kl_divergence_bernoulli(rho: ArrayLike, rho_hat: ArrayLike) -> jax.Array:
    """Elementwise ``KL(rho || rho_hat)`` between Bernoulli distributions.

    ``rho log(rho / rho_hat) + (1 - rho) log((1 - rho) / (1 - rho_hat))``, with
    ``rho_hat`` clipped to ``[1e-6, 1 - 1e-6]`` so it stays finite.

    Args:
      rho: scalar or array in ``(0, 1)``, the target.
      rho_hat: array of any shape, values in ``[0, 1]``.

    Returns:
      Array of ``rho_hat``'s (broadcast) shape.
    """
    rho = _wide(rho)
    rho_hat = jnp.clip(_wide(rho_hat), _EPS, 1.0 - _EPS)
    return rho * (jnp.log(rho) - jnp.log(rho_hat)) + (1.0 - rho) * (
        jnp.log1p(-rho) - jnp.log1p(-rho_hat)
    )


def kl_sparsity(
    activations: ArrayLike, rho: ArrayLike, axis_name: Hashable | None = None
) -> jax.Array:
    """Sparsity penalty ``sum_j KL(rho || rho_hat_j)`` of the UFLDL tutorial.

    ``rho_hat_j`` is the mean activation of hidden unit ``j`` over the batch, so the
    penalty is one number for the whole batch. Finite, with finite gradients, even
    when a unit is saturated at 0 or 1, at every float precision.

    The batch mean is a statistic of the whole batch. Under ``jax.jit`` with sharded
    arrays XLA computes it over every shard by itself; inside ``shard_map`` or
    ``pmap`` each device sees only its own rows, so pass the mapped axis as
    ``axis_name``: the per-device means are averaged over it (``lax.pmean``; the
    devices hold equal shares of the batch) and every device gets the global penalty.

    Args:
      activations: ``[batch, units]``, values in ``[0, 1]`` (sigmoid units).
      rho: scalar in ``(0, 1)``, the target mean activation.
      axis_name: the name of the mapped axis the batch is split over, if any.

    Returns:
      ``[]``: a scalar.
    """
    rho_hat = jnp.mean(_wide(activations), axis=0)
    if axis_name is not None:
        rho_hat = jax.lax.pmean(rho_hat, axis_name)  # type: ignore[no-untyped-call]
    return jnp.sum(kl_divergence_bernoulli(rho, rho_hat))


def l1_activity(activations: ArrayLike) -> jax.Array:
    """L1 activity penalty per example: ``sum_j |h_j|``.

    Args:
      activations: ``[..., units]``.

    Returns:
      ``[...]``: one value per example.
    """
    return jnp.sum(jnp.abs(_wide(activations)), axis=-1)


def l2_weight_decay(params: Any) -> jax.Array:
    """Weight decay ``sum_W sum(W^2) / 2`` over the weight matrices of a pytree.

    Leaves with two or more dimensions are weights and count; vectors (biases) and
    scalars never do. Multiply by ``lambda`` in the caller.

    Args:
      params: a pytree of arrays, e.g. ``{"kernel": [in, out], "bias": [out]}``.

    Returns:
      ``[]``: a scalar (0.0 when the tree has no matrix).
    """
    leaves = [_wide(leaf) for leaf in jax.tree.leaves(params)]
    total = jnp.zeros((), dtype=jnp.float32)
    for leaf in leaves:
        if leaf.ndim >= 2:
            total = total + 0.5 * jnp.sum(jnp.square(leaf))
    return total


def contractive_penalty(hidden: ArrayLike, kernel: ArrayLike) -> jax.Array:
    """Contractive penalty of a sigmoid encoder (Rifai et al., 2011), per example.

    For ``h = sigmoid(x W + b)`` the Jacobian is ``J_ji = h_j (1 - h_j) W_ij`` and
    ``||J||_F^2 = sum_j (h_j (1 - h_j))^2 sum_i W_ij^2``.

    Args:
      hidden: ``[..., units]``, the sigmoid activations ``h``.
      kernel: ``[in_features, units]``, the encoder weights ``W``.

    Returns:
      ``[...]``: one value per example.
    """
    h = _wide(hidden)
    w = _wide(kernel)
    return jnp.sum(jnp.square(h * (1.0 - h)) * jnp.sum(jnp.square(w), axis=0), axis=-1)


def softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Softmax cross-entropy per example for integer labels.

    ``-log softmax(z)_y = logsumexp(z) - z_y``.

    Args:
      logits: ``[..., classes]``.
      labels: ``[...]``, integers in ``[0, classes)``.

    Returns:
      ``[...]``: one value per example.
    """
    z = _wide(logits)
    y = jnp.asarray(labels).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(z, axis=-1)
    return -jnp.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]
