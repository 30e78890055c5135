"""Optimizers from an ``OptimizerConfig``: adam, rmsprop in TensorFlow 1's form, or sgd,
with per-epoch schedules of the learning rate and momentum and a max-norm constraint
on the incoming weights of every unit.

Every optimizer keeps its learning rate in its state (``RateState``), so models
vmapped together each have their own (``set_learning_rate``), and one that decays
multiplies each new step where the rate belongs: inside the momentum of rmsprop, as
TF1's ``RMSPropOptimizer`` does with a decayed rate, and outside it for sgd, as TF1's
``MomentumOptimizer`` does.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sae_jax.config import OptimizerConfig


class RateState(NamedTuple):
    """The learning rate of ``scale_by_rate`` (float32, per model when vmapped) and the
    count of updates so far (int32)."""

    # Named as optax names its states' step counters; a NamedTuple field shadowing
    # tuple.count is what mypy objects to.
    count: jax.Array  # type: ignore[assignment]
    learning_rate: jax.Array


def scale_by_rate(
    learning_rate: float, lr_decay: float = 1.0, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
    """Multiply updates by ``-rate * lr_decay ** epoch``, ``epoch`` being the number of
    whole epochs of ``steps_per_epoch`` updates done so far; ``rate`` is
    ``learning_rate`` until ``set_learning_rate`` changes it in the state."""

    def init(params: Any) -> RateState:
        del params
        return RateState(jnp.zeros((), jnp.int32), jnp.asarray(learning_rate, jnp.float32))

    def update(updates: Any, state: RateState, params: Any = None):
        del params
        rate = state.learning_rate
        if lr_decay != 1.0:  # static: an undecayed rate is the constant itself
            rate = rate * jnp.asarray(lr_decay, jnp.float32) ** (state.count // steps_per_epoch)
        updates = jax.tree.map(lambda u: (-rate * u).astype(u.dtype), updates)
        return updates, RateState(state.count + 1, state.learning_rate)

    return optax.GradientTransformation(init, update)


class MomentumState(NamedTuple):
    """The momentum buffer of ``momentum_trace`` and the count of updates so far."""

    # Named as optax names its states' step counters; a NamedTuple field shadowing
    # tuple.count is what mypy objects to.
    count: jax.Array  # type: ignore[assignment]
    trace: Any


def momentum_trace(start: float, end: float, ramp_steps: int) -> optax.GradientTransformation:
    """Heavy-ball momentum ``trace = u + mu * trace`` (``optax.trace``'s update) whose
    ``mu`` rises linearly from ``start`` to ``end`` over ``ramp_steps`` updates."""
    schedule = optax.linear_schedule(start, end, ramp_steps)

    def init(params: Any) -> MomentumState:
        return MomentumState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates: Any, state: MomentumState, params: Any = None):
        del params
        mu = schedule(state.count)
        trace = jax.tree.map(lambda u, t: u + mu * t, updates, state.trace)
        return trace, MomentumState(state.count + 1, trace)

    return optax.GradientTransformation(init, update)


@lru_cache(maxsize=256)  # the same config gives the same optimizer, and its programs
def make_optimizer(
    config: OptimizerConfig, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
    """The optax optimizer for ``config`` (adam, rmsprop in TF1's form, or sgd).

    Schedules count epochs of ``steps_per_epoch`` updates: the learning rate is
    multiplied by ``config.lr_decay`` after every epoch, and with
    ``config.momentum_start`` the momentum rises linearly from it to
    ``config.momentum`` over ``config.momentum_epochs`` epochs. With
    ``config.max_norm`` every weight matrix's columns (a unit's incoming weights)
    are projected back onto the ball of that radius after each update.

    rmsprop follows TF1: ``ms = decay * ms + (1 - decay) * g**2`` from ``ms = 1``,
    ``mom = momentum * mom + lr_t * g / sqrt(ms + eps)``, ``w -= mom``.
    """
    rate = scale_by_rate(config.learning_rate, config.lr_decay, steps_per_epoch)
    momentum: list[optax.GradientTransformation] = []
    if config.momentum_start is not None:
        ramp = config.momentum_epochs * steps_per_epoch
        momentum = [momentum_trace(config.momentum_start, config.momentum, ramp)]
    elif config.momentum:
        momentum = [optax.trace(decay=config.momentum)]
    if config.name == "adam":
        parts = [optax.scale_by_adam(eps=config.eps), rate]
    elif config.name == "rmsprop":
        rms = optax.scale_by_rms(
            decay=config.decay, eps=config.eps, initial_scale=1.0, eps_in_sqrt=True
        )
        parts = [rms, rate, *momentum]
    elif config.name == "sgd":
        parts = [*momentum, rate]
    else:
        raise ValueError(f"unknown optimizer {config.name!r}")
    if config.max_norm is not None:
        parts.append(max_norm(config.max_norm))
    return optax.chain(*parts)


def set_learning_rate(opt_state: Any, rate: Any) -> Any:
    """``opt_state`` of ``make_optimizer`` with its learning rate set to ``rate`` (a
    scalar, or ``[models]`` for vmapped states)."""

    def replace(node: Any) -> Any:
        if isinstance(node, RateState):
            return node._replace(learning_rate=jnp.asarray(rate, jnp.float32))
        return node

    return jax.tree.map(replace, opt_state, is_leaf=lambda n: isinstance(n, RateState))


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
