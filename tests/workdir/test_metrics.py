"""metrics.jsonl gives a resumed stage its history: an epoch checkpoint holds only its
sha256, the same size at every epoch; the record comes back exactly, or the run stops
naming the file; rewrites keep what other stages will need."""

import json

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import synthetic_config

from sae_jax.errors import CheckpointError
from sae_jax.training.loop import init_state
from sae_jax.training.stage import StageRecord
from sae_jax.workdir.checkpoint import RunStore
from sae_jax.workdir.restore import checkpoint_manager


def _state(value: float):
    return init_state({"w": jnp.full((3,), value)}, optax.adam(0.1))


def _store(workdir, **kw) -> RunStore:
    return RunStore(workdir, synthetic_config(), log=print, checkpoint_every=0, **kw)


def _train(store: RunStore, stage: str, epochs: int, record: StageRecord | None = None):
    """``epochs`` epochs of ``stage`` as ``run_stage`` records them; the record."""
    record = record or StageRecord(stage, epochs)
    for epoch in range(len(record.history) + 1, len(record.history) + epochs + 1):
        # Values that JSON must carry exactly: long floats, NaN, an int.
        record.history.append({"loss": 1 / (3 * epoch), "nan": float("nan"), "n": epoch})
        record.wall_s, record.best_epoch = 0.1 * epoch + 1 / 7, epoch // 2
        store.save_epoch(stage, _state(epoch), jax.random.PRNGKey(epoch), record)
    return record


def _same(a: StageRecord, b: StageRecord) -> None:
    assert json.dumps(a.__dict__) == json.dumps(b.__dict__)  # NaN != NaN for ==


def _meta(workdir, stage: str, step: int) -> dict:
    manager = checkpoint_manager(workdir / "checkpoints" / stage, None)
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    finally:
        manager.close()


def test_a_checkpoint_holds_no_history_and_the_record_comes_back_exactly(tmp_path):
    record = _train(_store(tmp_path, keep=None), "pretrain_1", 30)
    first, last = _meta(tmp_path, "pretrain_1", 1), _meta(tmp_path, "pretrain_1", 30)
    assert "history" not in last and last["epoch"] == 30
    assert len(json.dumps(first)) == len(json.dumps(last))  # not growing with the epochs
    state, resumed, _ = _store(tmp_path).resume("pretrain_1", _state(0.0))
    _same(resumed, record)
    assert float(state.params["w"][0]) == 30.0


@pytest.mark.parametrize("edit", ["changed", "removed", "emptied"])
def test_metrics_that_do_not_match_the_checkpoint_stop_the_run_naming_both(tmp_path, edit):
    _train(_store(tmp_path), "pretrain_1", 3)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    if edit == "changed":
        lines[1] = lines[1].replace('"n": 2', '"n": 5')
    elif edit == "removed":
        del lines[0]
    else:
        lines = []
    metrics.write_text("".join(lines))
    checkpoint = tmp_path / "checkpoints" / "pretrain_1" / "3"
    with pytest.raises(CheckpointError, match=f"^{checkpoint} was saved after 3 epochs of "):
        _store(tmp_path).resume("pretrain_1", _state(0.0))
    assert checkpoint.is_dir()  # an intact checkpoint is never moved


def test_settling_a_finished_stage_keeps_the_lines_of_the_stage_that_resumes(tmp_path):
    """A run killed after it restored the first stage, before it resumed the second,
    must still find the second stage's history."""
    store = _store(tmp_path)
    first = _train(store, "pretrain_1", 2)
    store.save_finished("pretrain_1", {"w": jnp.ones(3)}, first)
    second = _train(store, "pretrain_2", 2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "pretrain_2", "ep')  # torn: the file is rewritten
    _store(tmp_path).finished("pretrain_1", {"w": jnp.zeros(3)})  # then killed
    again = _store(tmp_path)
    _, done = again.finished("pretrain_1", {"w": jnp.zeros(3)})
    _same(done, first)
    _, resumed, _ = again.resume("pretrain_2", _state(0.0))
    _same(resumed, second)


def test_a_line_torn_by_a_crash_goes_before_the_next_is_appended(tmp_path):
    record = _train(_store(tmp_path), "pretrain_1", 2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "pretrain_1", "epoch": 3, "lo')  # killed while writing it
    store = _store(tmp_path)
    _, resumed, _ = store.resume("pretrain_1", _state(0.0))
    _same(resumed, record)
    record = _train(store, "pretrain_1", 1, resumed)
    _, resumed, _ = _store(tmp_path).resume("pretrain_1", _state(0.0))
    _same(resumed, record)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
