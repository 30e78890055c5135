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
    table = (work / "search.md").read_text()
    assert table.count("| yes |") == 2 and table.count("| no |") == 2
    assert "with pretraining, chosen" in table and "without pretraining, chosen" in table


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
