"""Checkpoints off the critical path: orbax saves committed in a background thread,
each step's manifest written once it is committed, and SIGINT or SIGTERM held until
the epoch in progress is saved.

``Saver`` runs one save at a time. In one process the whole orbax save runs in its
thread, so the training thread only copies the arrays (``copied``) and goes on; in a
run of several processes orbax's save starts in the training thread (its barriers
are collectives, which every process must enter in the order of training's own)
and only the commit and the manifest go on in the background. Process 0 writes the
manifest (size and sha256 of every file) after orbax has committed the step, so a
step without one was never finished and is never trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sae_jax.files import (
    MARK,
    failed_writes_quiet,
    file_manifest,
    manifest_path,
    signals_deferred,
    storage_error,
    workdir_gone,
    write_text_atomic,
)
from sae_jax.parallel import is_primary
from sae_jax.workdir.restore import checkpoint_manager


def copied(tree: Any) -> Any:
    """A copy of every array of ``tree`` that no one else holds: the caller may
    reuse or donate its buffers as soon as this returns. Device arrays are copied
    on their devices (one ``device_put``, dispatched without waiting), anything
    else to numpy arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    on_device = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array)]
    arrays = [leaves[i] for i in on_device]
    copies = jax.device_put(arrays, [a.sharding for a in arrays], may_alias=False)
    leaves = [np.array(a) for a in leaves]  # placeholders for the device arrays
    for i, a in zip(on_device, copies, strict=True):
        leaves[i] = a
    return jax.tree.unflatten(treedef, leaves)


class Saver:
    """Saves orbax steps in order, in the background or (``background`` False)
    before ``save`` returns, and writes their manifests once committed; one orbax
    manager per folder of steps, kept until ``release``.

    At most ``PENDING`` saves wait or run at a time (one in a run of several
    processes): a further one waits for the first to finish. A save that fails is
    reported once, as an ``OSError`` naming the checkpoint, by the next call of
    ``save``, ``check`` or ``wait``; what was committed before stays valid.
    ``durable`` are files that the checkpoints rely on (the metrics log); process 0
    flushes them to disk before writing a manifest. ``committed`` is the folder and
    step of the last step whose manifest is written.

    A workdir that holds the run's mark (``files.MARK``) when the saver starts must
    keep it: once it is gone (the folder was removed while the run wrote to it), in a
    run of one process ``check`` raises ``files.workdir_gone`` and nothing more is
    saved, so that the run does not make the folder again; in any run, a save that
    fails without the mark is reported so.
    """

    PENDING = 2

    def __init__(self, workdir: Path, *, background: bool = False, durable: Sequence[Path] = ()):
        self.workdir = workdir
        self.background = background
        self.durable = tuple(durable)
        self.committed: tuple[Path, int] | None = None
        self._managers: dict[Path, ocp.CheckpointManager] = {}
        self._slots = threading.BoundedSemaphore(self.PENDING)
        self._jobs: queue.Queue = queue.Queue()
        self._failure: OSError | None = None
        self._thread: threading.Thread | None = None
        self._mark = workdir / MARK if (workdir / MARK).is_file() else None

    def save(self, directory: Path, step: int, tree: Any, meta: dict, keep: int | None) -> None:
        """Save the arrays ``tree`` (which no one may change: see ``copied``) and the
        JSON ``meta`` as ``step`` in ``directory``, keeping its last ``keep`` steps."""
        self.check()  # an earlier failure stops the run here
        step_dir = directory / str(step)
        args = ocp.args.Composite(tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        start = lambda: self._manager(directory, keep).save(step, args=args)
        finish = lambda: self._commit(self._managers[directory], step_dir)
        if not self.background:
            with signals_deferred():  # SIGINT and SIGTERM wait until the step is saved
                self._run(step_dir, start, finish)
            self.check()
            return
        if jax.process_count() > 1:
            # Orbax's barriers in this thread, its commit in its own; and one save at a
            # time (orbax names the barriers of every manager alike).
            self.wait()
        self._slots.acquire()  # wait for a slot: a save holds a copy of the arrays
        if jax.process_count() > 1:
            self._run(step_dir, start)
            start = lambda: None
            if self._failure is not None:
                self._slots.release()
                raise self._failure
        self._submit(step_dir, (start, finish), self._slots.release)

    def release(self, directory: Path) -> None:
        """Close the manager of ``directory`` once its saves are committed."""
        if self.background:
            self._submit(directory, (), lambda: self._close(directory))
        else:
            self._close(directory)

    def _close(self, directory: Path) -> None:
        manager = self._managers.pop(directory, None)
        if manager is not None:
            with contextlib.suppress(Exception):  # a failed save, reported by its step
                manager.close()

    def wait(self) -> None:
        """Wait until every save handed over so far is committed, with its manifest."""
        if self._thread is not None:
            self._jobs.join()
        self.check()

    def check(self) -> None:
        """Raise the ``OSError`` of a save that failed, or ``workdir_gone``, without
        waiting."""
        if self._failure is None and self._gone() and jax.process_count() == 1:
            self._failure = workdir_gone(self.workdir)
        if self._failure is not None:
            raise self._failure

    def _gone(self) -> bool:
        """Whether the workdir has lost the mark it had when the saver started."""
        return self._mark is not None and not self._mark.is_file()

    def _manager(self, directory: Path, keep: int | None) -> ocp.CheckpointManager:
        if directory not in self._managers:
            self._managers[directory] = checkpoint_manager(directory, keep, background=True)
        return self._managers[directory]

    def _submit(
        self, where: Path, steps: tuple[Callable[[], Any], ...], after: Callable[[], Any]
    ) -> None:
        """Run ``steps`` (see ``_run``) in the background thread, then ``after``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="sae_jax-saver", daemon=True)
            self._thread.start()
        self._jobs.put((where, steps, after))

    def _work(self) -> None:
        while True:
            where, steps, after = self._jobs.get()
            try:
                if self._failure is None:  # after a failure nothing more is written
                    self._run(where, *steps)
            finally:
                after()  # in any case: it frees a slot, or closes a manager
                self._jobs.task_done()

    def _run(self, where: Path, *steps: Callable[[], Any]) -> None:
        """Run ``steps`` in order; the first failure becomes ``_failure``."""
        try:
            with failed_writes_quiet():
                for step in steps:
                    if self._gone() and jax.process_count() == 1:
                        raise workdir_gone(self.workdir)  # orbax would make it again
                    step()
        except Exception as e:  # orbax and tensorstore raise many kinds
            if self._gone():
                self._failure = workdir_gone(self.workdir)
            else:
                self._failure = storage_error(f"cannot save the checkpoint {where}", e)

    def _commit(self, manager: ocp.CheckpointManager, step_dir: Path) -> None:
        """Wait for orbax to commit ``step_dir``, then (process 0) write its manifest
        and drop the manifests of the steps orbax deleted."""
        manager.wait_until_finished()
        if is_primary():
            for path in self.durable:
                _fsync(path)
            manifest = manifest_path(self.workdir, step_dir)
            if self._gone():  # mkdir would make the removed workdir again
                raise workdir_gone(self.workdir)
            manifest.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(manifest, json.dumps(file_manifest(step_dir)))
            kept = {f"{s}.json" for s in manager.all_steps()}
            for old in manifest.parent.glob("*.json"):
                if old.name not in kept:  # its checkpoint was superseded and deleted
                    old.unlink()
        self.committed = (step_dir.parent, int(step_dir.name))


def _fsync(path: Path) -> None:
    """Flush ``path`` (if it exists) to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HeldSignals:
    """SIGINT and SIGTERM, held while ``holding``: the first is noted in ``caught``
    (for the store to save the epoch in progress and stop), a second one acts at
    once, as it did before ``install``. While not holding they act as before.

    ``install`` and ``uninstall`` act in the main thread only (elsewhere handlers
    cannot be set, and nothing is held); a signal that was ignored stays ignored.
    """

    def __init__(self) -> None:
        self.holding = False
        self.caught: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)
            if previous not in (signal.SIG_IGN, None):
                self._previous[signum] = previous
                signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.holding and self.caught is None:
            self.caught = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:  # the default: end the process
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


def agreed(due: bool, signum: int) -> tuple[bool, int]:
    """``due`` as process 0 says, and the highest ``signum`` (0: none) of any
    process, in every process: each process makes the same decision to save and
    to stop, whatever its own clock and signals."""
    if jax.process_count() == 1:
        return due, signum
    mine = np.array([int(due), signum], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))
    return bool(every[0, 0]), int(every[:, 1].max())
