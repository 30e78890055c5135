"""Checkpoints of a run with orbax: resume after a crash, and load a trained model.

Layout of a workdir::

  .sae_jax                     the mark that a run owns the folder (files.check_workdir)
  config.json                  the run's config; another config is refused
  data.json                    the source and sha256 of the data; other data is refused
  checkpoints/<stage>/<epoch>/ the train state and RNG key after each epoch, with the
                               stage, epoch, metrics so far and config (last few kept)
  frozen/<stage>/0/            the final params of each completed stage
  metrics.jsonl                one line per epoch per stage, as checkpointed
  manifests/                   size and sha256 of every file of every checkpoint
  damaged/                     checkpoints that failed their check, moved aside

Each checkpoint's files are checked against its manifest before orbax reads them,
so a truncated or corrupted checkpoint is found (and skipped) before it is used.

In a run of several processes every process calls the same methods: orbax saves
and restores collectively into the one workdir (a folder every process sees),
while process 0 alone writes ``config.json``, ``metrics.jsonl`` and the manifests,
checks manifests and moves damaged checkpoints aside, and tells the others which
checkpoint to restore.
"""

from __future__ import annotations

import json
import os
import shutil
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
)
from sae_jax.errors import CheckpointError
from sae_jax.files import (
    failed_writes_quiet,
    file_manifest,
    make_workdir,
    manifest_path,
    manifest_problem,
    read_json,
    signals_deferred,
    storage_error,
    user_path,
    write_text_atomic,
)
from sae_jax.parallel import barrier, broadcast_int, is_primary, replicated
from sae_jax.training.loop import Params, TrainState
from sae_jax.training.stage import StageRecord
from sae_jax.workdir.restore import checkpoint_manager, restore_intact

STANDARDIZATION = "standardization.npz"  # the per-feature mean and std of --standardize
DATA_RECORD = "data.json"  # the source and sha256 of the data the run started on
MANAGED = (
    "config.json",
    DATA_RECORD,
    "checkpoints",
    "frozen",
    "manifests",
    "metrics.jsonl",
    "damaged",
    "summary.json",
    "filters.png",
    "reconstructions.png",
    "curves.png",
    STANDARDIZATION,
    "tensorboard",
)


def _record(stage: str, meta: dict[str, Any]) -> StageRecord:
    return StageRecord(
        stage, meta["epochs"], meta["wall_s"], list(meta["history"]), meta.get("best_epoch", 0)
    )


def _meta(record: StageRecord, **extra: Any) -> dict[str, Any]:
    return {
        "epochs": record.epochs,
        "wall_s": record.wall_s,
        "history": record.history,
        "best_epoch": record.best_epoch,
        **extra,
    }


class RunStore:
    """A ``StageStore`` on disk: orbax checkpoints of every epoch of every stage.

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
    ):
        self.workdir = user_path(workdir)
        self.keep = keep
        self.log = log
        make_workdir(self.workdir)
        if restart and is_primary():
            for name in MANAGED:
                path = self.workdir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        barrier("sae_jax: workdir ready")
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
        self._check_data(data)
        self._config = wanted
        self._done: list[StageRecord] = []  # stages finished so far, in order
        self._stage: str | None = None  # the stage being trained
        self._saved: tuple[str, int] | None = None  # the last epoch checkpoint written

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
        saved = "no epoch of it is saved yet"
        if self._saved is not None and self._saved[0] == self._stage:
            saved = f"epoch {self._saved[1]} is saved"
        return f"during {self._stage} ({saved} in {self.workdir})"

    # ------------------------------------------------------------------ StageStore

    def finished(self, stage: str, template: Params) -> tuple[Params, StageRecord] | None:
        """The final params and record of ``stage`` if it completed in an earlier run."""
        directory = self.workdir / "frozen" / stage
        if not _agreed(directory.exists()):
            return None
        restored = self._restore_latest(checkpoint_manager(directory, None), directory, template)
        if restored is None:
            return None
        params, meta = restored
        record = _record(stage, meta)
        self.log(f"{stage}: finished in an earlier run, restored from {directory}")
        self._done.append(record)
        self._rewrite_metrics()
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
        if _agreed(directory.exists()):
            restored = self._restore_latest(
                checkpoint_manager(directory, self.keep), directory, structure
            )
        if restored is None:
            self._rewrite_metrics()
            return None
        tree, meta = restored
        record = _record(stage, meta)
        self.log(f"{stage}: resuming after epoch {len(record.history)} from {directory}")
        self._rewrite_metrics(record)
        return tree["state"], record, tree.get("best")

    def save_epoch(
        self,
        stage: str,
        state: TrainState,
        key: jax.Array,
        record: StageRecord,
        best: Params | None = None,
    ) -> None:
        """Checkpoint ``state`` (and the ``best`` params so far, when given) after epoch
        ``len(record.history)``, then log its metrics."""
        epoch = len(record.history)
        tree = {"state": state, "key": key, **({"best": best} if best is not None else {})}
        tree = replicated(tree)  # a checkpoint of several processes holds global arrays
        meta = _meta(record, stage=stage, epoch=epoch, config=self._config)
        with signals_deferred():  # SIGINT and SIGTERM wait until the epoch is saved
            manager = checkpoint_manager(self.workdir / "checkpoints" / stage, self.keep)
            self._save(manager, epoch, tree, {**meta, "with_best": best is not None})
            self._saved = (stage, epoch)
            if is_primary():
                with open(self.workdir / "metrics.jsonl", "a") as f:
                    line = {"stage": stage, "epoch": epoch, **record.history[-1]}
                    f.write(json.dumps(line) + "\n")

    def save_finished(self, stage: str, params: Params, record: StageRecord) -> None:
        """Keep the final params of ``stage`` as its own frozen pytree."""
        with signals_deferred():
            manager = checkpoint_manager(self.workdir / "frozen" / stage, None)
            if not _agreed(manager.latest_step() is not None):
                meta = _meta(record, stage=stage, config=self._config)
                self._save(manager, 0, replicated(params), meta)
            else:
                manager.close()
        self._done.append(record)

    # ------------------------------------------------------------------ helpers

    def _save(self, manager: ocp.CheckpointManager, step: int, tree: Any, meta: dict) -> None:
        """Save with orbax, then write the manifest; drop manifests of deleted steps.

        A failed save (a full disk, a file-size limit) raises ``OSError`` naming the
        checkpoint; what was saved before stays valid, and a half-written checkpoint
        has no manifest."""
        step_dir = Path(manager.directory) / str(step)
        manifest = manifest_path(self.workdir, step_dir)
        try:
            with failed_writes_quiet():
                manager.save(
                    step,
                    args=ocp.args.Composite(
                        tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
                    ),
                )
            barrier(f"sae_jax: saved {step_dir}")  # every process's files are written
            if is_primary():
                manifest.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(manifest, json.dumps(file_manifest(step_dir)))
                kept = {f"{s}.json" for s in manager.all_steps()}
                for old in manifest.parent.glob("*.json"):
                    if old.name not in kept:  # its checkpoint was superseded and deleted
                        old.unlink()
        except Exception as e:  # orbax and tensorstore raise many kinds
            raise storage_error(f"cannot save the checkpoint {step_dir}", e) from None
        finally:
            manager.close()

    def _restore_latest(
        self, manager: ocp.CheckpointManager, directory: Path, template: Any
    ) -> tuple[Any, dict] | None:
        """Restore the newest step that passes its manifest check; move the steps that
        fail it aside. Only a failed check condemns a checkpoint: one that passes but
        cannot be restored stops the run (``CheckpointError``) and stays where it is.
        Process 0 checks and moves; every process restores the step it chose."""
        try:
            step = broadcast_int(self._newest_intact(manager, directory) if is_primary() else -1)
            if step < 0:
                return None
            step_dir = directory / str(step)
            tree, meta = restore_intact(manager, step, template, step_dir)
            self._check_saved_config(meta, step_dir)
            return tree, meta
        finally:
            manager.close()

    def _newest_intact(self, manager: ocp.CheckpointManager, directory: Path) -> int:
        """The newest step of ``manager`` whose files match its manifest (-1: none);
        the steps that fail the check are moved to ``damaged/``."""
        for step in sorted(manager.all_steps(), reverse=True):
            step_dir = directory / str(step)
            problem = manifest_problem(self.workdir, step_dir)
            if problem is None:
                return step
            target = self._move_aside(step_dir)
            manifest_path(self.workdir, step_dir).unlink(missing_ok=True)
            self.log(
                f"checkpoint {step_dir} is damaged ({problem}); moved to {target}, "
                f"falling back to an earlier one"
            )
            manager.reload()
        return -1

    def _check_saved_config(self, meta: dict[str, Any], step_dir: Path) -> None:
        """Refuse a checkpoint saved under another config (config.json replaced)."""
        diffs = config_differences(meta.get("config", self._config), self._config)
        if diffs:
            raise CheckpointError(
                f"{step_dir} was saved by a run with another config ({'; '.join(diffs)}); "
                f"use another --workdir, or --restart to discard that run"
            )

    def _move_aside(self, path: Path) -> Path:
        target_dir = self.workdir / "damaged"
        target_dir.mkdir(exist_ok=True)
        rel = path.relative_to(self.workdir)
        target = target_dir / f"{'-'.join(rel.parts)}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, target)
        return target

    def _rewrite_metrics(self, current: StageRecord | None = None) -> None:
        """Make metrics.jsonl hold exactly the checkpointed epochs, before appending."""
        if not is_primary():
            return
        records = [*self._done, *([current] if current is not None else [])]
        lines = [
            json.dumps({"stage": r.name, "epoch": i + 1, **h}) + "\n"
            for r in records
            for i, h in enumerate(r.history)
        ]
        write_text_atomic(self.workdir / "metrics.jsonl", "".join(lines))


def _agreed(fact: bool) -> bool:
    """Process 0's view of ``fact`` (about the shared workdir), in every process: a
    process that looked later could see what process 0 has written since."""
    return bool(broadcast_int(int(fact) if is_primary() else 0))


# The structure of a saved PRNG key (metadata only: importing this module must not
# start a JAX backend, or --platform and --distributed would come too late).
_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)
