"""Compiled programs are cached by what they depend on: a second identical pipeline in
one process lowers (and so compiles) no new program; and a pipeline runs no eager op
between its stages: every program it compiles is one of its stages' own."""

import collections
import contextlib
import dataclasses
import logging

import jax
import pytest
from conftest import synthetic_config, synthetic_digits

from sae_jax.training.pipeline import run_pipeline

_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # once per new program
_counts: list[int] = []


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == _LOWERED and _counts:
        _counts[-1] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def lowered():
    """Count the programs lowered inside the block: ``with lowered() as count``."""
    _counts.append(0)
    box = [0]
    try:
        yield box
    finally:
        box[0] = _counts.pop()


@contextlib.contextmanager
def compiled_names():
    """The names of the programs compiled inside the block, counted."""
    names: collections.Counter = collections.Counter()

    class Names(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Compiling "):
                names[message.split()[1]] += 1

    logger, handler = logging.getLogger("jax"), Names(logging.WARNING)
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)


def _own_shapes(features: int, units: tuple[int, int], **kwargs):
    """A config and splits of shapes no other test uses, so that a first run compiles
    its programs whatever ran before it in this process."""
    base = synthetic_config(batch_size=25, eval_batch_size=50)
    layers = tuple(dataclasses.replace(base.layers[0], features=n) for n in units)
    config = base.replace(input_features=features, layers=layers, **kwargs).with_epochs(1)
    train = synthetic_digits(100, 1, features=features)
    return config, train, synthetic_digits(40, 2, features=features)


@pytest.mark.slow
def test_a_pipeline_compiles_its_stages_programs_and_nothing_else():
    # The tiny pipeline's shape: two layers, softmax, fine-tuning, a test split. Its
    # 18 programs: one for the stage keys; per stage one to initialise the params
    # (the fine-tuned stack is composed, not initialised), one to build the train
    # state and one epoch; an encoding of the train split after each layer and of the
    # test split for the softmax's and fine-tuning's evaluation (whose programs are
    # one each). No eager op (a copy, a key split, an init outside jit) runs.
    from sae_jax.training import layerwise

    config, train, test = _own_shapes(41, (13, 5))
    layerwise._keys_program.cache_clear()  # its shape is any two-layer run's
    with compiled_names() as names:
        run_pipeline(config, train, test)
    expected = {"keys": 1, "init": 3, "build": 4, "train_epoch": 4, "_encode": 4,
                "_evaluate": 2}  # fmt: skip
    assert dict(names) == {f"jit({k})": v for k, v in expected.items()}
    assert sum(names.values()) == 18


@pytest.mark.slow
def test_a_second_identical_pipeline_compiles_nothing_new():
    config, train, test = _own_shapes(37, (11, 7), validation_examples=20)
    with lowered() as first:
        run_pipeline(config, train, test)
    with lowered() as second:
        run_pipeline(config, train, test)
    assert first[0] > 10 and second[0] == 0, (first, second)


@pytest.mark.slow
def test_a_searchs_groups_of_one_shape_share_their_programs():
    # pretrain_epochs makes two groups whose models have the same shapes: the second
    # group (other epochs, other values of the first model's layer) compiles nothing.
    from sae_jax.training.search import search

    config, train, validation = _own_shapes(43, (9, 6), finetune_patience=1)
    space = {"pretrain_epochs": [1, 2], "beta": [0.5, 2.0], "finetune_learning_rate": [0.01]}
    starts = []  # programs lowered so far when each group starts
    on_group = lambda shape, models: starts.append(_counts[-1])
    with lowered() as total:
        search(config, train, validation, None, space, seeds=[0], on_group=on_group, mesh=None)
    first, second = starts[1] - starts[0], total[0] - starts[1]
    assert first > 10 and second == 0, (first, second)
