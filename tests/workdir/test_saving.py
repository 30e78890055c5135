"""When a RunStore saves and how: every ``checkpoint_every`` seconds, at every stage's
end and on SIGINT or SIGTERM; in the background inside ``with``, with each manifest
written only once orbax has committed its checkpoint; a failed background save
reported by the next call."""

import errno
import json
import os
import signal
import threading
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import synthetic_config

from sae_jax.errors import Stopped
from sae_jax.files import file_manifest, manifest_path, manifest_problem
from sae_jax.training.loop import init_state
from sae_jax.training.stage import StageRecord
from sae_jax.workdir import checkpoint, saving
from sae_jax.workdir.checkpoint import RunStore


def _state(value: float):
    return init_state({"w": jnp.full((3,), value)}, optax.adam(0.1))


def _epochs(store: RunStore, stage: str, losses, record: StageRecord | None = None):
    """Call ``save_epoch`` as ``run_stage`` does after each epoch; the record."""
    record = record or StageRecord(stage, len(losses))
    for loss in losses:
        record.history.append({"loss": float(loss)})
        store.save_epoch(stage, _state(loss), jax.random.PRNGKey(0), record)
    return record


def _saved(workdir, stage: str) -> list[int]:
    folder = workdir / "checkpoints" / stage
    return sorted(int(p.name) for p in folder.iterdir()) if folder.exists() else []


def test_an_epoch_is_saved_when_checkpoint_every_seconds_have_passed(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(checkpoint, "time", SimpleNamespace(monotonic=lambda: now[0]))
    store = RunStore(tmp_path, synthetic_config(), log=print, checkpoint_every=10, keep=None)
    assert store.resume("pretrain_1", _state(0.0)) is None
    record = StageRecord("pretrain_1", 6)
    for epoch, at in enumerate([3, 6, 11, 14, 20.5, 21], 1):  # seconds since the start
        now[0] = at
        _epochs(store, "pretrain_1", [epoch], record)
    assert _saved(tmp_path, "pretrain_1") == [3, 6]  # at 11 s, then at 21 s (>= 11 + 10)
    now[0] = 22
    store.save_finished("pretrain_1", {"w": jnp.ones(3)}, record)  # a stage's end, always
    assert (tmp_path / "frozen" / "pretrain_1" / "0").is_dir()
    assert store.resume("pretrain_2", _state(0.0)) is None
    now[0] = 31  # 9 s after the last checkpoint, the stage's end
    _epochs(store, "pretrain_2", [1.0])
    assert _saved(tmp_path, "pretrain_2") == []
    every = RunStore(tmp_path / "every", synthetic_config(), log=print, checkpoint_every=0)
    _epochs(every, "pretrain_1", [1, 2, 3])
    assert _saved(tmp_path / "every", "pretrain_1") == [1, 2, 3]
    with pytest.raises(ValueError, match=r"checkpoint_every=-1: must be >= 0 seconds"):
        RunStore(tmp_path, synthetic_config(), checkpoint_every=-1)


def test_a_manifest_is_written_only_once_its_checkpoint_is_committed(tmp_path, monkeypatch):
    """Inside ``with`` the save returns at once; until orbax has finished saving the
    checkpoint (in its own thread) there is no manifest, and so nothing a rerun would
    trust.

    No sleep: orbax's end of the save is held, and the test goes on only once the
    saver thread, after orbax's ``save`` returned, has either begun waiting for the
    commit (as it must) or written a manifest (too early), whichever it does."""
    entered, release, settled = threading.Event(), threading.Event(), threading.Event()
    finalize = ocp.CheckpointManager._finalize  # the end of orbax's save
    save, wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    write, saver = saving.write_text_atomic, threading.local()

    def held(self, *args, **kw):
        entered.set()
        release.wait(60)
        return finalize(self, *args, **kw)

    def save_then_mark(self, *args, **kw):
        started = save(self, *args, **kw)
        saver.returned = True  # in this thread, orbax's save has handed over
        return started

    def waiting(self, *args, **kw):
        if getattr(saver, "returned", False):  # the saver thread, after the save
            settled.set()
        return wait(self, *args, **kw)

    def write_then_mark(*args, **kw):
        write(*args, **kw)
        settled.set()

    monkeypatch.setattr(ocp.CheckpointManager, "_finalize", held)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save_then_mark)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", waiting)
    monkeypatch.setattr(saving, "write_text_atomic", write_then_mark)
    step = tmp_path / "checkpoints" / "pretrain_1" / "1"
    manifest = manifest_path(tmp_path, step)
    with RunStore(tmp_path, synthetic_config(), log=print, checkpoint_every=0) as store:
        try:
            store.resume("pretrain_1", _state(0.0))
            _epochs(store, "pretrain_1", [1.0])  # returns while the save is in flight
            assert entered.wait(60) and settled.wait(60)
            assert not manifest.exists()
            assert "no epoch of it is saved yet" in store.where()
        finally:
            release.set()  # a failure above does not leave orbax waiting for a minute
    assert "epoch 1 is saved" in store.where()
    written = json.loads(manifest.read_text())
    assert written == file_manifest(step) and len(written) > 3
    assert manifest_problem(tmp_path, step) is None


@pytest.fixture
def sigint_raises():
    """SIGINT as in a terminal (the tests may run with it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def sigterm_stops():
    """SIGTERM as ``run_command`` sets it: it raises ``Stopped``."""

    def stop(signum, frame):
        raise Stopped("stopped at once", signum)

    previous = signal.signal(signal.SIGTERM, stop)
    yield stop
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_saves_the_epoch_in_progress_then_stops(tmp_path, sigterm_stops):
    with RunStore(tmp_path, synthetic_config(), log=print, checkpoint_every=1e9) as store:
        assert signal.getsignal(signal.SIGTERM) != sigterm_stops  # held from here
        store.resume("pretrain_1", _state(0.0))
        record = _epochs(store, "pretrain_1", [1.0])
        os.kill(os.getpid(), signal.SIGTERM)  # held: the epoch goes on
        with pytest.raises(Stopped) as stop:
            _epochs(store, "pretrain_1", [2.0], record)
    assert signal.getsignal(signal.SIGTERM) == sigterm_stops  # given back
    assert stop.value.signum == signal.SIGTERM
    assert str(stop.value) == (
        f"stopped by SIGTERM during pretrain_1 (epoch 2 is saved in {tmp_path}); "
        f"run the same command again to resume"
    )
    assert _saved(tmp_path, "pretrain_1") == [2]  # not due, but saved, and committed
    assert manifest_problem(tmp_path, tmp_path / "checkpoints" / "pretrain_1" / "2") is None
    state, resumed, _ = RunStore(tmp_path, synthetic_config(), log=print).resume(
        "pretrain_1", _state(0.0)
    )
    assert resumed.history == [{"loss": 1.0}, {"loss": 2.0}]
    assert float(state.params["w"][0]) == 2.0


def test_outside_with_or_a_stage_a_signal_acts_at_once(tmp_path, sigterm_stops, sigint_raises):
    store = RunStore(tmp_path, synthetic_config(), log=print, checkpoint_every=1e9)
    store.resume("pretrain_1", _state(0.0))
    with pytest.raises(Stopped, match="stopped at once"):
        os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), RunStore(tmp_path / "b", synthetic_config()):
        os.kill(os.getpid(), signal.SIGINT)  # no stage is training


def test_a_second_signal_stops_at_once(tmp_path, sigint_raises):
    with RunStore(tmp_path, synthetic_config(), log=print, checkpoint_every=1e9) as store:
        store.resume("pretrain_1", _state(0.0))
        _epochs(store, "pretrain_1", [1.0])
        os.kill(os.getpid(), signal.SIGINT)  # held
        with pytest.raises(KeyboardInterrupt) as stop:
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once, as before
    assert not isinstance(stop.value, Stopped) and _saved(tmp_path, "pretrain_1") == []


def test_a_signal_after_a_stages_last_epoch_stops_once_its_end_is_saved(tmp_path, sigint_raises):
    with RunStore(tmp_path, synthetic_config(), log=print, checkpoint_every=1e9) as store:
        store.resume("pretrain_1", _state(0.0))
        record = _epochs(store, "pretrain_1", [1.0])
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Stopped) as stop:
            store.save_finished("pretrain_1", {"w": jnp.ones(3)}, record)
    assert str(stop.value) == (
        f"stopped by SIGINT after pretrain_1 (it is saved in {tmp_path}); "
        f"run the same command again to resume"
    )
    assert manifest_problem(tmp_path, tmp_path / "frozen" / "pretrain_1" / "0") is None
    assert _saved(tmp_path, "pretrain_1") == []


def test_a_background_save_that_fails_is_reported_by_the_next_call(tmp_path, monkeypatch):
    """Epoch 2's save fails in the saver thread, held until epoch 3's save is queued
    behind it: epoch 3 is not written after the failure, and the first call once the
    failure is known reports it. Events order the threads; nothing depends on how
    fast either is."""
    save, run = ocp.CheckpointManager.save, saving.Saver._run
    queued, noted = threading.Event(), threading.Event()

    def full(self, step, *args, **kw):
        if step == 2:
            assert queued.wait(60)
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kw)

    def run_then_tell(self, *args, **kw):
        run(self, *args, **kw)
        if self._failure is not None:
            noted.set()

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    monkeypatch.setattr(saving.Saver, "_run", run_then_tell)
    step_dir = tmp_path / "checkpoints" / "pretrain_1" / "2"
    store = RunStore(tmp_path, synthetic_config(), log=print, checkpoint_every=0)
    with pytest.raises(OSError) as failed, store:
        try:
            store.resume("pretrain_1", _state(0.0))
            record = _epochs(store, "pretrain_1", [1, 2, 3])  # 2 held, 3 queued behind it
        finally:
            queued.set()
        assert noted.wait(60)  # the saver thread has failed epoch 2
        _epochs(store, "pretrain_1", [4], record)  # the next call: it raises
        pytest.fail("epoch 4 went on after the failure was known")
    assert failed.value.errno == errno.ENOSPC
    assert (
        failed.value.strerror == f"cannot save the checkpoint {step_dir}: No space left on device"
    )
    assert "save_epoch" in {entry.name for entry in failed.traceback}  # not at the block's end
    assert _saved(tmp_path, "pretrain_1") == [1]  # nothing after the failure, 3 included
    assert manifest_problem(tmp_path, tmp_path / "checkpoints" / "pretrain_1" / "1") is None


def test_a_background_save_that_fails_last_is_reported_when_the_store_closes(tmp_path, monkeypatch):
    """The save of a stage's last epoch fails in the saver thread and no call follows
    it: leaving ``with`` waits for the save and raises its error, so that no run ends
    as if its last checkpoint were on disk."""
    save = ocp.CheckpointManager.save

    def full(self, step, *args, **kw):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    store = RunStore(tmp_path, synthetic_config(), log=print, checkpoint_every=0)
    with pytest.raises(OSError) as failed, store:
        store.resume("pretrain_1", _state(0.0))
        _epochs(store, "pretrain_1", [1, 2])
    step_dir = tmp_path / "checkpoints" / "pretrain_1" / "2"
    assert failed.value.errno == errno.ENOSPC
    assert str(step_dir) in failed.value.strerror
    assert "close" in {entry.name for entry in failed.traceback}  # raised by the wait
    assert _saved(tmp_path, "pretrain_1") == [1]
