"""Searches: points of a space, per-model early stopping in a sweep, ranking on the
validation split, and one look at the test set."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import run_script, synthetic_config, synthetic_digits

from sae_jax.config.presets import ADAM
from sae_jax.errors import ConfigError
from sae_jax.training import search as selection
from sae_jax.training.hparams import SWEEP_NAMES
from sae_jax.training.pipeline import run_pipeline
from sae_jax.training.search import Range, point_config, search, search_points
from sae_jax.training.sweep import model_config


def _noisy_config(**changes):
    """One layer, fine-tuning that swings from epoch to epoch (Adam 0.05), patience 2."""
    config = synthetic_config(
        batch_size=25,
        eval_batch_size=50,
        finetune_patience=2,
        finetune_optimizer=dataclasses.replace(ADAM, learning_rate=0.05),
    )
    changes = {"softmax_epochs": 0, "finetune_epochs": 12, "layers": config.layers[:1]} | changes
    return config.with_epochs(1).replace(**changes)


def _splits():
    return synthetic_digits(120, 1), synthetic_digits(60, 2), synthetic_digits(60, 3)


@pytest.mark.slow
def test_sweep_models_keep_their_own_best_epoch_and_stop_on_their_own():
    config = _noisy_config()
    train, validation, _ = _splits()
    seeds, hparams = [0, 1, 2], {"finetune_learning_rate": [0.05, 0.2, 0.002]}
    swept = run_pipeline(config, train, validation=validation, seeds=seeds, hparams=hparams)
    history = swept.stages[-1].history
    lengths = []
    for i in range(len(seeds)):
        alone = run_pipeline(model_config(config, seeds, hparams, i), train, validation=validation)
        record = alone.stages[-1]
        assert swept.stages[-1].best_epoch[i] == record.best_epoch
        accs = [h["validation_accuracy"][i] for h in history]
        n = len(record.history)
        lengths.append(n)
        assert accs[:n] == pytest.approx([h["validation_accuracy"] for h in record.history])
        assert accs[n:] == [accs[n - 1]] * (len(accs) - n)  # stopped: no longer changes
        for a, b in zip(jax.tree.leaves(swept.params), jax.tree.leaves(alone.params), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-3, atol=1e-3)  # float rounding
    assert len(set(lengths)) > 1, "the models should stop at different epochs"
    assert len(history) == max(lengths)  # the program stops when every model has


@pytest.mark.slow
def test_search_ranks_on_validation_and_tests_the_chosen_point_once(monkeypatch):
    config = _noisy_config(finetune_epochs=6)
    train, validation, test = _splits()
    space = {"finetune_learning_rate": [0.05, 0.0005], "features": [16, 24]}
    looks = []
    real = selection.evaluate

    def spy(module, params, x, y, *args, **kwargs):
        looks.append((x, jax.tree.leaves(params)[0].shape[0]))
        return real(module, params, x, y, *args, **kwargs)

    monkeypatch.setattr(selection, "evaluate", spy)
    result = search(config, train, validation, test, space, seeds=[0, 1])
    assert len(looks) == 1 and looks[0][0] is test[0] and looks[0][1] == 2
    points = search_points(space)
    assert [row["point"] for row in result.points] == points
    for k in (1, 2):  # seed 1 of the first point of one shape and the second of the other
        point, row = points[k], result.points[k]
        alone = run_pipeline(
            point_config(config, point).replace(seed=1), train, validation=validation
        )
        record = alone.stages[-1]
        assert row["best_epoch"][1] == record.best_epoch
        assert row["epochs_trained"][1] == len(record.history) and row["diverged"] == [None] * 2
        assert row["validation_accuracy"][1] == pytest.approx(
            record.history[record.best_epoch - 1]["validation_accuracy"]
        )
    means = [np.mean(row["validation_accuracy"]) for row in result.points]
    assert result.ranking == sorted(range(4), key=lambda i: -means[i])
    assert means[result.chosen] == max(means) > min(means)
    chosen = point_config(config, points[result.chosen])
    assert (
        result.config == chosen and chosen.layers[0].features == points[result.chosen]["features"]
    )
    alone = run_pipeline(chosen.replace(seed=1), train, test, validation=validation)
    assert result.test_accuracy[1] == pytest.approx(alone.test["accuracy"])


@pytest.mark.slow
def test_a_point_whose_models_diverge_at_once_scores_0_and_ranks_last():
    config = _noisy_config(finetune_epochs=3)
    train, validation, _ = _splits()
    space = {"finetune_learning_rate": [0.05, 1e37]}  # logits past float32 at once
    result = search(config, train, validation, None, space, seeds=[0, 1])
    good, bad = result.points
    assert bad["diverged"] == ["finetune"] * 2 and bad["best_epoch"] == [0, 0]
    assert bad["validation_accuracy"] == [0.0, 0.0] and bad["validation_mean"] == 0.0
    assert good["diverged"] == [None] * 2 and min(good["validation_accuracy"]) > 0.25
    assert result.ranking == [0, 1] and result.chosen == 0 and result.test_accuracy == []


def test_search_points_grid_and_random_draws():
    import sae_jax

    assert sae_jax.search is search and sae_jax.Range is Range  # the public names
    space = {"beta": [1.0, 3.0], "noise_level": [0.1, 0.2, 0.3]}
    assert search_points(space) == [
        {"beta": b, "noise_level": r} for b in (1.0, 3.0) for r in (0.1, 0.2, 0.3)
    ]
    space = {"finetune_learning_rate": Range(1e-4, 1e-2, log=True), "features": [16, 32]}
    points = search_points(space, points=2000, seed=3)
    assert points == search_points(space, points=2000, seed=3)  # reproducible
    assert points != search_points(space, points=2000, seed=4)
    rates = np.log10([p["finetune_learning_rate"] for p in points])
    assert rates.min() >= -4 and rates.max() <= -2
    assert abs(np.mean(rates < -3) - 0.5) < 0.05  # log-uniform: half below 1e-3
    assert {p["features"] for p in points} == {16.0, 32.0}
    widths = search_points({"features": Range(10, 20, integer=True)}, points=50)
    assert all(p["features"] == int(p["features"]) and 10 <= p["features"] <= 20 for p in widths)


@pytest.mark.parametrize(
    "space, points, message",
    [
        ({"gamma": [1.0]}, None, "cannot search 'gamma'"),
        ({"beta": []}, None, "beta: no values"),
        ({"beta": Range(1.0, 2.0)}, None, "a range needs random points"),
        ({"beta": Range(2.0, 1.0)}, 3, "bad range"),
    ],
)
def test_bad_search_spaces_are_refused(space, points, message):
    with pytest.raises(ConfigError, match=message):
        search_points(space, points)


def test_a_search_point_that_does_not_validate_is_named_before_training():
    config, (train, validation, test) = _noisy_config(), _splits()
    with pytest.raises(ConfigError, match=r"search point \{'input_keep': 1.5\}"):
        search(config, train, validation, test, {"input_keep": [1.5]}, seeds=[0])


@pytest.mark.slow
def test_search_command_writes_its_table(tmp_path):
    work = tmp_path / "search"
    proc = run_script(
        "search",
        "--config=tiny",
        "--config.train_examples=300",
        "--config.test_examples=100",
        "--config.validation_examples=100",
        "--config.finetune_epochs=2",
        "--space=hidden_keep=0.5,1",
        "--study=pretraining",
        f"--workdir={work}",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((work / "search.json").read_text())
    with_, without = summary["runs"]
    assert [len(with_["points"]), len(without["points"])] == [2, 2]
    assert len(with_["test_accuracy"]) == 1 and not without["pretrain"]
    assert with_["test_error_mean"] == pytest.approx(1 - with_["test_accuracy"][0])
    table = (work / "search.md").read_text()
    assert table.count("| yes |") == 2 and table.count("| no |") == 2
    assert "with pretraining, chosen" in table and "without pretraining, chosen" in table


@pytest.mark.parametrize(
    "command, flags, needs",
    [
        (
            "search",
            ["--space=beta=1,2", "--config.validation_examples=50"],
            "labels and a test split",
        ),
        ("sweep", ["--seeds=2"], "labels and a test split (y, x_test and y_test)"),
    ],
)
def test_search_and_sweep_refuse_data_without_a_test_split(tmp_path, command, flags, needs):
    x, y = synthetic_digits(200, 1)
    np.savez(tmp_path / "d.npz", x=x, y=y)  # labels, but no x_test and y_test
    proc = run_script(command, "--config=tiny", "--data=d.npz", *flags, "--workdir=w", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: d.npz: a ") and needs in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]  # no workdir made


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--space=gamma=1,2"], "--space=gamma=1,2: cannot search 'gamma'"),
        (["--space=beta=a,b"], "--space=beta=a,b: expected NAME=V1,V2"),
        (["--space=beta=1:2"], "beta: a range needs random points"),
        ([], "--space: name at least one thing to search"),
        (["--space=beta=1", "--config.validation_examples=0"], "needs a validation split"),
        (["--space=noise_level=0,0.2"], "--space: noise_level changes nothing here"),
    ],
)
def test_search_command_refuses_bad_flags_in_one_line(tmp_path, flags, message):
    proc = run_script(
        "search", "--config=tiny", "--config.validation_examples=200", *flags,
        f"--workdir={tmp_path / 'w'}",
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()


def _close_trees(a, b, m, **tolerance):
    """Model ``m`` of the sweep's tree ``a`` against the single run's tree ``b``."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x)[m], np.asarray(y), **tolerance)


def test_models_that_differ_only_after_pretraining_share_it_and_no_others(monkeypatch):
    """Equal seeds and equal pretraining values (the layers' and the softmax stage's:
    ``HParams.pretraining``): one pretraining and softmax stage, handed to each of
    those models; a seed or the softmax stage's rate apart: their own. Every model is
    the model that its config trains alone, pretrained layers and stages included."""
    from sae_jax.training import pipeline

    # The shapes of test_search_ranks_on_validation_and_tests_the_chosen_point_once's
    # second group (features 24, 4 models): its programs serve here too.
    config = point_config(_noisy_config(softmax_epochs=2, finetune_epochs=6), {"features": 24})
    train, validation, _ = _splits()
    # 0: the base; 1: another seed; 2: only fine-tuning's rate apart: it shares model
    # 0's pretraining; 3: the softmax stage's rate apart: its own. (Which values are
    # fine-tuning's alone, dropout's included: the test below, without training.)
    seeds = [0, 1, 0, 0]
    hparams = {
        "finetune_learning_rate": [0.05, 0.05, 0.2, 0.05],
        "softmax_learning_rate": [1e-3, 1e-3, 1e-3, 1e-2],
    }
    pretrained, pretrain_layers = [], pipeline.pretrain_layers

    def spy(configs, *args, **kwargs):
        pretrained.append(sorted((c.seed, c.softmax_optimizer.learning_rate) for c in configs))
        return pretrain_layers(configs, *args, **kwargs)

    monkeypatch.setattr(pipeline, "pretrain_layers", spy)
    swept = run_pipeline(config, train, validation=validation, seeds=seeds, hparams=hparams)
    assert pretrained == [[(0, 1e-3), (0, 1e-2), (1, 1e-3)]]  # one for models 0 and 2
    assert [s.name for s in swept.stages] == ["pretrain_1", "softmax", "finetune"]
    shared = [swept.layers[0].params, [s.history for s in swept.stages[:2]]]
    for x in jax.tree.leaves(shared):
        if np.ndim(x):  # model 2 has model 0's pretraining and softmax stage, bit for bit
            np.testing.assert_array_equal(np.asarray(x)[2], np.asarray(x)[0])
    for i in range(len(seeds)):
        alone = run_pipeline(model_config(config, seeds, hparams, i), train, validation=validation)
        _close_trees(swept.layers[0].params, alone.layers[0].params, i, rtol=1e-5, atol=1e-6)
        for s, a in zip(swept.stages, alone.stages, strict=True):
            losses = [h["loss"][i] for h in s.history[: len(a.history)]]
            assert losses == pytest.approx([h["loss"] for h in a.history], rel=1e-5), (i, s.name)
        assert swept.stages[-1].best_epoch[i] == alone.stages[-1].best_epoch
        _close_trees(swept.params, alone.params, i, rtol=1e-3, atol=1e-3)  # float rounding


# Two values of every name a sweep may vary; fine-tuning's alone are FINETUNE_ONLY.
TWO_VALUES = {
    "rho": [0.1, 0.2],
    "beta": [3.0, 1.0],
    "l1": [0.0, 0.1],
    "contractive": [0.0, 0.1],
    "weight_decay": [1e-4, 1e-3],
    "noise_level": [0.1, 0.2],
    "pretrain_learning_rate": [1e-3, 1e-2],
    "softmax_learning_rate": [1e-3, 1e-2],
    "finetune_learning_rate": [3e-3, 3e-2],
    "input_keep": [1.0, 0.8],
    "hidden_keep": [1.0, 0.8],
}
FINETUNE_ONLY = {"finetune_learning_rate", "input_keep", "hidden_keep"}


@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_two_models_of_one_seed_share_a_pretraining_iff_only_fine_tuning_differs(name):
    """Which models of a sweep train one pretraining (and softmax stage) together,
    without training any: those of one seed whose values differ in fine-tuning only."""
    from sae_jax.training import pipeline

    config = synthetic_config()
    layers = tuple(dataclasses.replace(la, noise="masking") for la in config.layers)
    config = config.replace(layers=layers)  # so that noise_level acts
    assert set(TWO_VALUES) == set(SWEEP_NAMES)
    run = pipeline._setting(config, [4, 4], {name: TWO_VALUES[name]}, None, None, None)
    assert run.configs[0] != run.configs[1]
    shared = pipeline._shared_pretraining(run)
    if name in FINETUNE_ONLY:
        assert shared is not None
        np.testing.assert_array_equal(shared[0], [0])  # model 0 pretrains, for both
        np.testing.assert_array_equal(shared[1], [0, 0])
    else:
        assert shared is None  # each its own
    # Seeds apart: never shared, whatever the values.
    other = pipeline._setting(config, [4, 5], {name: TWO_VALUES[name][:1] * 2}, None, None, None)
    assert pipeline._shared_pretraining(other) is None


def test_a_chosen_point_not_first_in_its_group_keeps_its_models_best_epochs():
    """The chosen point is the second of its group (one sweep): its params are its own
    models', each at its best fine-tuning epoch, as its runs alone return them; and a
    model that trained past its best epoch to worse ones reports that epoch, and keeps
    its params."""
    from sae_jax.models import classifier
    from sae_jax.training.evaluate import evaluate

    config = _noisy_config(finetune_epochs=6)
    train, (x, y), test = _splits()
    # A validation split with a quarter of its pixels flipped: accuracy swings from epoch
    # to epoch (it would stay at 1.0 on the others).
    flips = np.random.default_rng(7).random(x.shape) < 0.25
    validation = (x ^ (flips * 255).astype(np.uint8), y)
    # One group (test_search_ranks_on_validation_and_tests_the_chosen_point_once's second
    # shape: its programs serve here too), whose first point learns too slowly to win.
    space = {"finetune_learning_rate": [0.0005, 0.05], "features": [24]}
    result = search(config, train, validation, test, space, seeds=[0, 1])
    assert result.ranking == [1, 0] and result.chosen == 1  # not the first of its group
    chosen, row = point_config(config, search_points(space)[1]), result.points[1]
    assert result.config == chosen
    again = evaluate(classifier(chosen), result.params, *validation, 50, models=True)["accuracy"]
    for s, seed in enumerate([0, 1]):
        alone = run_pipeline(chosen.replace(seed=seed), train, test, validation=validation)
        record = alone.stages[-1]
        best, accs = record.best_epoch, [h["validation_accuracy"] for h in record.history]
        assert accs[-1] < accs[best - 1]  # it went on past its best epoch, to a worse one
        assert row["best_epoch"][s] == best and row["epochs_trained"][s] == len(accs)
        assert row["validation_accuracy"][s] == pytest.approx(accs[best - 1], abs=1e-6)
        assert again[s] == pytest.approx(accs[best - 1], abs=1e-6)  # the best epoch's params
        _close_trees(result.params, alone.params, s, rtol=1e-3, atol=1e-3)
        assert result.test_accuracy[s] == pytest.approx(alone.test["accuracy"])
