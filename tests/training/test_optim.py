"""Optimizer schedules and the max-norm constraint against numpy formulas, under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae_jax.config import OptimizerConfig, tiny
from sae_jax.errors import ConfigError
from sae_jax.training.optim import make_optimizer, max_norm, set_learning_rate
from sae_jax.training.stage import Stage, run_stage


def _grad(w):
    return 4 * w**3  # of sum(w ** 4)


def _run(opt, w0, steps):
    w, state = jnp.asarray(w0), opt.init(jnp.asarray(w0))
    step = jax.jit(lambda w, state: opt.update(_grad(w), state, w))
    for _ in range(steps):
        updates, state = step(w, state)
        w = optax.apply_updates(w, updates)
    return np.asarray(w), state


W0 = np.array([1.0, -0.8, 0.5], np.float32)


def test_learning_rate_decays_by_epoch():
    config = OptimizerConfig("sgd", learning_rate=0.1, lr_decay=0.5)
    got, _ = _run(make_optimizer(config, steps_per_epoch=2), W0, 6)
    w = W0.astype(np.float64)
    for t in range(6):
        w = w - 0.1 * 0.5 ** (t // 2) * _grad(w)
    np.testing.assert_allclose(got, w, rtol=1e-5)
    # By default an epoch is one update.
    got, _ = _run(make_optimizer(config), W0, 3)
    w = W0.astype(np.float64)
    for t in range(3):
        w = w - 0.1 * 0.5**t * _grad(w)
    np.testing.assert_allclose(got, w, rtol=1e-5)


@pytest.mark.parametrize("momentum_start", [None, 0.2])
def test_rmsprop_with_momentum_and_a_decayed_rate_is_tf1s(momentum_start):
    """TF1's RMSPropOptimizer, written out: the mean square starts at 1, eps inside the
    root, and the (decayed) rate multiplies each new gradient inside the momentum."""
    config = OptimizerConfig(
        "rmsprop", learning_rate=0.01, decay=0.9, momentum=0.8, eps=1e-10, lr_decay=0.5,
        momentum_start=momentum_start, momentum_epochs=2 if momentum_start else 0,
    )  # fmt: skip
    got, _ = _run(make_optimizer(config, steps_per_epoch=2), W0, 7)
    w, ms, mom = W0.astype(np.float64), np.ones(3), np.zeros(3)
    for t in range(7):
        g, rate = _grad(w), 0.01 * 0.5 ** (t // 2)
        mu = 0.8 if momentum_start is None else 0.2 + (0.8 - 0.2) * min(t / 4, 1.0)
        ms = 0.9 * ms + 0.1 * g**2
        mom = mu * mom + rate * g / np.sqrt(ms + 1e-10)
        w = w - mom
    np.testing.assert_allclose(got, w, rtol=1e-5)


def test_adam_without_a_schedule_is_optax_adam():
    config = OptimizerConfig("adam", learning_rate=0.01, eps=1e-8)
    got, _ = _run(make_optimizer(config), W0, 5)
    want, _ = _run(optax.adam(0.01, eps=1e-8), W0, 5)
    np.testing.assert_array_equal(got, want)


def test_momentum_rises_linearly_over_its_epochs():
    config = OptimizerConfig(
        "sgd", learning_rate=0.05, momentum=0.9, momentum_start=0.5, momentum_epochs=2
    )
    got, _ = _run(make_optimizer(config, steps_per_epoch=2), W0, 7)
    w, m = W0.astype(np.float64), np.zeros(3)
    for t in range(7):
        mu = 0.5 + (0.9 - 0.5) * min(t / 4, 1.0)
        m = mu * m + _grad(w)
        w = w - 0.05 * m
    np.testing.assert_allclose(got, w, rtol=1e-5)


def _slide(params, batch, key):
    """``sum(w)``: a gradient of 1 whatever the batch (which is only read)."""
    return jnp.sum(params["w"]) + 0.0 * jnp.sum(batch[0]), {}


@pytest.mark.parametrize(
    "models, data_axis",
    [(None, None), (2, 0), (2, (0, None))],
    ids=["one_model", "own_data", "own_codes_shared_labels"],
)
def test_a_stage_schedules_by_the_steps_its_epochs_take_remainder_included(models, data_axis):
    """10 examples in batches of 4: each epoch takes 3 steps (4, 4 and a remainder of
    2). sgd on sum(w), whose gradient is 1, with the rate halved after every epoch
    and the momentum rising from 0 to 0.5 over the first epoch: step t (from 0) has
    rate r * 0.5 ** (t // 3) and momentum 0.5 * min(t / 3, 1), as written out below.
    With several models each has its own rate and its own data (``data_axis=0``, as a
    sweep's second pretraining layer), or its own codes and shared labels (as a
    sweep's softmax stage)."""
    n, batch, epochs, steps = 10, 4, 3, 3
    config = OptimizerConfig(
        "sgd", learning_rate=0.5, lr_decay=0.5, momentum=0.5, momentum_start=0.0,
        momentum_epochs=1,
    )  # fmt: skip
    rates = [0.5] if models is None else [0.5, 0.25]
    x = np.arange(n, dtype=np.float32)[:, None]
    if models is None:
        data, params, key, rate = (x,), {"w": jnp.zeros(())}, jax.random.PRNGKey(0), None
    else:
        data = (np.stack([x, x]),) if data_axis == 0 else (np.stack([x, x]), np.arange(n))
        params, rate = {"w": jnp.zeros((models,))}, jnp.asarray(rates)
        key = jax.random.split(jax.random.PRNGKey(0), models)
    spec = Stage("stage", _slide, config, epochs, batch, learning_rate=rate)
    got, record = run_stage(spec, params, data, key=key, models=models, data_axis=data_axis)
    for m, r in enumerate(rates):
        w, trace, losses = 0.0, 0.0, []
        for t in range(epochs * steps):
            losses.append(w)  # the loss before the step: sum(w) = w
            trace = 1.0 + 0.5 * min(t / steps, 1.0) * trace
            w -= r * 0.5 ** (t // steps) * trace
        # An epoch's loss: its steps' losses weighted by their batch sizes, per example.
        weights = np.array([4, 4, 2] * epochs) / n
        per_epoch = (np.array(losses) * weights).reshape(epochs, steps).sum(1)
        mine = lambda v, m=m: v if models is None else v[m]
        np.testing.assert_allclose(mine(got["w"]), w, rtol=1e-6)
        np.testing.assert_allclose([mine(h["loss"]) for h in record.history], per_epoch, rtol=1e-6)


def test_a_set_learning_rate_reaches_a_scheduled_chain():
    config = OptimizerConfig("adam", learning_rate=1.0, lr_decay=0.9, max_norm=10.0)
    opt = make_optimizer(config, steps_per_epoch=1)
    state = set_learning_rate(opt.init(jnp.asarray(W0)), 0.01)
    step = jax.jit(lambda w, s: opt.update(_grad(w), s, w))
    updates, _ = step(jnp.asarray(W0), state)
    np.testing.assert_allclose(np.abs(updates), 0.01, rtol=1e-4)  # adam's first step: lr


def test_max_norm_projects_each_unit_incoming_weights():
    w = np.array([[3.0, 0.1, 1.0], [4.0, 0.2, -1.0]], np.float32)  # column norms 5, .22, 1.4
    b = np.array([7.0, 8.0, 9.0], np.float32)
    u = {"w": np.full_like(w, 0.5), "b": np.full_like(b, 0.5)}
    params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    updates, _ = jax.jit(max_norm(2.0).update)(jax.tree.map(jnp.asarray, u), (), params)
    new = w + 0.5
    norms = np.sqrt((new**2).sum(axis=0))
    expected = new * np.minimum(1.0, 2.0 / norms)
    np.testing.assert_allclose(w + np.asarray(updates["w"]), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["b"]), 0.5)  # biases are not constrained
    assert np.sqrt(((w + updates["w"]) ** 2).sum(0)).max() <= 2.0 + 1e-5
    np.testing.assert_allclose((w + updates["w"])[:, 1], new[:, 1])  # inside the ball


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr_decay": 0.0}, "lr_decay must be > 0"),
        ({"lr_decay": 1.5}, r"lr_decay must be in \(0, 1\]"),
        ({"max_norm": -1.0}, "max_norm must be > 0"),
        ({"momentum_start": 0.5}, "momentum_start: adam has no momentum"),
        ({"name": "sgd", "momentum_start": 0.5}, "momentum_epochs must be a positive"),
    ],
)
def test_bad_schedules_are_refused(change, message):
    config = tiny()
    optimizer = OptimizerConfig(**{"name": "adam", **change})
    with pytest.raises(ConfigError, match=f"finetune_optimizer.{message}"):
        config.replace(finetune_optimizer=optimizer).validate()


@pytest.mark.parametrize("name", ["finetune_input_keep", "finetune_hidden_keep"])
@pytest.mark.parametrize("value", [0.0, 1.2])
def test_keep_probabilities_must_be_probabilities(name, value):
    with pytest.raises(ConfigError, match=name):
        tiny().replace(**{name: value}).validate()


def test_a_configured_max_norm_bounds_every_unit_after_each_step():
    config = OptimizerConfig("sgd", learning_rate=1.0, max_norm=0.5)
    w = jnp.full((4, 3), 0.1)  # column norms 0.2, within the ball
    opt = make_optimizer(config)
    grad = jnp.array([[-1.0, 0.0, 0.0]] * 4)  # pushes column 0 out to norm 2.2
    updates, _ = jax.jit(opt.update)(grad, opt.init(w), w)
    norms = np.sqrt((np.asarray(w + updates) ** 2).sum(axis=0))
    np.testing.assert_allclose(norms, [0.5, 0.2, 0.2], rtol=1e-6)
