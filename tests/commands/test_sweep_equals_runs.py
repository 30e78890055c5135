"""Model i of a sweep is run i of mnist.py: the same validation split held out, the
same per-epoch losses, the same best epoch and patience, the same test accuracy;
from the command line (experiments/sweep.py against run_mnist) and from the library
(sae_jax.sweep against run_pipeline, params included, for a denoising config)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import run_script, synthetic_config, synthetic_digits

import sae_jax
from sae_jax.commands.train import run_mnist
from sae_jax.config import tiny
from sae_jax.config.files import apply_overrides
from sae_jax.data import DataSpec
from sae_jax.training.hparams import model_config
from sae_jax.training.pipeline import run_pipeline

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

OVERRIDES = [
    ("validation_examples", "200"),
    ("finetune_patience", "2"),
    ("finetune_epochs", "10"),
]
FLAGS = [f"--config.{name}={value}" for name, value in OVERRIDES]


def _metrics(workdir) -> dict[str, list[float]]:
    """Each stage's loss per epoch, from a run's metrics.jsonl."""
    losses: dict[str, list[float]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        losses.setdefault(row["stage"], []).append(row["loss"])
    return losses


def test_a_sweep_with_validation_and_patience_equals_its_mnist_runs(tmp_path):
    sweep = run_script(
        "sweep", "--config=tiny", *FLAGS, "--seeds=2", "--seed=3",
        f"--workdir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr
    (run,) = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    stages = {stage["name"]: stage for stage in run["stages"]}
    base = apply_overrides(tiny(), OVERRIDES)
    for i, seed in enumerate([3, 4]):
        workdir = tmp_path / f"run{seed}"
        summary = run_mnist(
            base.replace(seed=seed), workdir, data=DataSpec(), figures=False, log=lambda s: None
        )
        for stage, losses in _metrics(workdir).items():
            swept = [epoch[i] for epoch in stages[stage]["loss"]][: len(losses)]
            assert swept == pytest.approx(losses, rel=1e-4), stage
        assert stages["finetune"]["best_epoch"][i] == summary["finetune_best_epoch"]
        assert stages["finetune"]["epochs_trained"][i] == len(
            summary["finetune_validation_accuracy"]
        )
        assert run["test_accuracy"][i] == pytest.approx(summary["test_accuracy"], abs=0.005)
    assert run["diverged"] == [None, None]


def test_a_denoising_sweep_equals_its_runs_params_and_all():
    config = synthetic_config(
        batch_size=25, eval_batch_size=50, validation_examples=40, finetune_patience=2,
        finetune_epochs=6,
    ).with_epochs(2).replace(finetune_epochs=6)  # fmt: skip
    layers = tuple(dataclasses.replace(la, noise="masking") for la in config.layers)
    config = config.replace(layers=layers)
    train, test = synthetic_digits(200, 1), synthetic_digits(80, 2)
    seeds, hparams = [5, 6], {"noise_level": [0.1, 0.3]}
    swept = sae_jax.sweep(config, train, test, seeds=seeds, hparams=hparams, mesh=None)
    for i in range(2):
        alone = run_pipeline(model_config(config, seeds, hparams, i), train, test)
        for s, a in zip(swept.stages, alone.stages, strict=True):
            assert [h["loss"][i] for h in s.history[: len(a.history)]] == pytest.approx(
                [h["loss"] for h in a.history], rel=1e-4
            ), s.name
        assert swept.stages[-1].best_epoch[i] == alone.stages[-1].best_epoch
        for b, a in zip(jax.tree.leaves(swept.params), jax.tree.leaves(alone.params), strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-4, atol=1e-5)
        assert swept.test["accuracy"][i] == pytest.approx(alone.test["accuracy"], abs=0.013)


def test_a_model_that_diverges_stops_alone_and_is_reported():
    # Linear units and sgd at a rate of 1e3: model 1's reconstruction overflows.
    base = synthetic_config(batch_size=25, eval_batch_size=50, softmax_epochs=1)
    layer = sae_jax.LayerConfig(
        features=16, activation="linear", decoder_activation="linear", epochs=3,
        optimizer=sae_jax.OptimizerConfig("sgd", learning_rate=1e-3),
    )  # fmt: skip
    config = base.replace(layers=(layer, dataclasses.replace(layer, features=8)))
    train, test = synthetic_digits(100, 1), synthetic_digits(50, 2)
    seeds, hparams = [0, 0], {"pretrain_learning_rate": [1e-3, 1e3]}
    swept = sae_jax.sweep(config, train, test, seeds=seeds, hparams=hparams, mesh=None)
    assert swept.diverged() == [None, "pretrain_1"]
    first = swept.stages[0]
    assert first.diverged == [False, True] and first.epochs_trained[0] == 3
    assert first.epochs_trained[1] == 1 + next(
        e for e, h in enumerate(first.history) if not np.isfinite(h["loss"][1])
    )
    alone = run_pipeline(model_config(config, seeds, hparams, 0), train, test)
    for b, a in zip(jax.tree.leaves(swept.params), jax.tree.leaves(alone.params), strict=True):
        np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-5)  # model 0 went on alone
    with pytest.raises(sae_jax.NonFiniteLossError, match="pretrain_1"):
        run_pipeline(model_config(config, seeds, hparams, 1), train, test)
