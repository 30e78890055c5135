"""Compiled programs are cached by what they depend on: a second identical pipeline in
one process lowers (and so compiles) no new program."""

import contextlib
import dataclasses

import jax
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


def test_a_second_identical_pipeline_compiles_nothing_new():
    # Shapes of this test's own (37 pixels, layers of 11 and 7 units), so that the
    # first run compiles its programs whatever ran before it in this process.
    base = synthetic_config(batch_size=25, eval_batch_size=50)
    layers = tuple(dataclasses.replace(base.layers[0], features=n) for n in (11, 7))
    config = base.replace(input_features=37, layers=layers, validation_examples=20)
    config = config.with_epochs(1)
    train, test = synthetic_digits(100, 1, features=37), synthetic_digits(40, 2, features=37)
    with lowered() as first:
        run_pipeline(config, train, test)
    with lowered() as second:
        run_pipeline(config, train, test)
    assert first[0] > 10 and second[0] == 0, (first, second)
