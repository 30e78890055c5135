"""Presets and validation."""

import dataclasses
import math

import pytest

from sae_jax.config import LayerConfig, seed, tiny
from sae_jax.config.presets import get_preset
from sae_jax.errors import ConfigError


def test_seed_preset_is_the_tutorial_experiment():
    c = seed().validate(num_train=60000)
    assert [layer.features for layer in c.layers] == [1000, 1500]
    assert c.input_features == 784 and c.num_classes == 10 and c.batch_size == 160
    assert c.bias_init == "uniform" and c.softmax_epochs == 0 and c.finetune_epochs == 10
    for layer in c.layers:
        assert (layer.activation, layer.decoder_activation) == ("sigmoid", "sigmoid")
        assert (layer.reconstruction, layer.batch_reduction) == ("squared_error", "sum")
        assert (layer.rho, layer.beta, layer.weight_decay, layer.epochs) == (0.1, 3.0, 1e-4, 10)
        assert (layer.optimizer.name, layer.optimizer.learning_rate) == ("adam", 1e-3)
        assert not layer.tied and layer.noise == "none"
    opt = c.finetune_optimizer
    assert (opt.name, opt.learning_rate, opt.decay, opt.momentum, opt.eps) == (
        "rmsprop",
        1e-3,
        0.9,
        0.0,
        1e-10,
    )


def test_with_epochs_overrides_every_run_stage():
    c = seed().with_epochs(2)
    assert [layer.epochs for layer in c.layers] == [2, 2]
    assert c.finetune_epochs == 2 and c.softmax_epochs == 0  # the seed skips that stage
    assert tiny().with_epochs(3).softmax_epochs == 3


def _with_layer(**changes):
    c = tiny()
    return c.replace(layers=(dataclasses.replace(c.layers[0], **changes), *c.layers[1:]))


def _with_finetune_lr(rate):
    c = tiny()
    return c.replace(
        finetune_optimizer=dataclasses.replace(c.finetune_optimizer, learning_rate=rate)
    )


SEED_RANGE = r"seed must be an integer in \[0, 4294967296\), got "


@pytest.mark.parametrize(
    "config,message",
    [
        (_with_layer(rho=0.0), r"layers\[0\].rho must be in \(0, 1\), got 0.0"),
        (_with_layer(rho=1.0), r"layers\[0\].rho must be in \(0, 1\), got 1.0"),
        (_with_layer(features=0), r"layers\[0\].features must be a positive integer, got 0"),
        (_with_layer(noise="masking", noise_level=-0.1), r"layers\[0\].noise_level must be >= 0"),
        (
            _with_layer(noise="none", noise_level=0.3),
            r"layers\[0\].noise_level=0.3 changes nothing with noise='none': set layers\[0\].noise",
        ),
        (_with_layer(noise="masking", noise_level=1.5), r"layers\[0\].noise_level is a rate"),
        (_with_layer(top_k=65), r"layers\[0\].top_k=65 is larger than features=64"),
        (_with_layer(activation="tanh"), r"layers\[0\].activation must be one of"),
        (_with_layer(activation="relu"), r"need sigmoid units"),
        (_with_layer(beta=-1.0), r"layers\[0\].beta must be >= 0"),
        (tiny().replace(batch_size=0), r"batch_size must be a positive integer, got 0"),
        (tiny().replace(layers=()), r"layers must hold at least one layer"),
        (tiny().replace(finetune_patience=0), r"finetune_patience must be a positive integer"),
        (_with_layer(reconstruction_scale=0.0), r"layers\[0\].reconstruction_scale must be > 0"),
        (_with_finetune_lr(-1.0), r"finetune_optimizer.learning_rate must be > 0, got -1.0"),
        (
            _with_finetune_lr(math.inf),
            r"finetune_optimizer.learning_rate must be a finite number, got inf",
        ),
        (
            _with_finetune_lr(math.nan),
            r"finetune_optimizer.learning_rate must be a finite number, got nan",
        ),
        (
            _with_layer(
                optimizer=dataclasses.replace(tiny().layers[0].optimizer, learning_rate=math.inf)
            ),
            r"layers\[0\].optimizer.learning_rate must be a finite number, got inf",
        ),
        (_with_layer(beta=math.inf), r"layers\[0\].beta must be a finite number, got inf"),
        (tiny().replace(seed=-1), SEED_RANGE + "-1$"),
        (tiny().replace(seed=2**32), SEED_RANGE + "4294967296$"),
        (tiny().replace(seed=1.5), SEED_RANGE + "1.5$"),
    ],
)
def test_invalid_values_are_refused_with_their_name(config, message):
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_seed_range_ends_are_accepted():
    assert tiny().replace(seed=0).validate().seed == 0
    assert tiny().replace(seed=2**32 - 1).validate().seed == 2**32 - 1


def test_batch_larger_than_data():
    with pytest.raises(ConfigError, match=r"batch_size=160 is larger than the 100 training"):
        seed().validate(num_train=100)
    with pytest.raises(ConfigError, match=r"batch_size=25 is larger than the 20 training"):
        tiny().replace(train_examples=20).validate(num_train=60000)


def test_unknown_preset():
    with pytest.raises(
        ConfigError,
        match=r"unknown preset 'sead'; choose from sda3, sda3_dropout, seed, tiny, ufldl",
    ):
        get_preset("sead")


def test_validation_split_is_checked():
    with pytest.raises(ConfigError, match=r"validation_examples=1000 leaves no training"):
        tiny().replace(validation_examples=1000).validate(num_train=60000)
    with pytest.raises(ConfigError, match=r"batch_size=25 is larger than the 10 training"):
        tiny().replace(validation_examples=990).validate(num_train=60000)


def test_paper_presets():
    u, s = get_preset("ufldl").validate(60000), get_preset("sda3").validate(60000)
    assert [layer.features for layer in u.layers] == [200, 200] and u.validation_examples == 10000
    assert (u.layers[0].rho, u.layers[0].beta, u.layers[0].weight_decay) == (0.1, 3.0, 3e-3)
    assert u.layers[0].reconstruction_scale == 0.5 and u.layers[0].batch_reduction == "mean"
    assert [layer.noise_level for layer in s.layers] == [0.1, 0.2, 0.3]
    assert all(layer.tied and layer.reconstruction == "cross_entropy" for layer in s.layers)
    assert u.layer_sizes == [784, 200, 200] and s.layer_sizes == [784, 1000, 1000, 1000]
    d = get_preset("sda3_dropout").validate(60000)  # sda3's pretraining, dropout fine-tuning
    assert d.layers == s.layers and (d.finetune_input_keep, d.finetune_hidden_keep) == (0.8, 0.8)
    assert d.finetune_optimizer.learning_rate == 1e-3 and s.finetune_input_keep == 1.0


def test_layer_defaults_valid():
    tiny().replace(layers=(LayerConfig(features=3),)).validate()
