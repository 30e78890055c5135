"""One route for every value a sweep may vary: the per-model ``HParams`` pytree, read
by the losses and the optimizers; the names a sweep takes, said once; values that
change nothing refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_config, synthetic_digits

from sae_jax.config import LayerConfig, sda3, tiny
from sae_jax.errors import ConfigError
from sae_jax.models import autoencoder, init_params
from sae_jax.training import stage
from sae_jax.training.hparams import (
    PRETRAINING_NAMES,
    SWEEP_NAMES,
    SWEEPABLE,
    LayerHParams,
    check_models,
    check_sweep,
    hparams_of,
    layer_hparams,
    stack,
    structure,
    with_values,
)
from sae_jax.training.objectives import layer_loss
from sae_jax.training.optim import RateState
from sae_jax.training.pipeline import run_pipeline
from sae_jax.training.search import checked_points, point_config
from sae_jax.training.sweep import sweep

LAYER = LayerConfig(
    features=6, rho=0.1, beta=2.0, l1=0.3, contractive=0.2, weight_decay=0.01,
    noise="masking", noise_level=0.25,
)  # fmt: skip


def test_the_pytree_holds_every_value_a_sweep_names():
    noisy = [dataclasses.replace(la, noise="masking", noise_level=0.1) for la in tiny().layers]
    config = tiny().replace(layers=tuple(noisy))
    hp = hparams_of(config)
    assert len(hp.layers) == len(config.layers)
    assert hp.layers[0].beta == np.float32(config.layers[0].beta)
    assert hp.layers[1].learning_rate == np.float32(config.layers[1].optimizer.learning_rate)
    assert hp.finetune_learning_rate == np.float32(config.finetune_optimizer.learning_rate)
    for name in SWEEP_NAMES:  # writing a name's value moves exactly its leaves
        changed = hparams_of(with_values(config, {name: 0.5}))
        moved = [
            path for path, a, b in _leaf_pairs(hp, changed) if not np.array_equal(a, b)
        ]  # fmt: skip
        assert moved, name
        assert structure(with_values(config, {name: 0.5})) == structure(config), name
    assert set(PRETRAINING_NAMES) == {n for n, s in SWEEPABLE.items() if s.pretraining}
    assert "finetune_learning_rate" not in PRETRAINING_NAMES


def _leaf_pairs(a, b):
    paths = jax.tree_util.tree_flatten_with_path(a)[0]
    return [(p, x, y) for (p, x), y in zip(paths, jax.tree.leaves(b), strict=True)]


def test_stacked_leaves_have_a_model_axis_and_models_must_share_the_rest():
    configs = [tiny().replace(seed=s) for s in (0, 1, 2)]
    hp = stack(configs)
    assert all(np.shape(leaf) == (3,) for leaf in jax.tree.leaves(hp))
    check_sweep(configs)
    wider = dataclasses.replace(tiny().layers[0], features=65)
    with pytest.raises(ValueError, match="model 1 differs from model 0 in layers"):
        check_sweep([tiny(), tiny().replace(layers=(wider, tiny().layers[1]))])


@pytest.mark.parametrize("name", [*LayerHParams._fields[:-1]])
def test_the_layer_loss_reads_its_values_from_the_pytree(name):
    other = dataclasses.replace(LAYER, **{name: getattr(LAYER, name) / 2})
    module = autoencoder(LAYER, 10, "uniform")
    params = init_params(module, jax.random.PRNGKey(0), 10)
    batch = (jax.random.uniform(jax.random.PRNGKey(1), (8, 10)),)
    key = jax.random.PRNGKey(2)
    want, _ = jax.jit(layer_loss(module, other))(params, batch, key)
    loss = jax.jit(layer_loss(module, LAYER))
    got, _ = loss(params, batch, key, hparams=layer_hparams(other))
    mine, _ = loss(params, batch, key)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.isclose(mine, want)  # the value does change the loss


def _one_step_config():
    """One denoising layer, one step a stage on ``synthetic_digits(40, 1)``: as good a
    test of the route as more, and the cheapest programs to compile (the two tests of a
    single run and of a sweep of three share them)."""
    layer = LayerConfig(features=12, noise="masking", epochs=1)
    return synthetic_config(
        layers=(layer,), batch_size=40, eval_batch_size=40, softmax_epochs=1, finetune_epochs=1
    )


def test_a_single_run_is_a_sweep_of_one_model():
    config = _one_step_config()
    train, test = synthetic_digits(40, 1), synthetic_digits(40, 2)
    alone = run_pipeline(config, train, test)
    one = run_pipeline([config], train, test, mesh=None)
    for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(one.params), strict=True):
        np.testing.assert_allclose(b[0], a, rtol=1e-5, atol=1e-6)
    for s, a in zip(one.stages, alone.stages, strict=True):
        assert [h["loss"][0] for h in s.history] == pytest.approx([h["loss"] for h in a.history])


def test_a_swept_value_that_changes_nothing_is_refused():
    with pytest.raises(ConfigError, match="noise_level changes nothing here: every layer's noise"):
        check_models(tiny(), [0, 0], {"noise_level": [0.1, 0.5]})
    no_sparsity = tiny().replace(
        layers=tuple(dataclasses.replace(la, beta=0.0) for la in tiny().layers)
    )
    with pytest.raises(ConfigError, match="rho changes nothing here: rho is the sparsity target"):
        check_models(no_sparsity, [0, 0], {"rho": [0.05, 0.1]})
    check_models(no_sparsity, [0] * 4, {"beta": [0.0, 0.0, 1.0, 1.0], "rho": [0.05, 0.1] * 2})
    with pytest.raises(ConfigError, match="softmax_learning_rate changes nothing here"):
        check_models(tiny().replace(softmax_epochs=0), [0, 0], {"softmax_learning_rate": [1, 2]})
    with pytest.raises(ConfigError, match="cannot sweep 'momentum'"):
        check_models(tiny(), [0], {"momentum": [0.5]})


def test_a_noise_level_of_0_is_no_corruption_and_can_be_searched():
    space = {"noise_level": [0.0, 0.1, 0.25, 0.4]}
    points = checked_points(sda3(), space)
    assert [point_config(sda3(), p).layers[0].noise_level for p in points] == space["noise_level"]
    module = autoencoder(dataclasses.replace(LAYER, noise_level=0.0), 10, "uniform")
    params = init_params(module, jax.random.PRNGKey(0), 10)
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 10))
    clean = dataclasses.replace(LAYER, noise="none", noise_level=0.0)
    for key in (jax.random.PRNGKey(3), jax.random.PRNGKey(4)):
        masked, _ = layer_loss(module, dataclasses.replace(LAYER, noise_level=0.0))(
            params, (x,), key
        )
        none, _ = layer_loss(module, clean)(params, (x,), key)
        np.testing.assert_allclose(masked, none, rtol=1e-6)
    assert jnp.isfinite(masked)


# Three models' values of every name a sweep takes: no two models alike, no two names
# alike, and no list the same backwards.
PER_MODEL = {
    "rho": [0.05, 0.1, 0.2],
    "beta": [0.5, 1.5, 3.0],
    "l1": [0.01, 0.02, 0.04],
    "contractive": [0.03, 0.06, 0.12],
    "weight_decay": [0.001, 0.004, 0.002],
    "noise_level": [0.15, 0.35, 0.25],
    "pretrain_learning_rate": [0.011, 0.033, 0.022],
    "softmax_learning_rate": [0.021, 0.052, 0.1],
    "finetune_learning_rate": [0.003, 0.009, 0.006],
    "input_keep": [0.9, 0.8, 0.7],
    "hidden_keep": [0.6, 0.75, 0.5],
}


def _by_hand(config, seed, values):
    """Model ``values``' config written out field by field (no ``SWEEPABLE`` writer)."""
    rate = lambda opt, name: dataclasses.replace(opt, learning_rate=values[name])
    layers = tuple(
        dataclasses.replace(
            layer,
            rho=values["rho"],
            beta=values["beta"],
            l1=values["l1"],
            contractive=values["contractive"],
            weight_decay=values["weight_decay"],
            noise_level=values["noise_level"],
            optimizer=rate(layer.optimizer, "pretrain_learning_rate"),
        )
        for layer in config.layers
    )
    return config.replace(
        seed=seed,
        layers=layers,
        softmax_optimizer=rate(config.softmax_optimizer, "softmax_learning_rate"),
        finetune_optimizer=rate(config.finetune_optimizer, "finetune_learning_rate"),
        finetune_input_keep=values["input_keep"],
        finetune_hidden_keep=values["hidden_keep"],
    ).validate()


def test_each_models_values_are_its_own_leaves_of_the_stacked_pytree():
    # The pytree that a sweep of 3 models trains with (its validated model configs,
    # stacked): leaf [i] holds model i's value, read here field by field from the
    # config written out by hand, in every layer.
    assert set(PER_MODEL) == set(SWEEP_NAMES)  # a new sweepable name must be added here
    layer = LayerConfig(features=12, noise="masking", epochs=1)
    config = synthetic_config(layers=(layer, dataclasses.replace(layer, features=6)))
    seeds = [3, 4, 5]
    hp = stack(check_models(config, seeds, PER_MODEL))
    own = [
        _by_hand(config, s, {k: v[i] for k, v in PER_MODEL.items()}) for i, s in enumerate(seeds)
    ]
    f32 = lambda values: np.asarray(values, np.float32)
    assert len(hp.layers) == 2
    for k, leaves in enumerate(hp.layers):
        for name in LayerHParams._fields[:-1]:
            want = f32([getattr(c.layers[k], name) for c in own])
            np.testing.assert_array_equal(getattr(leaves, name), want, err_msg=f"layer {k}: {name}")
        want = f32([c.layers[k].optimizer.learning_rate for c in own])
        np.testing.assert_array_equal(leaves.learning_rate, want, err_msg=f"layer {k}: rate")
    for leaf, want in [
        (hp.softmax_learning_rate, [c.softmax_optimizer.learning_rate for c in own]),
        (hp.finetune_learning_rate, [c.finetune_optimizer.learning_rate for c in own]),
        (hp.input_keep, [c.finetune_input_keep for c in own]),
        (hp.hidden_keep, [c.finetune_hidden_keep for c in own]),
    ]:
        np.testing.assert_array_equal(leaf, f32(want))


def test_each_model_of_a_sweep_gets_its_own_values_and_trains_as_its_own_run(monkeypatch):
    # A sweep of 3 models, each with its own value of every name of SWEEP_NAMES: each
    # stage's fit gets, as model i's loss values and learning rate, exactly those of
    # model i's config (written out by hand); and model i of the sweep trains to the
    # params of a run of that config alone.
    config = _one_step_config()
    seeds = [3, 4, 5]
    own = [
        _by_hand(config, s, {k: v[i] for k, v in PER_MODEL.items()}) for i, s in enumerate(seeds)
    ]
    train = synthetic_digits(40, 1)
    fits = {}
    real_fit = stage.fit

    def fit(loss_fn, params, optimizer, data, *, name, state, hparams, **kw):
        is_rate = lambda node: isinstance(node, RateState)
        (rate,) = [n for n in jax.tree.leaves(state.opt_state, is_leaf=is_rate) if is_rate(n)]
        fits[name] = (hparams, np.asarray(rate.learning_rate))
        return real_fit(
            loss_fn, params, optimizer, data, name=name, state=state, hparams=hparams, **kw
        )

    with monkeypatch.context() as patch:
        patch.setattr(stage, "fit", fit)
        swept = sweep(config, train, seeds=seeds, hparams=PER_MODEL, mesh=None)
    f32 = lambda values: np.asarray(values, np.float32)
    assert list(fits) == ["pretrain_1", "softmax", "finetune"]
    hp, rate = fits["pretrain_1"]
    for name in LayerHParams._fields[:-1]:
        want = f32([getattr(c.layers[0], name) for c in own])
        np.testing.assert_array_equal(getattr(hp, name), want, err_msg=name)
    want = f32([c.layers[0].optimizer.learning_rate for c in own])
    np.testing.assert_array_equal(rate, want, err_msg="the pretraining optimizer's rate")
    _, rate = fits["softmax"]
    np.testing.assert_array_equal(rate, f32([c.softmax_optimizer.learning_rate for c in own]))
    hp, rate = fits["finetune"]
    np.testing.assert_array_equal(rate, f32([c.finetune_optimizer.learning_rate for c in own]))
    np.testing.assert_array_equal(hp["input_keep"], f32([c.finetune_input_keep for c in own]))
    np.testing.assert_array_equal(hp["hidden_keep"], f32([c.finetune_hidden_keep for c in own]))
    for i, alone_config in enumerate(own):
        alone = run_pipeline(alone_config, train)
        for s, a in zip(swept.stages, alone.stages, strict=True):
            assert [h["loss"][i] for h in s.history] == pytest.approx(
                [h["loss"] for h in a.history], rel=1e-4
            ), (i, s.name)
        for b, a in zip(jax.tree.leaves(swept.params), jax.tree.leaves(alone.params), strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-4, atol=1e-5, err_msg=f"model {i}")
