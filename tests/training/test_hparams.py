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
from sae_jax.training.pipeline import run_pipeline
from sae_jax.training.search import checked_points, point_config

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


def test_a_single_run_is_a_sweep_of_one_model():
    config = synthetic_config(batch_size=25, eval_batch_size=50).with_epochs(2)
    train, test = synthetic_digits(100, 1), synthetic_digits(40, 2)
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
