"""Checkpoints of a run with orbax: resume after a crash, and load a trained model.

Layout of a workdir::

  .sae_jax                     the mark that a run owns the folder (files.check_workdir)
  config.json                  the run's config; another config is refused
  data.json                    the source and sha256 of the data; other data is refused
  checkpoints/<stage>/<epoch>/ the train state and RNG key after an epoch, with the
                               stage, epoch, record and config (last few kept)
  frozen/<stage>/0/            the final params and whole record of each completed stage
  metrics.jsonl                one line per epoch per stage (the history of a resumed
                               stage is read back from it, see ``workdir.metrics``)
  manifests/                   size and sha256 of every file of every checkpoint
  damaged/                     checkpoints that failed their check, moved aside

An epoch is checkpointed when ``checkpoint_every`` seconds have passed since the
last checkpoint, at the end of every stage (its frozen params), and when SIGINT or
SIGTERM asks the run to stop. Used as a context manager (``with RunStore(...) as
store``), the store saves in the background (``workdir.saving``): the next epoch
runs while the last save commits, and the block's end waits for the saves in
flight. Outside one, every save is committed before the call returns.

Each checkpoint's files are checked against its manifest before orbax reads them,
so a truncated or corrupted checkpoint, or one whose save never finished, is found
(and skipped) before it is used.

In a run of several processes every process calls the same methods: orbax saves
and restores collectively into the one workdir (a folder every process sees),
while process 0 alone writes ``config.json``, ``metrics.jsonl`` and the manifests,
checks manifests and moves damaged checkpoints aside, tells the others which
checkpoint to restore, and decides when to save (by its clock).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sae_jax.config import Config
from sae_jax.config.files import (
    RUN_KEY,
    config_differences,
    config_to_json,
    read_config,
    with_defaults,
)
from sae_jax.errors import CheckpointError, ConfigError, Stopped
from sae_jax.files import (
    CHECKPOINT_EVERY,
    RESUME,
    make_workdir,
    read_json,
    signals_deferred,
    user_path,
    write_text_atomic,
)
from sae_jax.parallel import barrier, broadcast_int, is_primary, replicated
from sae_jax.training.loop import Params, TrainState, legacy_key
from sae_jax.training.stage import StageRecord
from sae_jax.workdir.metrics import METRICS, MetricsLog
from sae_jax.workdir.restore import checkpoint_manager, restore_latest
from sae_jax.workdir.saving import HeldSignals, Saver, agreed, copied

STANDARDIZATION = "standardization.npz"  # the per-feature mean and std of --standardize
DATA_RECORD = "data.json"  # the source and sha256 of the data the run started on
MANAGED = (
    "config.json",
    DATA_RECORD,
    "checkpoints",
    "frozen",
    "manifests",
    METRICS,
    "damaged",
    "summary.json",
    "filters.png",
    "reconstructions.png",
    "curves.png",
    STANDARDIZATION,
    "tensorboard",
)


def _record(
    stage: str, meta: dict[str, Any], history: list[dict[str, Any]] | None = None
) -> StageRecord:
    """The record a checkpoint's ``meta`` describes; ``history`` where the meta does
    not hold it (an epoch checkpoint: see ``workdir.metrics``)."""
    if "history" in meta or history is None:
        history = list(meta["history"])
    return StageRecord(stage, meta["epochs"], meta["wall_s"], history, meta.get("best_epoch", 0))


def _meta(record: StageRecord, **extra: Any) -> dict[str, Any]:
    return {
        "epochs": record.epochs,
        "wall_s": record.wall_s,
        "best_epoch": record.best_epoch,
        **extra,
    }


class RunStore:
    """A ``StageStore`` on disk: orbax checkpoints of the epochs of every stage.

    Args:
      workdir: the run's folder (created if needed; relative to the current
        directory, ``~`` expanded).
      config: the run's config; a workdir holding another config is refused with
        ``CheckpointError`` naming the differing fields.
      restart: delete what an earlier run left in ``workdir`` first (only the
        names in ``MANAGED``; other files stay).
      keep: how many epoch checkpoints to keep per stage.
      options: other settings that change what the stages compute (saved and
        compared with the config under ``"_run"``), e.g. ``{"pretrain": False}``.
      log: receives one line per restore, fallback or move.
      checkpoint_every: seconds between epoch checkpoints: an epoch is saved when
        at least this long has passed since the last checkpoint (0: every epoch).
        The end of every stage is always saved.

    As a context manager it saves in the background, and while a stage trains it
    holds SIGINT and SIGTERM until the epoch in progress is saved, then stops the
    run with ``Stopped`` (a second signal stops it at once); the block's end waits
    for the saves in flight (``close``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        config: Config,
        *,
        restart: bool = False,
        keep: int = 3,
        options: dict[str, Any] | None = None,
        log: Callable[[str], None] = print,
        data: dict[str, Any] | None = None,
        checkpoint_every: float = CHECKPOINT_EVERY,
    ):
        if not checkpoint_every >= 0:  # NaN too
            raise ValueError(f"checkpoint_every={checkpoint_every}: must be >= 0 seconds")
        self.workdir = user_path(workdir)
        self.keep = keep
        self.log = log
        self.checkpoint_every = checkpoint_every
        make_workdir(self.workdir)
        if restart and is_primary():
            for name in MANAGED:
                path = self.workdir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        barrier("sae_jax: workdir ready")
        self._config = self._check_config(config, options)
        self._check_data(data)
        # Read by every process before process 0 rewrites it: finished and resume
        # begin with a collective (_agreed) that each process reaches after this.
        self._metrics = MetricsLog(self.workdir, write=is_primary())
        self._saver = Saver(self.workdir, durable=[self._metrics.path])
        self._signals = HeldSignals()
        self._stage: str | None = None  # the stage being trained
        self._frozen: set[str] = set()  # the stages whose end this run saved
        self._last_save = time.monotonic()

    def _check_config(self, config: Config, options: dict[str, Any] | None) -> dict[str, Any]:
        """The run's config as JSON (with ``options``), refused if the workdir holds
        another, written to ``config.json`` if it holds none."""
        config_path = self.workdir / "config.json"
        wanted = config_to_json(config)
        if options:
            wanted[RUN_KEY] = options
        if config_path.exists():
            try:
                saved = read_config(config_path)
            except CheckpointError as e:
                raise CheckpointError(f"{e}; --restart discards the run") from None
            diffs = config_differences(saved, wanted)
            if diffs:
                raise CheckpointError(
                    f"{self.workdir} holds a run with another config ({'; '.join(diffs)}); "
                    f"use another --workdir, or --restart to discard that run"
                )
        elif is_primary():
            write_text_atomic(config_path, json.dumps(wanted, indent=2) + "\n")
        return wanted

    def _check_data(self, data: dict[str, Any] | None) -> None:
        """Refuse to go on with other data than the run started on: ``data``
        (``{"source", "sha256": {array: digest}}``) against ``data.json``, which the
        run's first start writes."""
        path = self.workdir / DATA_RECORD
        if data is None:
            return
        if not path.exists():
            if is_primary():
                write_text_atomic(path, json.dumps(data, indent=2) + "\n")
            return
        saved = read_json(path, "run's data record").get("sha256", {})
        changed = sorted(
            k for k in set(saved) | set(data["sha256"]) if saved.get(k) != data["sha256"].get(k)
        )
        if changed:
            raise CheckpointError(
                f"{data['source']}: not the data that the run in {self.workdir} started on "
                f"({', '.join(changed)} differ from {path}); --restart starts over, or use "
                f"another --workdir"
            )

    def where(self) -> str:
        """Where the run is, for a message: the stage being trained and what is saved."""
        if self._stage is None:
            return f"before training started; nothing new is saved in {self.workdir}"
        folder, step = self._saver.committed or (None, 0)
        saved = "no epoch of it is saved yet"
        if folder == self.workdir / "checkpoints" / self._stage:
            saved = f"epoch {step} is saved"
        elif folder == self.workdir / "frozen" / self._stage:
            return f"after {self._stage} (it is saved in {self.workdir})"
        return f"during {self._stage} ({saved} in {self.workdir})"

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> RunStore:
        self._saver.background = True
        self._signals.install()
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
        elif jax.process_count() == 1:  # a lost process could make the wait endless
            with contextlib.suppress(OSError):  # the error on its way out says more
                self.close()
        else:
            self._signals.uninstall()

    def close(self) -> None:
        """Wait until every save is committed (``OSError`` naming a checkpoint that
        could not be saved), and give the signals back their handlers."""
        self._signals.uninstall()
        if self._stage is not None:
            self._saver.release(self.workdir / "checkpoints" / self._stage)
        with signals_deferred():
            self._saver.wait()
        self._metrics.close()

    # ------------------------------------------------------------------ StageStore

    def finished(self, stage: str, template: Params) -> tuple[Params, StageRecord] | None:
        """The final params and record of ``stage`` if it completed in an earlier run."""
        directory = self.workdir / "frozen" / stage
        if not _agreed(directory.exists()):
            return None
        self._saver.wait()  # orbax works in one thread at a time
        manager = checkpoint_manager(directory, None)
        try:
            restored = self._restore(manager, directory, template)
        finally:
            manager.close()
        if restored is None:
            return None
        params, meta = restored
        record = _record(stage, meta)
        self.log(f"{stage}: finished in an earlier run, restored from {directory}")
        self._metrics.settle(stage, record.history)
        return params, record

    def resume(
        self, stage: str, template: TrainState
    ) -> tuple[TrainState, StageRecord, Params | None] | None:
        """The state, record and best params so far after the last good epoch
        checkpoint of ``stage``, if any."""
        directory = self.workdir / "checkpoints" / stage

        def structure(meta: dict) -> dict[str, Any]:
            tree = {"state": template, "key": _KEY}
            return {**tree, "best": template.params} if meta.get("with_best") else tree

        self._stage, restored = stage, None
        self._signals.holding = True
        if _agreed(directory.exists()):
            self._saver.wait()  # orbax works in one thread at a time
            manager = checkpoint_manager(directory, self.keep)
            try:
                restored = self._restore(manager, directory, structure)
            finally:
                manager.close()
        if restored is None:
            self._metrics.settle(stage, [])
            return None
        tree, meta = restored
        history = None
        if "history" not in meta:  # saved with the sha256 of the lines in metrics.jsonl
            epochs, digest = meta["epoch"], meta["history_sha256"]
            history = self._metrics.history(stage, epochs, digest, directory / str(epochs))
        record = _record(stage, meta, history)
        self.log(f"{stage}: resuming after epoch {len(record.history)} from {directory}")
        self._metrics.settle(stage, record.history)
        return tree["state"], record, tree.get("best")

    def save_epoch(
        self,
        stage: str,
        state: TrainState,
        key: jax.Array,
        record: StageRecord,
        best: Params | None = None,
    ) -> None:
        """Log the metrics of epoch ``len(record.history)``, and checkpoint ``state``
        (with the ``best`` params so far, when given) if it is time to; raise
        ``Stopped`` once it is saved if SIGINT or SIGTERM came (see the class)."""
        self._saver.check()  # a save that failed in the background stops the run here
        self._metrics.log(stage, record.history)
        due, signum = agreed(
            time.monotonic() - self._last_save >= self.checkpoint_every,
            self._signals.caught or 0,
        )
        if due or signum:
            epoch = len(record.history)
            tree = {"state": state, "key": legacy_key(key)}
            tree |= {"best": best} if best is not None else {}
            tree = copied(replicated(tree))  # a checkpoint of several processes holds global arrays
            meta = _meta(
                record, stage=stage, epoch=epoch, config=self._config,
                with_best=best is not None, history_sha256=self._metrics.digest(stage),
            )  # fmt: skip
            self._saver.save(self.workdir / "checkpoints" / stage, epoch, tree, meta, self.keep)
            self._last_save = time.monotonic()
        if signum:
            self._stop(signum)

    def save_finished(self, stage: str, params: Params, record: StageRecord) -> None:
        """Keep the final params of ``stage`` as its own frozen pytree."""
        self._saver.check()
        self._metrics.log(stage, record.history)
        directory = self.workdir / "frozen" / stage
        if stage not in self._frozen and not _agreed((directory / "0").exists()):
            meta = _meta(record, history=record.history, stage=stage, config=self._config)
            self._saver.save(directory, 0, copied(replicated(params)), meta, None)
            self._frozen.add(stage)
            self._last_save = time.monotonic()
        self._saver.release(directory)
        self._saver.release(self.workdir / "checkpoints" / stage)
        _, signum = agreed(False, self._signals.caught or 0)
        self._signals.holding = False
        if signum:
            self._stop(signum)

    # ------------------------------------------------------------------ helpers

    def _restore(
        self, manager: ocp.CheckpointManager, directory: Path, template: Any
    ) -> tuple[Any, dict] | None:
        """``restore_latest``, refusing a checkpoint saved under another config."""
        restored = restore_latest(manager, directory, template, self.workdir, self.log)
        if restored is None:
            return None
        step_dir, tree, meta = restored
        self._check_saved_config(meta, step_dir)
        return tree, meta

    def _stop(self, signum: int) -> None:
        """Stop the run for ``signum`` once what was saved is committed."""
        self._signals.caught = None
        self._saver.wait()
        name = signal.Signals(signum).name
        raise Stopped(f"stopped by {name} {self.where()}; {RESUME}", signum)

    def _check_saved_config(self, meta: dict[str, Any], step_dir: Path) -> None:
        """Refuse a checkpoint of another config (fields added since: their defaults)."""
        saved = meta.get("config", self._config)
        with contextlib.suppress(ConfigError):
            saved = with_defaults(saved)
        diffs = config_differences(saved, self._config)
        if diffs:
            raise CheckpointError(
                f"{step_dir} was saved by a run with another config ({'; '.join(diffs)}); "
                f"use another --workdir, or --restart to discard that run"
            )


def _agreed(fact: bool) -> bool:
    """Process 0's view of ``fact`` (about the shared workdir), in every process: a
    process that looked later could see what process 0 has written since."""
    return bool(broadcast_int(int(fact) if is_primary() else 0))


# The structure of a saved PRNG key (metadata only: importing this module must not
# start a JAX backend, or --platform and --distributed would come too late).
_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)
