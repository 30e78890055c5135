"""Optimizers from an ``OptimizerConfig``: optax's adam, rmsprop (TF1's form) or sgd,
with optional per-epoch schedules of the learning rate and momentum and a max-norm
constraint on the incoming weights of every unit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sae_jax.config import OptimizerConfig


def make_optimizer(
    config: OptimizerConfig, injectable: bool = False, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
    """The optax optimizer for ``config`` (adam, rmsprop in TF1's form, or sgd).

    With ``injectable``, the learning rate lives in the optimizer state
    (``optax.inject_hyperparams``), so models vmapped together can differ in it.
    Schedules count epochs of ``steps_per_epoch`` updates: the learning rate is
    multiplied by ``config.lr_decay`` after every epoch, and with
    ``config.momentum_start`` the momentum rises linearly from it to
    ``config.momentum`` over ``config.momentum_epochs`` epochs. With
    ``config.max_norm`` every weight matrix's columns (a unit's incoming weights)
    are projected back onto the ball of that radius after each update.
    """
    momentum: Any = config.momentum or None
    if config.momentum_start is not None:
        momentum = optax.linear_schedule(
            config.momentum_start, config.momentum, config.momentum_epochs * steps_per_epoch
        )
    if config.name == "adam":
        make, kwargs = optax.adam, {"eps": config.eps}
    elif config.name == "rmsprop":
        make = optax.rmsprop
        kwargs = {
            "decay": config.decay,
            "eps": config.eps,
            "initial_scale": 1.0,
            "eps_in_sqrt": True,
            "momentum": momentum,
        }
    elif config.name == "sgd":
        make, kwargs = optax.sgd, {"momentum": momentum}
    else:
        raise ValueError(f"unknown optimizer {config.name!r}")
    if injectable or callable(momentum):
        static = tuple(k for k, v in kwargs.items() if v is None or isinstance(v, bool))
        make = optax.inject_hyperparams(make, static_args=static)
    parts = [make(learning_rate=config.learning_rate, **kwargs)]
    if config.lr_decay != 1.0:  # every update is linear in the learning rate
        decay = optax.exponential_decay(1.0, steps_per_epoch, config.lr_decay, staircase=True)
        parts.append(optax.scale_by_schedule(decay))
    if config.max_norm is not None:
        parts.append(max_norm(config.max_norm))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def set_learning_rate(opt_state: Any, rate: jax.Array) -> Any:
    """``opt_state`` of ``make_optimizer(..., injectable=True)`` with its learning rate
    set to ``rate`` (a scalar, or ``[models]`` for vmapped states)."""
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "hyperparams"):  # a chain
        return (set_learning_rate(opt_state[0], rate), *opt_state[1:])
    rates = {**opt_state.hyperparams, "learning_rate": jnp.asarray(rate, jnp.float32)}
    return opt_state._replace(hyperparams=rates)


class MaxNormState(NamedTuple):
    """``max_norm`` keeps no state."""


def max_norm(limit: float) -> optax.GradientTransformation:
    """Project every 2-D weight ``[in, out]`` so that each column (the incoming
    weights of one unit) has an L2 norm of at most ``limit`` after the update
    (Srivastava et al., 2014); other leaves (biases) pass unchanged.

    The update becomes ``project(params + updates) - params``, so it must come last
    in a chain and needs ``params``.
    """

    def update(updates: Any, state: MaxNormState, params: Any = None):
        if params is None:
            raise ValueError("max_norm needs params")

        def project(u: jax.Array, p: jax.Array) -> jax.Array:
            if p.ndim != 2:
                return u
            new = p + u
            norms = jnp.sqrt(jnp.sum(jnp.square(new), axis=0, keepdims=True))
            scale = jnp.minimum(1.0, limit / jnp.maximum(norms, 1e-12))
            return new * scale - p

        return jax.tree.map(project, updates, params), state

    return optax.GradientTransformation(lambda params: MaxNormState(), update)
