"""The whole pipeline end to end on a few hundred synthetic examples."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import synthetic_config, synthetic_digits

from sae_jax.config import LayerConfig
from sae_jax.config.presets import ADAM
from sae_jax.models import classifier
from sae_jax.training.evaluate import encode_dataset, evaluate
from sae_jax.training.pipeline import run_pipeline


@pytest.mark.slow
def test_pipeline_end_to_end_learns():
    layer = LayerConfig(
        features=24,
        rho=0.1,
        beta=0.5,
        weight_decay=1e-4,
        epochs=3,
        noise="masking",
        noise_level=0.2,
    )
    config = synthetic_config(
        batch_size=32,
        layers=(layer, dataclasses.replace(layer, features=12, noise="none", noise_level=0.0)),
        softmax_epochs=3,
        softmax_optimizer=dataclasses.replace(ADAM, learning_rate=1e-2),
        finetune_epochs=5,
        finetune_optimizer=dataclasses.replace(ADAM, learning_rate=1e-2),
        eval_batch_size=64,
    ).validate(num_train=300)
    train, test = synthetic_digits(300, 1), synthetic_digits(200, 2)
    seen = []
    result = run_pipeline(
        config, train, test, on_epoch=lambda stage, epoch, m, s: seen.append((stage, epoch, m))
    )

    assert [(s, e) for s, e, _ in seen] == [
        *[("pretrain_1", e) for e in (1, 2, 3)],
        *[("pretrain_2", e) for e in (1, 2, 3)],
        *[("softmax", e) for e in (1, 2, 3)],
        *[("finetune", e) for e in range(1, 6)],
    ]
    assert all("test_accuracy" in m for s, _, m in seen if s in ("softmax", "finetune"))
    assert [s.name for s in result.stages] == ["pretrain_1", "pretrain_2", "softmax", "finetune"]
    for stage in result.stages[:2]:
        assert stage.history[-1]["reconstruction"] < stage.history[0]["reconstruction"]
    assert result.test["accuracy"] > 0.9
    assert seen[-1][2]["test_accuracy"] == result.test["accuracy"]
    # The frozen layers were not changed by fine-tuning, and the codes still chain.
    codes = encode_dataset(result.layers, train[0], 64)
    assert codes.shape == (300, 12)
    tuned = result.params["params"]["encoders_0"]["kernel"]
    assert not np.allclose(tuned, result.layers[0].encoder_params["kernel"])
    again = evaluate(classifier(config), result.params, *test, batch_size=7)
    np.testing.assert_allclose(again["accuracy"], result.test["accuracy"])


def test_pipeline_is_deterministic_and_zero_epoch_stages_work():
    config = synthetic_config(batch_size=25, eval_batch_size=50, softmax_epochs=0).with_epochs(1)
    train, test = synthetic_digits(100, 3), synthetic_digits(60, 4)
    a = run_pipeline(config, train, test)
    b = run_pipeline(config, train, test)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.stages[2].name == "softmax" and a.stages[2].final_loss is None


def test_validation_split_keeps_the_best_epoch_and_stops_early():
    config = (
        synthetic_config(
            batch_size=25,
            eval_batch_size=50,
            finetune_patience=2,
            finetune_optimizer=dataclasses.replace(ADAM, learning_rate=0.05),  # noisy on purpose
        )
        .with_epochs(1)
        .replace(softmax_epochs=3, finetune_epochs=30)
    )
    train, validation, test = (synthetic_digits(n, s) for n, s in ((200, 1), (80, 2), (80, 3)))
    seen = []
    result = run_pipeline(
        config,
        train,
        test,
        validation=validation,
        on_epoch=lambda stage, epoch, m, s: seen.append((stage, m)),
    )
    finetune = result.stages[-1]
    assert all(
        "validation_accuracy" in m and "test_accuracy" not in m
        for stage, m in seen
        if stage in ("softmax", "finetune")
    )
    accs = [h["validation_accuracy"] for h in finetune.history]
    best = int(np.argmax(accs)) + 1  # the first epoch reaching the maximum
    assert finetune.best_epoch == best
    assert len(accs) == best + 2 < 30  # stopped after 2 epochs without a new best
    again = evaluate(classifier(config), result.params, *validation, batch_size=50)
    assert again["accuracy"] == pytest.approx(accs[best - 1])  # the best epoch's params
    assert set(result.test) == {"accuracy", "loss"}
    # Before fine-tuning: the softmax stage's best model on the test set, which is what
    # the same run without fine-tuning tests.
    unfinetuned = run_pipeline(
        config.replace(finetune_epochs=0), train, test, validation=validation
    )
    assert result.test_before_finetune == pytest.approx(unfinetuned.test, rel=1e-6)
    assert result.test_before_finetune != pytest.approx(result.test, rel=1e-3)


# A bad split's labels or images, and the message expected for it (after "<split> ").
BAD_SPLITS = {
    "label_is_num_classes": (
        lambda x, y: (x, np.where(y == 0, 4, y)),
        r"labels: label 4 is outside 0\.\.3 \(num_classes=4\)",
    ),
    "negative_label": (
        lambda x, y: (x, y.astype(np.int32) - 1),
        r"labels: label -1 is outside 0\.\.3 \(num_classes=4\)",
    ),
    "float_labels": (
        lambda x, y: (x, y.astype(np.float32)),
        r"labels: expected an integer dtype; got float32",
    ),
    "length_mismatch": (
        lambda x, y: (x, y[:-1]),
        r"labels: expected shape \(20,\), one per image; got shape \(19,\)",
    ),
    "wrong_features": (
        lambda x, y: (x[:, :63], y),
        r"images: expected \[n, 64\] with n >= 1; got shape \(20, 63\)",
    ),
    "empty": (
        lambda x, y: (x[:0], y[:0]),
        r"images: expected \[n, 64\] with n >= 1; got shape \(0, 64\)",
    ),
}


@pytest.mark.parametrize(
    "split,case", [("train", case) for case in BAD_SPLITS] + [("test", "label_is_num_classes")]
)
def test_pipeline_refuses_bad_splits_before_training(split, case):
    config = synthetic_config(batch_size=10, eval_batch_size=10).with_epochs(1)
    splits = {"train": synthetic_digits(20, 1), "test": synthetic_digits(20, 2)}
    spoil, match = BAD_SPLITS[case]
    splits[split] = spoil(*splits[split])
    seen = []
    with pytest.raises(ValueError, match=f"^{split} {match}$"):
        run_pipeline(config, splits["train"], splits["test"], on_epoch=lambda *a: seen.append(a))
    assert seen == []  # refused before any stage ran


def test_pretrain_stack_is_the_pipelines_pretraining_on_images_alone():
    from sae_jax.training.layerwise import pretrain_stack

    config = synthetic_config(batch_size=10).with_epochs(1).replace(finetune_epochs=0)
    train, test = synthetic_digits(20, 1), synthetic_digits(20, 2)  # BAD_SPLITS' shapes
    pipeline = run_pipeline(config, train, test)
    assert pipeline.test and pipeline.test_before_finetune == {}  # no validation split
    layers, stages = pretrain_stack(config, train[0])
    assert [s.name for s in stages] == ["pretrain_1", "pretrain_2"]
    for ours, theirs in zip(stages, pipeline.stages[:2], strict=True):
        drop = lambda history: [{k: v for k, v in m.items() if k != "seconds"} for m in history]
        assert drop(ours.history) == drop(theirs.history)
    for a, b in zip(layers, pipeline.layers, strict=True):
        _assert_same_tree(a.params, b.params)
    for case in ("wrong_features", "empty"):
        spoil, match = BAD_SPLITS[case]
        with pytest.raises(ValueError, match=f"^train {match}$"):
            pretrain_stack(config, spoil(*train)[0])


def test_stage_keys_are_each_seeds_own_split_on_the_host():
    # One compiled program makes every model's keys; each is jax.random.split of its
    # seed's key, as a run of that seed alone would make them, over the whole seed range.
    from sae_jax.training.layerwise import stage_keys

    seeds = [0, 3, 2**31 + 5, 2**32 - 1]
    config = synthetic_config()
    configs = [config.replace(seed=s) for s in seeds]
    keys = stage_keys(configs, models=True)
    assert isinstance(keys, np.ndarray) and keys.shape == (len(config.layers) + 2, 4, 2)
    for i, s in enumerate(seeds):
        own = jax.random.split(jax.random.PRNGKey(s), len(config.layers) + 2)
        np.testing.assert_array_equal(keys[:, i], own)
        np.testing.assert_array_equal(stage_keys([configs[i]], models=False), own)


def _assert_same_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_validation_examples_holds_out_the_last_n_training_examples():
    # The shapes of test_validation_split_keeps_the_best_epoch_and_stops_early (200
    # training, 80 validation and 80 test examples): its programs serve this test too.
    config = (
        synthetic_config(
            batch_size=25,
            eval_batch_size=50,
            finetune_patience=2,
            finetune_optimizer=dataclasses.replace(ADAM, learning_rate=0.05),
        )
        .with_epochs(1)
        .replace(softmax_epochs=3, finetune_epochs=30)
    )
    (x, y), test = synthetic_digits(280, 5), synthetic_digits(80, 3)
    held = run_pipeline(config.replace(validation_examples=80), (x, y), test)
    # The reference: the split made by hand, passed as such.
    by_hand = run_pipeline(config, (x[:200], y[:200]), test, validation=(x[200:], y[200:]))
    _assert_same_tree(held.params, by_hand.params)
    for a, b in zip(held.layers, by_hand.layers, strict=True):
        _assert_same_tree(a.params, b.params)
    assert [s.name for s in held.stages] == ["pretrain_1", "pretrain_2", "softmax", "finetune"]
    for a, b in zip(held.stages, by_hand.stages, strict=True):
        strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]
        assert (a.name, a.best_epoch, strip(a.history)) == (b.name, b.best_epoch, strip(b.history))
    assert "validation_accuracy" in held.stages[-1].history[0]
    assert held.test == by_hand.test and held.test_before_finetune == by_hand.test_before_finetune
    assert held.test_before_finetune  # judged on a validation split: the softmax is tested too
