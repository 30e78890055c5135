"""Data parallelism over 8 fake CPU devices, and vmapped sweeps of many models."""

import dataclasses
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO, synthetic_config, synthetic_digits

import sae_jax
from sae_jax.config import LayerConfig
from sae_jax.config.presets import ADAM
from sae_jax.training.hparams import SWEEP_NAMES
from sae_jax.training.pipeline import run_pipeline
from sae_jax.training.sweep import grid, model_config

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

SHARDED = textwrap.dedent(r"""
    import os
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
    import re
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from sae_jax.config import LayerConfig, tiny
    from sae_jax.training.loop import fit, init_state, make_epoch, make_train_step
    from sae_jax.training.optim import make_optimizer
    from sae_jax.training.loop import place_data
    from sae_jax.models import autoencoder, classifier, init_params
    from sae_jax.parallel import make_mesh
    from sae_jax.training.objectives import classifier_loss, layer_loss

    assert jax.device_count() == 8
    mesh = make_mesh()
    rng = np.random.default_rng(0)
    x = (rng.random((400, 64)) * 255).astype(np.uint8)
    y = rng.integers(0, 4, 400).astype(np.uint8)
    key = jax.random.PRNGKey(1)

    placed = place_data(x, mesh)  # small enough: whole on every device
    assert placed.sharding.is_fully_replicated, placed.sharding
    assert {s.data.shape for s in placed.addressable_shards} == {(400, 64)}
    placed = place_data(x, mesh, shard=True)
    assert placed.sharding.spec == P("data"), placed.sharding
    assert {s.data.shape for s in placed.addressable_shards} == {(50, 64)}
    # [models, n, ...]: split over the models axis where the count divides it
    xs = np.stack([x] * 4)
    assert place_data(xs, make_mesh(models=4), models=True).sharding.spec == P("models", None)
    assert place_data(xs[:3], make_mesh(models=2), models=True).sharding.spec == P(None, None)
    assert place_data(xs, mesh, models=True).sharding.spec == P(None, None)  # no models axis

    def compare(loss, params, opt, data):
        kw = dict(batch_size=40, epochs=1, key=key)
        one = fit(loss, params, opt, data, **kw).state
        many = fit(loss, params, opt, data, mesh=mesh, **kw).state
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            assert len(b.sharding.device_set) == 8 and b.sharding.is_fully_replicated
        epoch = make_epoch(make_train_step(loss, opt), 400, 40, mesh=mesh)
        state = jax.device_put(init_state(params, opt), jax.NamedSharding(mesh, P()))
        hlo = epoch.lower(state, tuple(place_data(a, mesh) for a in data), key).compile().as_text()
        assert "all-reduce" in hlo  # gradients are summed over the devices
        # Each device multiplies only its 40 / 8 = 5 rows of the minibatch: the
        # partitioned program's matmuls have 5 rows, never the whole batch of 40.
        dots = re.findall(r"= f32\[(\d+),(\d+)\]\{[^}]*\} dot\(", hlo)
        rows = {int(r) for r, _ in dots}
        assert dots and 5 in rows and not {40, 400} & rows, sorted(set(dots))

    layer = LayerConfig(features=16, rho=0.1, beta=1.0, weight_decay=1e-4,
                        noise="masking", noise_level=0.2)
    ae = autoencoder(layer, 64, "uniform")
    compare(layer_loss(ae, layer), init_params(ae, key, 64), make_optimizer(layer.optimizer), (x,))

    config = tiny().replace(input_features=64, num_classes=4,
                            layers=(LayerConfig(features=16), LayerConfig(features=8)))
    model = classifier(config)
    compare(classifier_loss(model), init_params(model, key, 64),
            make_optimizer(config.finetune_optimizer), (x, y))
    print("sharded path matches")
""")


def test_sharded_epochs_match_single_device():
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded path matches" in proc.stdout


SWEEP_SHARDED = textwrap.dedent(r"""
    import os, re, sys
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from conftest import synthetic_config, synthetic_digits
    from sae_jax.config import LayerConfig
    from sae_jax.training.loop import init_state, make_epoch, make_train_step
    from sae_jax.training.optim import make_optimizer
    from sae_jax.training.loop import place_data, state_sharding
    from sae_jax.models import autoencoder, init_params
    from sae_jax.parallel import make_mesh
    from sae_jax.training.sweep import sweep
    from sae_jax.training.objectives import layer_loss

    shapes = {m: dict(make_mesh(models=m).shape) for m in (32, 8, 2, 6, 3)}
    assert shapes == {32: {"models": 8, "data": 1}, 8: {"models": 8, "data": 1},
                      2: {"models": 2, "data": 4}, 6: {"models": 2, "data": 4},
                      3: {"models": 1, "data": 8}}, shapes
    layer = LayerConfig(features=16, epochs=2, noise="masking", noise_level=0.2)
    config = synthetic_config(batch_size=20, eval_batch_size=40, softmax_epochs=1,
                              finetune_epochs=1, layers=(layer,))
    train, test = synthetic_digits(160, 1), synthetic_digits(80, 2)
    # 8 models on 8 devices: one model per device.
    models = 8  # seeds 0-2 again and again, each time with another fine-tuning rate
    seeds = [i % 3 for i in range(models)]
    hparams = {
        "beta": [0.5 + i % 3 for i in range(models)],
        "finetune_learning_rate": [1e-3 * (1 + i // 3) for i in range(models)],
    }
    spread = sweep(config, train, test, seeds=seeds, hparams=hparams)  # every device
    for b in jax.tree.leaves(spread.params):
        assert b.sharding.spec[0] == "models", b.sharding
        assert {s.data.shape[0] for s in b.addressable_shards} == {1}  # its own model only
    alone = sweep(config, train, test, seeds=seeds, hparams=hparams, mesh=None)
    for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(spread.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    # The same 8 models on a mesh of 4 x 1: their 3 distinct pretrainings (the
    # beta of a seed is the same) are trained as 4 models (padded to the models
    # axis), then spread out as 8.
    shared = sweep(config, train, test, seeds=seeds, hparams=hparams, mesh=make_mesh(4, models=8))
    for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(shared.params)):
        assert b.sharding.spec[0] == "models", b.sharding
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    def compiled_epoch(models):
        mesh = make_mesh(models=models)
        module = autoencoder(layer, 64, "uniform")
        keys = jax.random.split(jax.random.PRNGKey(0), models)
        params = jax.vmap(lambda k: init_params(module, k, 64))(keys)
        opt = make_optimizer(layer.optimizer)
        where = state_sharding(mesh, True)
        state = jax.device_put(init_state(params, opt, models=models), where)
        epoch = make_epoch(make_train_step(layer_loss(module, layer), opt), 160, 20,
                           mesh=mesh, models=True, data_axis=None)
        data = (place_data(train[0], mesh),)
        return epoch.lower(state, data, jax.device_put(keys, where)).compile().as_text()

    # One model per device: the compiled epoch has no collective at all.
    collectives = re.findall(r"(all-reduce|all-gather|all-to-all|collective-permute)\(",
                             compiled_epoch(8))
    assert not collectives, sorted(set(collectives))
    # 2 models on 8 devices (2 x 4): each device multiplies 20 / 4 = 5 rows of the
    # minibatch of its one model, never the whole minibatch nor two models.
    dots = set(re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} dot\(", compiled_epoch(2)))
    assert {"5,64", "5,16"} <= dots and not any(d.startswith(("20,", "2,")) for d in dots), dots
    print("sweep spread over the devices")
""")


def test_a_sweep_spreads_its_models_over_the_devices():
    proc = subprocess.run(
        [sys.executable, "-c", SWEEP_SHARDED], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep spread over the devices" in proc.stdout, proc.stdout


def _config():
    layer = LayerConfig(
        features=16,
        rho=0.1,
        beta=1.0,
        weight_decay=1e-4,
        epochs=2,
        noise="masking",
        noise_level=0.2,
    )
    return synthetic_config(
        batch_size=25,
        eval_batch_size=50,
        softmax_epochs=1,
        layers=(layer, dataclasses.replace(layer, features=8, noise="none", noise_level=0.0)),
        finetune_epochs=2,
        finetune_optimizer=dataclasses.replace(ADAM, learning_rate=3e-3),
    )


LOSS_TERMS = ("rho", "beta", "l1", "contractive", "weight_decay")
# One value per model for every name a sweep takes, none of them the base config's.
SWEPT = {
    "rho": [0.05, 0.15, 0.2, 0.3],
    "beta": [0.5, 1.5, 2.0, 3.0],
    "l1": [0.05, 0.1, 0.2, 0.4],
    "contractive": [0.1, 0.3, 1.0, 3.0],
    "weight_decay": [1e-3, 3e-3, 1e-2, 3e-2],
    "noise_level": [0.1, 0.25, 0.3, 0.4],
    "pretrain_learning_rate": [2e-3, 4e-3, 1e-2, 2e-2],
    "softmax_learning_rate": [3e-3, 2e-2, 5e-3, 1e-2],
    "finetune_learning_rate": [1e-3, 2e-3, 4e-3, 5e-3],
    "input_keep": [0.9, 0.8, 0.95, 1.0],
    "hidden_keep": [0.5, 0.7, 0.9, 0.6],
}


def test_sweep_equals_separate_runs():
    # The terms a sweep can switch on start switched off: a swept value must both
    # switch its term on and set its weight.
    config = _config()
    config = config.replace(
        layers=tuple(
            dataclasses.replace(layer, beta=0.0, l1=0.0, contractive=0.0, weight_decay=0.0)
            for layer in config.layers
        )
    )
    train, test = synthetic_digits(200, 1), synthetic_digits(100, 2)
    assert set(SWEPT) == set(SWEEP_NAMES)
    seeds, v = [0, 1, 2, 3], SWEPT
    sweep = sae_jax.sweep(config, train, test, seeds=seeds, hparams=SWEPT)
    assert len(sweep.test["accuracy"]) == 4
    for i in (0, 3):  # the first and the last model, each against its own run alone
        seed = seeds[i]
        pretrain_optimizer = dataclasses.replace(
            config.layers[0].optimizer, learning_rate=v["pretrain_learning_rate"][i]
        )
        layers = tuple(
            dataclasses.replace(
                layer,
                **{name: v[name][i] for name in LOSS_TERMS},
                noise_level=v["noise_level"][i] if layer.noise != "none" else 0.0,
                optimizer=pretrain_optimizer,
            )
            for layer in config.layers
        )
        alone_config = config.replace(
            seed=seed,
            layers=layers,
            softmax_optimizer=dataclasses.replace(
                config.softmax_optimizer, learning_rate=v["softmax_learning_rate"][i]
            ),
            finetune_optimizer=dataclasses.replace(
                config.finetune_optimizer, learning_rate=v["finetune_learning_rate"][i]
            ),
            finetune_input_keep=v["input_keep"][i],
            finetune_hidden_keep=v["hidden_keep"][i],
        )
        assert model_config(config, seeds, SWEPT, i) == alone_config
        alone = run_pipeline(alone_config, train, test)
        # Every stage's metrics, epoch by epoch: each loss term of each pretraining layer.
        for swept_stage, alone_stage in zip(sweep.stages, alone.stages, strict=True):
            assert len(swept_stage.history) == len(alone_stage.history)
            for got, want in zip(swept_stage.history, alone_stage.history, strict=True):
                assert set(got) == set(want)
                for name in set(want) - {"seconds", "test_accuracy"}:
                    assert got[name][i] == pytest.approx(want[name], rel=1e-4), (
                        swept_stage.name,
                        name,
                    )
        for swept_layer, alone_layer in zip(sweep.layers, alone.layers, strict=True):
            for a, b in zip(
                jax.tree.leaves(alone_layer.params),
                jax.tree.leaves(swept_layer.params),
                strict=True,
            ):
                np.testing.assert_allclose(a, b[i], rtol=1e-4, atol=1e-5)
        for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(sweep.params), strict=True):
            np.testing.assert_allclose(a, b[i], rtol=1e-4, atol=1e-5)
        assert sweep.test["accuracy"][i] == pytest.approx(alone.test["accuracy"], abs=0.011)


def test_no_pretraining_baseline():
    config, train, test = _config(), synthetic_digits(200, 1), synthetic_digits(100, 2)
    result = run_pipeline(config, train, test, pretrain=False)
    assert [s.name for s in result.stages] == ["finetune"] and result.layers == []
    swept = run_pipeline(config, train, test, seeds=[0, 1], pretrain=False)
    assert len(swept.test["accuracy"]) == 2
    np.testing.assert_allclose(swept.test["accuracy"][0], result.test["accuracy"], atol=0.011)


def test_models_that_pretrain_alike_share_one_pretraining():
    # Models 0 and 1 differ in fine-tuning only; 2 has another seed, 3 another beta.
    config, train, test = _config(), synthetic_digits(200, 1), synthetic_digits(100, 2)
    seeds = [0, 0, 1, 0]
    hparams = {
        "beta": [1.0, 1.0, 1.0, 2.0],
        "finetune_learning_rate": [3e-3, 1e-2, 3e-3, 3e-3],
        "hidden_keep": [1.0, 0.8, 1.0, 1.0],
    }
    trained: dict[str, tuple] = {}
    on_epoch = lambda stage, epoch, metrics, s: trained.setdefault(stage, np.shape(metrics["loss"]))
    sweep = run_pipeline(config, train, test, seeds=seeds, hparams=hparams, on_epoch=on_epoch)
    assert trained == {"pretrain_1": (3,), "pretrain_2": (3,), "softmax": (3,), "finetune": (4,)}
    i = 1  # model 1, pretrained as model 0, against its own run alone
    alone = run_pipeline(model_config(config, seeds, hparams, i), train, test)
    for swept_stage, alone_stage in zip(sweep.stages, alone.stages, strict=True):
        for got, want in zip(swept_stage.history, alone_stage.history, strict=True):
            assert got["loss"][i] == pytest.approx(want["loss"], rel=1e-4), swept_stage.name
    swept_params = [layer.params for layer in sweep.layers] + [sweep.params]
    alone_params = [layer.params for layer in alone.layers] + [alone.params]
    for a, b in zip(jax.tree.leaves(alone_params), jax.tree.leaves(swept_params), strict=True):
        np.testing.assert_allclose(a, b[i], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        sweep.layers[0].params["params"]["encoder"]["kernel"][0],
        sweep.layers[0].params["params"]["encoder"]["kernel"][1],
    )


def test_sweep_arguments_are_checked():
    config, train = _config(), synthetic_digits(100, 1)
    with pytest.raises(ValueError, match="cannot sweep 'momentum'"):
        run_pipeline(config, train, seeds=[0, 1], hparams={"momentum": [0.1, 0.2]})
    with pytest.raises(ValueError, match=r"hparams\['beta'\] has 3 values for 2 seeds"):
        run_pipeline(config, train, seeds=[0, 1], hparams={"beta": [1, 2, 3]})
    with pytest.raises(ValueError, match="hparams need seeds"):
        run_pipeline(config, train, hparams={"beta": [1.0]})


def test_grid_is_every_combination_with_every_seed_value_major():
    assert grid([3, 4]) == ([3, 4], {}, [{}])
    assert grid([3, 4], {}) == ([3, 4], {}, [{}])
    seeds, hparams, points = grid([3, 4], {"beta": [1.0, 2.0, 3.0]})
    assert seeds == [3, 4, 3, 4, 3, 4]
    assert hparams == {"beta": [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]}
    assert points == [{"beta": 1.0}, {"beta": 2.0}, {"beta": 3.0}]
    seeds, hparams, points = grid([0, 1], {"beta": [1.0, 2.0], "rho": [0.1, 0.2, 0.3]})
    assert len(seeds) == 12 and all(len(v) == 12 for v in hparams.values())
    assert points == [{"beta": b, "rho": r} for b in (1.0, 2.0) for r in (0.1, 0.2, 0.3)]
    for k, seed in enumerate(seeds):  # model k: point k // len(seeds), seed k % len(seeds)
        assert seed == [0, 1][k % 2]
        assert {name: v[k] for name, v in hparams.items()} == points[k // 2]
