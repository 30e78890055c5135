"""The one training engine: compile once, deterministic, no example dropped, exact metrics."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae_jax.config import OptimizerConfig
from sae_jax.config.presets import TF1_RMSPROP
from sae_jax.errors import NonFiniteLossError
from sae_jax.training.loop import fit, init_state, make_epoch, make_train_step, map_batches
from sae_jax.training.optim import make_optimizer, set_learning_rate

KEY = jax.random.PRNGKey(0)


def _regression(n=103, d=5):
    k1, k2 = jax.random.split(KEY)
    x = jax.random.normal(k1, (n, d))
    w_true = jax.random.normal(k2, (d, 1))
    return x, x @ w_true, w_true


def _mse(params, batch, key):
    x, y = batch
    err = jnp.mean((x @ params["w"] + params["b"] - y) ** 2)
    return err, {"mse": err}


def _params(d=5):
    return {"w": jnp.zeros((d, 1)), "b": jnp.zeros((1,))}


def test_fit_learns_a_linear_map():
    x, y, w_true = _regression()
    result = fit(_mse, _params(), optax.adam(0.05), (x, y), batch_size=10, epochs=60, key=KEY)
    assert result.history[-1]["loss"] < 1e-3 * result.history[0]["loss"]
    np.testing.assert_allclose(result.state.params["w"], w_true, atol=2e-2)


def test_typed_and_legacy_keys_train_alike():
    """``jax.random.key(s)`` and ``jax.random.PRNGKey(s)`` hold the same bits: ``fit``
    and ``pretrain_layer`` give the same params with either (the shuffle and the
    corruption draw on the key); other keys are refused, named."""
    from conftest import synthetic_config, synthetic_digits

    from sae_jax.training.layerwise import pretrain_layer

    x, y, _ = _regression()
    run = lambda key: fit(_mse, _params(), optax.adam(0.05), (x, y), batch_size=10, epochs=2,
                          key=key).state.params  # fmt: skip
    typed, legacy, other = run(jax.random.key(3)), run(jax.random.PRNGKey(3)), run(KEY)
    for a, b in zip(jax.tree.leaves(typed), jax.tree.leaves(legacy), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(typed["w"], other["w"])  # the key matters to this run
    layer = dataclasses.replace(
        synthetic_config().layers[0], epochs=1, noise="masking", noise_level=0.3
    )
    images, _ = synthetic_digits(40, 1)
    frozen = [
        pretrain_layer(layer, 64, images, key=key, batch_size=10)[0].params
        for key in (jax.random.key(5), jax.random.PRNGKey(5))
    ]
    for a, b in zip(*map(jax.tree.leaves, frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    expected = r"^key: expected a jax.random.key \(threefry2x32\) or a legacy uint32 \[..., 2\] key"
    for key, got in [(jax.random.key(3, impl="rbg"), "a typed key of rbg"),
                     (jnp.zeros(2), r"float32 \[2\]")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"{expected} \(jax.random.PRNGKey\), got {got}$"):
            run(key)


def test_full_batch_sgd_matches_numpy_gradient_descent():
    x, y, _ = _regression(n=20)
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w, b = np.zeros((5, 1)), np.zeros((1,))
    losses = []
    for _ in range(3):  # d/dw mean((xw + b - y)^2) = 2/n x^T (xw + b - y)
        err = xn @ w + b - yn
        losses.append(np.mean(err**2))
        w, b = w - 0.1 * 2 * xn.T @ err / 20, b - 0.1 * 2 * err.mean(0)
    result = fit(_mse, _params(), optax.sgd(0.1), (x, y), batch_size=20, epochs=3, key=KEY)
    np.testing.assert_allclose(result.state.params["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.state.params["b"], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([h["loss"] for h in result.history], losses, rtol=1e-5)
    np.testing.assert_allclose([h["mse"] for h in result.history], losses, rtol=1e-5)


def test_second_epoch_does_not_recompile():
    traces = []

    def counting_loss(params, batch, key):
        traces.append(1)  # Python side effect: runs only while tracing
        return _mse(params, batch, key)

    x, y, _ = _regression()
    fit(counting_loss, _params(), optax.sgd(0.01), (x, y), batch_size=10, epochs=1, key=KEY)
    one_epoch = len(traces)
    traces.clear()
    fit(counting_loss, _params(), optax.sgd(0.01), (x, y), batch_size=10, epochs=4, key=KEY)
    assert len(traces) == one_epoch == 2  # the scanned step and the remainder step, once


def test_every_example_is_used_once_per_epoch():
    x, y, _ = _regression(n=103)
    result = fit(_mse, _params(), optax.sgd(0.01), (x, y), batch_size=10, epochs=3, key=KEY)
    assert int(result.state.step) == 3 * 11  # 10 full batches + 1 of 3 examples

    # A "loss" that is the batch mean of an index column: its epoch metric must be the
    # mean over all examples, exactly once each, whatever the shuffle.
    idx = jnp.arange(103, dtype=jnp.float32)[:, None]

    def mean_index(params, batch, key):
        return jnp.mean(batch[0]) + 0.0 * params["b"][0], {}

    history = fit(
        mean_index, _params(), optax.sgd(0.0), (idx,), batch_size=10, epochs=2, key=KEY
    ).history
    for h in history:
        np.testing.assert_allclose(h["loss"], 51.0, rtol=1e-6)


def _record_steps(key, n=23, batch_size=5, epochs=2, first_step=0):
    """Run ``fit`` with a loss that records, step by step, the example indices of its
    minibatch and the PRNG key it was given: ``[(indices, key), ...]`` in step order.
    ``first_step``: the step count of the state it starts from."""
    seen = []

    def recording(params, batch, key):
        record = lambda idx, k: seen.append((np.asarray(idx).tolist(), np.asarray(k).tolist()))
        jax.debug.callback(record, batch[0], key, ordered=True)
        return 0.0 * params["b"][0], {}

    data = (jnp.arange(n, dtype=jnp.int32),)
    opt = optax.sgd(0.0)
    state = init_state(_params(), opt)._replace(step=jnp.asarray(first_step, jnp.int32))
    fit(recording, _params(), opt, data, batch_size=batch_size, epochs=epochs, key=key, state=state)
    return seen


def _derived_steps(key, n=23, batch_size=5, epochs=2, first_step=0):
    """What ``_record_steps`` must see, from ``jax.random`` alone: epoch ``e``'s key
    ``fold_in(key, e)`` splits into a shuffle key, whose permutation of the examples
    the minibatches take in order (the remainder last), and a step key, into which
    every step folds the state's step count."""
    steps, t = [], first_step
    for e in range(epochs):
        shuffle_key, step_key = jax.random.split(jax.random.fold_in(key, e))
        order = np.asarray(jax.random.permutation(shuffle_key, n)).tolist()
        for start in range(0, n, batch_size):
            step = np.asarray(jax.random.fold_in(step_key, t)).tolist()
            steps.append((order[start : start + batch_size], step))
            t += 1
    return steps


def test_each_epoch_shuffles_anew_and_each_step_has_its_own_key():
    seen = _record_steps(KEY)
    assert len(seen) == 2 * 5  # 4 full batches of 5 and the remainder of 3, twice
    orders = []
    for epoch in (seen[:5], seen[5:]):
        assert [len(idx) for idx, _ in epoch] == [5, 5, 5, 5, 3]
        order = [i for idx, _ in epoch for i in idx]
        assert sorted(order) == list(range(23))  # every example exactly once
        orders.append(order)
    assert orders[0] != orders[1], "the second epoch repeated the first epoch's order"
    assert orders[0] != list(range(23))  # shuffled at all
    keys = [tuple(k) for _, k in seen]
    assert len(set(keys)) == len(keys), "two steps got the same key (e.g. the same noise)"
    assert _record_steps(KEY) == seen  # the same key gives the same order and keys
    other = _record_steps(jax.random.PRNGKey(1))
    assert [idx for idx, _ in other] != [idx for idx, _ in seen]
    assert not {tuple(k) for _, k in other} & set(keys)


def test_the_shuffle_and_the_step_keys_are_independent_streams_of_the_epoch_key():
    # Every batch and every step key, exactly as derived in _derived_steps: the step
    # keys (dropout, corruption) never come from the shuffle key, nor the reverse.
    seen = _record_steps(KEY)
    assert seen == _derived_steps(KEY)
    # A state that has taken 1000 steps: other step keys, the very same shuffle.
    later = _record_steps(KEY, first_step=1000)
    assert later == _derived_steps(KEY, first_step=1000)
    assert [idx for idx, _ in later] == [idx for idx, _ in seen]
    assert not {tuple(k) for _, k in later} & {tuple(k) for _, k in seen}
    # One example more (24 = 4 batches of 5 and a remainder of 4): another shuffle,
    # the very same step keys.
    more = _record_steps(KEY, n=24)
    assert more == _derived_steps(KEY, n=24)
    assert [k for _, k in more] == [k for _, k in seen]
    assert [idx for idx, _ in more][:4] != [idx for idx, _ in seen][:4]


def test_deterministic_for_a_seed():
    x, y, _ = _regression()
    run = lambda key: fit(
        _mse, _params(), optax.adam(0.01), (x, y), batch_size=16, epochs=2, key=key
    ).state.params["w"]
    np.testing.assert_array_equal(run(KEY), run(KEY))
    assert not np.array_equal(run(KEY), run(jax.random.PRNGKey(1)))


def test_caller_params_survive_donation():
    x, y, _ = _regression()
    params = {"w": jnp.ones((5, 1)), "b": jnp.ones((1,))}
    fit(_mse, params, optax.sgd(0.1), (x, y), batch_size=10, epochs=2, key=KEY)
    np.testing.assert_array_equal(params["w"], 1.0)  # would raise if the buffer was donated


def test_non_finite_loss_names_stage_and_epoch():
    x, y, _ = _regression()

    def exploding(params, batch, key):
        b = params["b"][0]  # sgd on -b raises b by 0.3 per step; the loss is inf past 0.5
        return jnp.where(b > 0.5, jnp.inf, -b), {}

    with pytest.raises(NonFiniteLossError, match=r"stage layer_7, epoch 3: the loss became inf"):
        fit(
            exploding,
            _params(),
            optax.sgd(0.3),
            (x, y),
            batch_size=103,
            epochs=5,
            key=KEY,
            name="layer_7",
        )


def _numpy_updates(config: OptimizerConfig, w: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` updates of ``w`` on ``sum(w^4)``, by the formulas each optimizer documents."""
    lr, d, mu, eps = config.learning_rate, config.decay, config.momentum, config.eps
    m, v, ms, mom = np.zeros_like(w), np.zeros_like(w), np.ones_like(w), np.zeros_like(w)
    for t in range(1, steps + 1):
        g = 4 * w**3
        if config.name == "adam":  # Kingma & Ba: bias-corrected moments, eps outside the root
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
            w = w - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + eps)
        elif config.name == "rmsprop":  # TF1: ms starts at 1, eps inside the root, momentum
            ms = d * ms + (1 - d) * g**2
            mom = mu * mom + lr * g / np.sqrt(ms + eps)
            w = w - mom
        else:  # sgd with heavy-ball momentum
            mom = mu * mom + g
            w = w - lr * mom
    return w


@pytest.mark.parametrize("set_rate", [False, True])
@pytest.mark.parametrize(
    "config",
    [
        OptimizerConfig("adam", learning_rate=0.01, eps=0.1),
        OptimizerConfig("rmsprop", learning_rate=0.01, decay=0.8, momentum=0.9, eps=0.5),
        OptimizerConfig("sgd", learning_rate=0.01, momentum=0.9),
        OptimizerConfig("sgd", learning_rate=0.01),
    ],
    ids=["adam", "rmsprop", "sgd_momentum", "sgd"],
)
def test_optimizers_match_their_formulas(config, set_rate):
    opt = make_optimizer(config)
    w = jnp.array([1.0, -2.0, 0.5])
    grad_fn = jax.grad(lambda w: jnp.sum(w**4))
    state = opt.init(w)
    if set_rate:  # as a sweep sets each model's rate: the same optimizer
        state = set_learning_rate(opt.init(w), config.learning_rate)
    step = jax.jit(lambda w, state: opt.update(grad_fn(w), state, w))
    for _ in range(5):
        updates, state = step(w, state)
        w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(w, _numpy_updates(config, np.array([1.0, -2.0, 0.5]), 5), rtol=2e-5)


def test_tf1_rmsprop_preset():
    assert OptimizerConfig("rmsprop", 1e-3, decay=0.9, momentum=0.0, eps=1e-10) == TF1_RMSPROP


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'sgdd'"):
        make_optimizer(OptimizerConfig("sgdd"))


def test_map_batches_pads_and_trims():
    x = jnp.arange(23.0).reshape(23, 1)
    out = jax.jit(lambda x: map_batches(lambda b: (b * 2, b.sum(-1)), x, 5))(x)
    np.testing.assert_array_equal(out[0], x * 2)
    np.testing.assert_array_equal(out[1], x[:, 0])


def test_batch_size_larger_than_data_is_refused():
    x, y, _ = _regression(n=8)
    with pytest.raises(ValueError, match="batch_size=9"):
        fit(_mse, _params(), optax.sgd(0.1), (x, y), batch_size=9, epochs=1, key=KEY)


def test_resuming_from_a_saved_state_is_bit_identical():
    x, y, _ = _regression()
    opt = optax.adam(0.01)
    whole = fit(_mse, _params(), opt, (x, y), batch_size=10, epochs=4, key=KEY).state
    half = fit(_mse, _params(), opt, (x, y), batch_size=10, epochs=2, key=KEY).state
    half = jax.tree.map(np.asarray, half)  # as if written to disk and read back
    resumed = fit(
        _mse, _params(), opt, (x, y), batch_size=10, epochs=4, key=KEY, state=half, start_epoch=2
    )
    assert len(resumed.history) == 2
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)


def _scaled_mse(params, batch, key, hparams):
    loss, terms = _mse(params, batch, key)
    return hparams["scale"] * loss, terms


@pytest.mark.parametrize("own_data", [False, True], ids=["shared_data", "own_data"])
def test_models_trained_at_once_match_separate_runs(own_data):
    # Two models in one program (vmap over a leading model axis), 23 examples in
    # batches of 5 (a remainder step), each with its own params, key, hparams and,
    # with own_data, its own data: the same as two separate fits.
    x, y, _ = _regression(n=23)
    params = [_params(), {"w": jnp.full((5, 1), 0.1), "b": jnp.ones((1,))}]
    data = [(x, y), (2 * x, y)] if own_data else [(x, y), (x, y)]
    keys, scales = jax.random.split(KEY, 2), [1.0, 3.0]
    opt, kw = optax.sgd(0.01), {"batch_size": 5, "epochs": 2}
    alone = [
        fit(_scaled_mse, p, opt, d, key=k, hparams={"scale": s}, **kw)
        for p, d, k, s in zip(params, data, keys, scales, strict=True)
    ]
    stack = lambda *trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
    together = fit(
        _scaled_mse,
        stack(*params),
        opt,
        stack(*data) if own_data else data[0],
        key=keys,
        models=2,
        data_axis=0 if own_data else None,
        hparams={"scale": jnp.array(scales)},
        **kw,
    )
    for i, run in enumerate(alone):
        mine_, ours_ = jax.tree.leaves(run.state.params), jax.tree.leaves(together.state.params)
        for a, b in zip(mine_, ours_, strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-5, atol=1e-7)
        for mine, ours in zip(run.history, together.history, strict=True):
            np.testing.assert_allclose(ours["loss"][i], mine["loss"], rtol=1e-5)
    assert alone[0].history != alone[1].history


def test_batches_of_one_are_allowed_and_the_callback_gets_wall_seconds():
    x, y, _ = _regression(n=4)
    seconds = []
    start = time.perf_counter()
    result = fit(
        _mse, _params(), optax.sgd(0.1), (x, y), batch_size=1, epochs=2, key=KEY,
        on_epoch=lambda epoch, state, metrics, s: seconds.append(s),
    )  # fmt: skip
    assert len(result.history) == 2 and int(result.state.step) == 8
    assert all(0 < s <= time.perf_counter() - start for s in seconds)
    with pytest.raises(ValueError, match=r"batch_size=0 must be in \[1, 4\]"):
        fit(_mse, _params(), optax.sgd(0.1), (x, y), batch_size=0, epochs=1, key=KEY)


def test_an_epoch_donates_nothing_so_the_state_before_it_stays_valid():
    # fit looks at epoch e while epoch e + 1 runs: e's state must outlive the dispatch.
    x, y, _ = _regression(n=20)
    opt = optax.adam(0.1)
    state = init_state(_params(), opt)
    epoch = make_epoch(make_train_step(_mse, opt), 20, 5)
    new, _ = epoch(state, (x, y), KEY)
    leaves = [*jax.tree.leaves(state), x, y, *jax.tree.leaves(new)]
    assert not any(leaf.is_deleted() for leaf in leaves)


def test_the_host_looks_at_each_epoch_once_the_next_is_queued(monkeypatch):
    # Epoch e's metrics and callback come after epoch e + 1 is dispatched, so the
    # device never waits for the host; a stop drops the queued epoch, and the result
    # equals a fit that stops there.
    import sae_jax.training.loop as loop

    events = []
    real = loop.make_epoch

    def logged(*args, **kwargs):
        program = real(*args, **kwargs)

        def run(state, data, key, active=None, epoch=None):
            events.append(f"run {epoch}")
            return program(state, data, key, active, epoch)

        return run

    monkeypatch.setattr(loop, "make_epoch", logged)
    x, y, _ = _regression(n=20)

    def look(epoch, state, metrics, seconds):
        events.append(f"look {epoch}")
        return epoch == 2  # stop after the third epoch

    result = fit(_mse, _params(), optax.sgd(0.1), (x, y), batch_size=5, epochs=6, key=KEY,
                 on_epoch=look)  # fmt: skip
    assert events == ["run 0", "run 1", "look 0", "run 2", "look 1", "run 3", "look 2"]
    three = fit(_mse, _params(), optax.sgd(0.1), (x, y), batch_size=5, epochs=3, key=KEY)
    assert len(result.history) == 3 and int(result.state.step) == 12
    assert result.history == three.history
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(three.state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_that_stops_keeps_its_state_while_the_others_train():
    # The callback stops model 2 after the first epoch and model 1 after the second;
    # model 0 trains all 4. Each ends where a separate fit of its epochs ends, and
    # training ends with the last model; a model whose loss diverges stops too.
    x, y, _ = _regression(n=20)
    keys, opt = jax.random.split(KEY, 3), optax.sgd(0.05, momentum=0.9)
    stack = lambda *trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
    stops = [4, 2, 1]
    together = fit(
        _mse, stack(*[_params()] * 3), opt, (x, y), batch_size=5, epochs=6, key=keys, models=3,
        on_epoch=lambda epoch, state, metrics, s: np.array([epoch + 1 < n for n in stops]),
    )  # fmt: skip
    assert len(together.history) == 4
    for i, n in enumerate(stops):
        alone = fit(_mse, _params(), opt, (x, y), batch_size=5, epochs=n, key=keys[i])
        assert int(together.state.step[i]) == int(alone.state.step) == 4 * n
        ours = jax.tree.leaves(together.state.params)
        for a, b in zip(jax.tree.leaves(alone.state.params), ours, strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-5, atol=1e-7)
    data = (jnp.stack([x, 30 * x]), jnp.stack([y, y]))  # model 1's steps are far too big
    two = {"batch_size": 5, "epochs": 3, "key": keys[:2], "models": 2, "data_axis": 0}
    with pytest.raises(NonFiniteLossError):  # one model alone raises
        fit(_mse, _params(), opt, (30 * x, y), batch_size=5, epochs=3, key=keys[1])
    kept = fit(_mse, stack(_params(), _params()), opt, data, **two)  # the other goes on
    assert len(kept.history) == 3 and np.isfinite(kept.history[-1]["loss"][0])
    assert not np.isfinite(kept.history[-1]["loss"][1])
    assert kept.diverged.tolist() == [False, True]
    first = next(e for e, h in enumerate(kept.history) if not np.isfinite(h["loss"][1]))
    assert kept.epochs_trained.tolist() == [3, first + 1]  # it stopped where it diverged


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_epoch_metrics_are_per_example_means_for_both_reductions(reduction):
    """10 examples in batches of 4 (4, 4 and a remainder of 2), params that do not
    move (sgd at rate 0): the epoch's loss is the mean of x**2 over the examples,
    whether each step reduces its batch by a mean or by a sum."""
    x = jnp.arange(1.0, 11.0)
    reduce = jnp.mean if reduction == "mean" else jnp.sum

    def loss_fn(params, batch, key):
        value = reduce(batch[0] ** 2) + 0.0 * params["w"]
        return value, {"twice": 2 * value}

    opt = make_optimizer(OptimizerConfig("sgd", learning_rate=0.0))
    out = fit(
        loss_fn, {"w": jnp.zeros(())}, opt, (x,), batch_size=4, epochs=2,
        key=jax.random.PRNGKey(0), reduction=reduction,
    )  # fmt: skip
    want = float(np.mean(np.arange(1.0, 11.0) ** 2))
    for epoch in out.history:
        assert epoch["loss"] == pytest.approx(want, rel=1e-6)
        assert epoch["twice"] == pytest.approx(2 * want, rel=1e-6)


def test_models_that_all_go_on_run_each_epoch_once(monkeypatch):
    # The queued epoch runs again only when a model has stopped since it was queued:
    # with every model going on, each epoch is dispatched once; a stop costs one rerun.
    import sae_jax.training.loop as loop

    runs = []
    real = loop.make_epoch

    def logged(*args, **kwargs):
        program = real(*args, **kwargs)

        def run(state, data, key, active=None, epoch=None):
            runs.append(epoch)
            return program(state, data, key, active, epoch)

        return run

    monkeypatch.setattr(loop, "make_epoch", logged)
    x, y, _ = _regression(n=20)
    stack = lambda *trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
    keys = jax.random.split(KEY, 2)
    go_on = lambda epoch, state, metrics, s: np.array([True, epoch < 1])  # model 1: 2 epochs
    fit(_mse, stack(_params(), _params()), optax.sgd(0.05), (x, y), batch_size=5, epochs=4,
        key=keys, models=2, on_epoch=go_on)  # fmt: skip
    assert runs == [0, 1, 2, 2, 3]  # epoch 2 again, without model 1
