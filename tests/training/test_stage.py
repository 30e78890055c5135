"""recipes' losses and its many-models paths against numpy and against one model at a
time."""

import copy
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_config, synthetic_digits
from flax import linen as nn

from sae_jax.config import LayerConfig, OptimizerConfig
from sae_jax.models import FrozenLayer, autoencoder, classifier, init_params, softmax_head
from sae_jax.training import evaluate, objectives, pipeline, stage, sweep

RNG = np.random.default_rng(0)


def test_classifier_loss_is_mean_cross_entropy_plus_weight_decay():
    x, y = RNG.normal(size=(6, 4)).astype(np.float32), np.array([0, 2, 1, 2, 0, 1])
    module = nn.Dense(3)
    params = module.init(jax.random.PRNGKey(0), x)
    w, b = (np.asarray(params["params"][k], np.float64) for k in ("kernel", "bias"))
    z = x @ w + b
    z = z - z.max(-1, keepdims=True)
    ce = -(z[np.arange(6), y] - np.log(np.exp(z).sum(-1))).mean()
    for decay in (0.0, 0.3):
        loss_fn = jax.jit(objectives.classifier_loss(module, decay))
        loss, terms = loss_fn(params, (x, y), jax.random.PRNGKey(1))
        np.testing.assert_allclose(terms["cross_entropy"], ce, rtol=1e-5)
        np.testing.assert_allclose(loss, ce + decay * (w**2).sum() / 2, rtol=1e-5)
        assert ("weight_decay" in terms) == bool(decay)
    default = objectives.classifier_loss(module)(params, (x, y), None)[0]
    np.testing.assert_allclose(default, ce, rtol=1e-5)


def _layers(seed: int) -> list[FrozenLayer]:
    key1, key2 = jax.random.split(jax.random.PRNGKey(seed))
    first = autoencoder(LayerConfig(features=5), 7, "uniform")
    second = autoencoder(LayerConfig(features=3, activation="relu"), 5, "uniform")
    return [
        FrozenLayer(first, init_params(first, key1, 7)),
        FrozenLayer(second, init_params(second, key2, 5)),
    ]


def test_encode_and_evaluate_many_models_match_one_at_a_time():
    # Two stacks with a leading model axis, on shared data and on data of their own.
    stacks = [_layers(0), _layers(1)]
    together = [
        FrozenLayer(a.module, jax.tree.map(lambda *p: jnp.stack(p), a.params, b.params))
        for a, b in zip(*stacks, strict=True)
    ]
    x = RNG.uniform(size=(11, 7)).astype(np.float32)
    own = np.stack([x, x[::-1]])
    y = RNG.integers(0, 3, 11)
    alone = lambda i, xi: evaluate.encode_dataset(stacks[i], jnp.asarray(xi), batch_size=4)
    shared = evaluate.encode_dataset(together, jnp.asarray(x), batch_size=4, models=True)
    apart = evaluate.encode_dataset(together, jnp.asarray(own), batch_size=4, models=True)
    assert shared.shape == apart.shape == (2, 11, 3)
    for i in range(2):
        np.testing.assert_allclose(shared[i], alone(i, x), rtol=1e-6)
        np.testing.assert_allclose(apart[i], alone(i, own[i]), rtol=1e-6)
    head = nn.Dense(3)
    heads = [head.init(jax.random.PRNGKey(i), jnp.zeros((1, 3))) for i in range(2)]
    both = jax.tree.map(lambda *p: jnp.stack(p), *heads)
    many = evaluate.evaluate(head, both, apart, jnp.asarray(y), batch_size=4, models=True)
    for i in range(2):
        one = evaluate.evaluate(head, heads[i], apart[i], jnp.asarray(y), batch_size=4)
        np.testing.assert_allclose(many["accuracy"][i], one["accuracy"], rtol=1e-6)
        np.testing.assert_allclose(many["loss"][i], one["loss"], rtol=1e-5)
        logits = np.asarray(apart[i]) @ np.asarray(heads[i]["params"]["kernel"]) + np.asarray(
            heads[i]["params"]["bias"]
        )
        np.testing.assert_allclose(one["accuracy"], (logits.argmax(-1) == y).mean(), rtol=1e-6)


def _mse(params, batch, key):
    x, y = batch
    err = jnp.mean((x @ params["w"] - y) ** 2)
    return err, {"mse": err}


def _regression():
    """8 examples ``[8, 3]`` and their targets ``[8, 1]`` (the sum of the features)."""
    x = jnp.asarray(RNG.normal(size=(8, 3)), jnp.float32)
    return x, x @ jnp.ones((3, 1))


def test_run_stage_reports_epochs_from_one_and_keeps_the_first_of_equal_bests():
    # evaluate_fn scores 0.5, 0.7, 0.7, 0.2, 0.1: the best is epoch 2 (the first 0.7),
    # and with patience 2 the stage stops after epoch 4.
    x, y = _regression()
    scores, seen, calls = iter([0.5, 0.7, 0.7, 0.2, 0.1]), [], []

    def evaluate_fn(params):
        calls.append(np.asarray(params["w"]).copy())
        return next(scores)

    class Store:  # a StageStore that keeps only the stage's wall seconds at each save
        walls: list = []  # noqa: RUF012
        finished = resume = lambda self, *args: None
        save_finished = lambda self, *args: None

        def save_epoch(self, name, state, key, record, best):
            self.walls.append(record.wall_s)

    start = time.perf_counter()
    spec = stage.Stage(
        "stage", _mse, OptimizerConfig("sgd", learning_rate=0.05), 5, 4,
        evaluate_fn=evaluate_fn, metric="metric", keep_best=True, patience=2,
    )  # fmt: skip
    params, record = stage.run_stage(
        spec, {"w": jnp.zeros((3, 1))}, (x, y), key=jax.random.PRNGKey(0), store=Store(),
        on_epoch=lambda name, epoch, metrics, s: seen.append((name, epoch, metrics["metric"], s)),
    )  # fmt: skip
    wall = time.perf_counter() - start
    assert [(n, e, m) for n, e, m, _ in seen] == [("stage", 1, 0.5), ("stage", 2, 0.7),
                                                  ("stage", 3, 0.7), ("stage", 4, 0.2)]  # fmt: skip
    assert record.best_epoch == 2 and len(record.history) == 4
    np.testing.assert_array_equal(params["w"], calls[1])  # the params evaluated at epoch 2
    assert sum(s for *_, s in seen) <= record.wall_s <= wall
    assert len(Store.walls) == 4 and Store.walls == sorted(Store.walls)
    assert seen[0][3] <= Store.walls[0] and Store.walls[-1] <= record.wall_s


def test_run_stage_without_keep_best_returns_the_last_epoch_and_its_loss():
    x, y = _regression()
    sgd = OptimizerConfig("sgd", learning_rate=0.05)
    params, record = stage.run_stage(
        stage.Stage("plain", _mse, sgd, 4, 8), {"w": jnp.zeros((3, 1))}, (x, y),
        key=jax.random.PRNGKey(0),
    )  # fmt: skip
    w, losses = np.zeros((3, 1)), []  # full-batch gradient descent, written out in numpy
    for _ in range(4):
        err = np.asarray(x) @ w - np.asarray(y)
        losses.append(float(np.mean(err**2)))
        w = w - 0.05 * 2 * np.asarray(x).T @ err / err.size
    np.testing.assert_allclose(params["w"], w, rtol=1e-5)
    assert record.best_epoch == 0  # no epoch was chosen
    np.testing.assert_allclose([h["loss"] for h in record.history], losses, rtol=1e-5)
    assert record.final_loss == record.history[3]["loss"]
    assert record.summary() == {
        "name": "plain", "epochs": 4, "wall_s": record.wall_s, "final_loss": record.final_loss
    }  # fmt: skip
    assert stage.StageRecord("none", 2).final_loss is None


def test_a_stage_its_store_has_finished_is_returned_without_training():
    done = ({"w": jnp.full((3, 1), 2.0)}, stage.StageRecord("stage", 3, 1.5, [{"loss": 0.1}]))

    class Store:
        finished = lambda self, name, template: done if name == "stage" else None
        resume = save_epoch = save_finished = lambda self, *args: pytest.fail("trained")

    out = stage.run_stage(
        stage.Stage("stage", _mse, OptimizerConfig("sgd", learning_rate=0.05), 3, 4),
        {"w": jnp.zeros((3, 1))}, _regression(), key=jax.random.PRNGKey(0), store=Store(),
        on_epoch=lambda *args: pytest.fail("trained"),
    )  # fmt: skip
    assert out is done


def test_run_stage_gives_each_model_its_own_learning_rate():
    x, y = _regression()
    w0, rates = {"w": jnp.zeros((3, 1))}, [0.05, 0.01]
    keys = jax.random.split(jax.random.PRNGKey(0))
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), w0)
    spec = stage.Stage(
        "many", _mse, OptimizerConfig("adam", learning_rate=0.3), 2, 4,
        learning_rate=jnp.asarray(rates),
    )  # fmt: skip
    many, record = stage.run_stage(spec, stacked, (x, y), key=keys, models=2)
    for i, rate in enumerate(rates):
        spec = stage.Stage("one", _mse, OptimizerConfig("adam", learning_rate=rate), 2, 4)
        one, alone = stage.run_stage(spec, w0, (x, y), key=keys[i])
        np.testing.assert_allclose(many["w"][i], one["w"], rtol=1e-5, atol=1e-7)
        losses = [h["loss"] for h in alone.history]
        np.testing.assert_allclose([h["loss"][i] for h in record.history], losses, rtol=1e-5)


def _recorded_pipeline(monkeypatch, config, **kwargs):
    """``run_pipeline`` on synthetic digits (40 training, 20 test images), recording
    for every ``fit`` the stage's name, its key, the shape of its inputs and the params
    it starts from."""
    fits = []
    real_fit = stage.fit

    def fit(loss_fn, params, optimizer, data, *, name, key, **kw):
        fits.append((name, np.asarray(key), data[0].shape, params))
        return real_fit(loss_fn, params, optimizer, data, name=name, key=key, **kw)

    monkeypatch.setattr(stage, "fit", fit)
    train, test = synthetic_digits(40, 1), synthetic_digits(20, 2)
    result = pipeline.run_pipeline(config, train, test, **kwargs)
    return result, fits


@pytest.mark.parametrize("pretrain,depth", [(True, 1), (True, 2), (False, 1)])
def test_every_stage_has_its_own_keys_from_the_seed(monkeypatch, pretrain, depth):
    # keys = split(PRNGKey(seed), depth + 2): one per pretraining layer, then the softmax
    # stage's and the fine-tuning stage's. A pretraining or softmax stage splits its key
    # into an init key and a fit key; without pretraining the stack is initialised from
    # the softmax stage's key.
    layers = synthetic_config().layers[:depth]
    config = synthetic_config(seed=11, layers=layers, finetune_epochs=1)
    _, fits = _recorded_pipeline(monkeypatch, config, pretrain=pretrain)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(11), depth + 2))
    halves = [np.asarray(jax.random.split(k)) for k in keys]
    names = [f"pretrain_{i + 1}" for i in range(depth)] + ["softmax"]
    if pretrain:
        sizes = [config.input_features] + [layer.features for layer in layers]
        pairs = zip(layers, sizes[:-1], strict=True)
        modules = [autoencoder(layer, n, config.bias_init) for layer, n in pairs]
        modules.append(softmax_head(config))
        want_init = [(m, halves[i][0], sizes[i]) for i, m in enumerate(modules)]
        want_fit = [(n, halves[i][1]) for i, n in enumerate(names)] + [("finetune", keys[-1])]
    else:
        want_init = [(classifier(config), keys[-2], config.input_features)]
        want_fit = [("finetune", keys[-1])]
    for (module, key, n), (_, _, _, params) in zip(want_init, fits, strict=False):
        want = init_params(module, jnp.asarray(key), n)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    assert [n for n, *_ in fits] == [n for n, _ in want_fit]
    np.testing.assert_array_equal([k for _, k, *_ in fits], [k for _, k in want_fit])


def test_model_config_is_the_config_of_one_model_of_a_sweep():
    config = synthetic_config()
    hparams = {"beta": [0.5, 2.0], "pretrain_learning_rate": [0.1, 0.2],
               "finetune_learning_rate": [0.3, 0.4]}  # fmt: skip
    one = sweep.model_config(config, [7, 8], hparams, 1)
    assert one.seed == 8
    assert [(lay.beta, lay.optimizer.learning_rate) for lay in one.layers] == [(2.0, 0.2)] * 2
    assert one.finetune_optimizer.learning_rate == 0.4
    assert one.softmax_optimizer == config.softmax_optimizer
    plain = sweep.model_config(config, [7, 8], None, 0)
    assert plain == config.replace(seed=7)
    rho = sweep.model_config(config, [7, 8], {"rho": [0.1, 0.2]}, 0)
    assert rho == config.replace(
        seed=7, layers=tuple(dataclasses.replace(lay, rho=0.1) for lay in config.layers)
    )


@pytest.mark.slow
def test_pipeline_runs_every_stage_in_order_on_the_codes_of_the_layers_below(monkeypatch):
    layer = dataclasses.replace(synthetic_config().layers[0], epochs=2)
    layers = tuple(dataclasses.replace(layer, features=f) for f in (48, 40, 32))
    config = synthetic_config(finetune_epochs=2, layers=layers)  # 64-48-40-32-4
    result, fits = _recorded_pipeline(monkeypatch, config)
    assert [(name, shape) for name, _, shape, _ in fits] == [
        ("pretrain_1", (40, 64)), ("pretrain_2", (40, 48)), ("pretrain_3", (40, 40)),
        ("softmax", (40, 32)), ("finetune", (40, 64)),
    ]  # fmt: skip
    assert [(s.name, s.epochs, len(s.history)) for s in result.stages] == [
        ("pretrain_1", 2, 2), ("pretrain_2", 2, 2), ("pretrain_3", 2, 2), ("softmax", 1, 1),
        ("finetune", 2, 2),
    ]  # fmt: skip
    model = pipeline.classifier(config)
    x, y = synthetic_digits(20, 2)
    final = evaluate.evaluate(model, result.params, x, y, config.eval_batch_size)
    assert result.stages[-1].history[-1]["test_accuracy"] == final["accuracy"]
    assert "test_accuracy" in result.stages[3].history[0]  # the softmax stage is judged too
    assert "test_accuracy" not in result.stages[0].history[0]


class _MemoryStore:
    """A ``StageStore`` in memory: host copies of what ``run_stage`` saves."""

    def __init__(self):
        self.saved = self.done = None

    def finished(self, name, template):
        return self.done

    def resume(self, name, template):
        if self.saved is None:
            return None
        state, record, best = self.saved
        return jax.tree.map(jnp.asarray, state), copy.deepcopy(record), best

    def save_epoch(self, name, state, key, record, best=None):
        host = jax.tree.map(np.array, (state, best))
        self.saved = (host[0], copy.deepcopy(record), host[1])

    def save_finished(self, name, params, record):
        self.done = (jax.tree.map(np.array, params), copy.deepcopy(record))


def test_a_keep_best_stage_of_several_models_resumes_as_if_never_stopped():
    x, y = _regression()
    scores = {0: [0.1, 0.5, 0.4, 0.6, 0.2, 0.1], 1: [0.3, 0.2, 0.9, 0.1, 0.1, 0.1]}
    rates, steps = np.array([0.05, 0.01]), 2  # 8 examples in batches of 4
    calls = []

    def slope(params, batch, key):  # d/dw = 1: after epoch e, w = -rate * steps * e
        return jnp.sum(params["w"]), {}

    def evaluate_fn(params):  # model 0 is best at epoch 4, model 1 at epoch 3
        epochs = np.rint(-np.asarray(params["w"])[:, 0, 0] / (rates * steps)).astype(int)
        calls.append(int(epochs[0]))
        return [scores[m][e - 1] for m, e in enumerate(epochs)]

    spec = stage.Stage(
        "stage", slope, OptimizerConfig("sgd", learning_rate=1.0), 6, 4,
        learning_rate=jnp.asarray(rates, jnp.float32), evaluate_fn=evaluate_fn, metric="metric",
        keep_best=True, patience=3,
    )  # fmt: skip

    def stage_run(store=None, on_epoch=None):
        calls.clear()
        return stage.run_stage(
            spec, {"w": jnp.zeros((2, 3, 1))}, (x, y), key=jnp.stack([jax.random.PRNGKey(0)] * 2),
            models=2, store=store, on_epoch=on_epoch,
        )  # fmt: skip

    whole, record = stage_run()
    store = _MemoryStore()

    def stop_after_two(name, epoch, metrics, seconds):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stage_run(store, stop_after_two)
    assert len(store.saved[1].history) == 2 and calls == [1, 2, 3]  # epoch 3 was queued
    calls.clear()
    params, again = stage.run_stage(
        spec, {"w": jnp.zeros((2, 3, 1))}, (x, y), key=jnp.stack([jax.random.PRNGKey(0)] * 2),
        models=2, store=store,
    )  # fmt: skip
    assert calls == [3, 4, 5, 6]  # the evaluations go on from the saved epoch
    assert record.best_epoch == again.best_epoch == [4, 3]
    np.testing.assert_allclose(
        [h["loss"] for h in again.history], [h["loss"] for h in record.history]
    )
    np.testing.assert_allclose(params["w"], whole["w"], rtol=1e-6)  # its own rates, resumed


@pytest.mark.parametrize("diverged_score", [np.nan, 0.95])
def test_a_model_that_diverges_in_a_keep_best_stage_stops_there_and_keeps_its_best(
    diverged_score,
):
    # Three models slide down sum(w) (gradient 1) at their own rates, 2 steps an epoch
    # (8 examples in batches of 4): after epoch e, model m's w is -2 * rates[m] * e,
    # exactly. Model 1's loss is sum(w) * inf once w < -1.1 (its limit): at its 6th
    # step, in epoch 3, where its w becomes -inf. The scores (the stage's metric) make
    # model 0 best at epoch 4, model 1 at epoch 2 and model 2 at epoch 1; with a
    # patience of 3, model 2 stops after epoch 4 and model 0 trains all 6 epochs.
    x, y = _regression()
    rates, limits = np.array([0.125, 0.25, 0.0625]), np.array([1e9, 1.1, 1e9])
    scores = [[0.1, 0.5, 0.4, 0.6, 0.2, 0.1], [0.2, 0.6, 0.7, 0.8, 0.9, 1.0],
              [0.9, 0.1, 0.3, 0.2, 0.5, 0.5]]  # fmt: skip

    def slide(params, batch, key, hparams):
        w = jnp.sum(params["w"])
        return w * jnp.where(w < -hparams["limit"], jnp.inf, 1.0), {}

    def evaluate_fn(params):  # a non-finite w (a diverged model) scores diverged_score:
        w = np.asarray(params["w"])[:, 0]  # NaN, or better than its best (as the accuracy
        epochs = -w / (2 * rates)  # of NaN logits, the share of class 0, may be)
        return [
            scores[m][round(float(e)) - 1] if np.isfinite(e) else diverged_score
            for m, e in enumerate(epochs)
        ]

    spec = stage.Stage(
        "stage", slide, OptimizerConfig("sgd", learning_rate=1.0), 6, 4,
        hparams={"limit": jnp.asarray(limits, jnp.float32)},
        learning_rate=jnp.asarray(rates, jnp.float32), evaluate_fn=evaluate_fn,
        metric="metric", keep_best=True, patience=3,
    )  # fmt: skip
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params, record = stage.run_stage(spec, {"w": jnp.zeros((3, 1))}, (x, y), key=keys, models=3)
    assert record.diverged == [False, True, False]
    assert record.epochs_trained == [6, 3, 4]  # model 1 stopped in the epoch it diverged
    assert record.best_epoch == [4, 2, 1]
    assert len(record.history) == 6
    np.testing.assert_array_equal(params["w"][:, 0], -2 * rates * [4, 2, 1])  # best epochs'
    losses = np.array([h["loss"] for h in record.history])  # [epochs, models]
    assert np.isfinite(losses[:2, 1]).all() and not np.isfinite(losses[2, 1])
    metric = np.array([h["metric"] for h in record.history])
    np.testing.assert_array_equal(metric[:2, 1], [0.2, 0.6])
    np.testing.assert_array_equal(metric[2:, 1], diverged_score)  # never its best
    # The others are unaffected: each epoch's loss is the mean of its two steps'
    # sum(w), -rate * (2e - 2) and -rate * (2e - 1), for every epoch each trained.
    e = np.arange(1, 7)
    np.testing.assert_array_equal(losses[:, 0], -rates[0] * (2 * e - 1.5))
    np.testing.assert_array_equal(losses[:4, 2], -rates[2] * (2 * e[:4] - 1.5))
    np.testing.assert_array_equal(metric[:, 0], scores[0])
    np.testing.assert_array_equal(metric[:, 2], scores[2][:4] + [scores[2][3]] * 2)
