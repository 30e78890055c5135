"""Checkpoints of a run with orbax: resume after a crash, and load a trained model.

Layout of a workdir::

  config.json                  the run's config; another config is refused
  checkpoints/<stage>/<epoch>/ the train state after each epoch (the last few kept)
  frozen/<stage>/0/            the final params of each completed stage
  metrics.jsonl                one line per epoch per stage, as checkpointed
  damaged/                     checkpoints that failed to restore, moved aside

Every checkpoint carries a sha256 of its arrays, checked on restore, so a damaged
file is found even when orbax can still read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sae_jax.config import Config, LayerConfig, OptimizerConfig
from sae_jax.engine import Params, TrainState
from sae_jax.models import TrainedModel, classifier, init_params
from sae_jax.recipes import StageRecord

MANAGED = (
    "config.json",
    "checkpoints",
    "frozen",
    "metrics.jsonl",
    "damaged",
    "summary.json",
    "filters.png",
    "reconstructions.png",
    "curves.png",
)


class CheckpointError(ValueError):
    """A workdir cannot be used (another config, nothing saved); the message says why."""


def tree_digest(tree: Any) -> str:
    """sha256 over the bytes, dtypes and shapes of every leaf of ``tree``."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def config_to_json(config: Config) -> dict[str, Any]:
    """The config as JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_json(data: dict[str, Any]) -> Config:
    """The inverse of ``config_to_json``."""
    data = dict(data)
    data["layers"] = tuple(
        LayerConfig(**{**layer, "optimizer": OptimizerConfig(**layer["optimizer"])})
        for layer in data["layers"]
    )
    for key in ("softmax_optimizer", "finetune_optimizer"):
        data[key] = OptimizerConfig(**data[key])
    return Config(**data)


def config_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON configs differ, as ``path: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += config_differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += config_differences(a, b, f"{path}[{i}]")
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _manager(directory: Path, keep: int | None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options)


def _save(manager: ocp.CheckpointManager, step: int, tree: Any, meta: dict[str, Any]) -> None:
    meta = {**meta, "sha256": tree_digest(tree)}
    manager.save(
        step,
        args=ocp.args.Composite(tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
    )


def _restore(manager: ocp.CheckpointManager, step: int, template: Any) -> tuple[Any, dict]:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            tree=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()
        ),
    )
    tree, meta = restored.tree, restored.meta
    if tree_digest(tree) != meta.get("sha256"):
        raise CheckpointError("its arrays do not match the sha256 saved with them")
    return tree, meta


def _record(stage: str, meta: dict[str, Any]) -> StageRecord:
    return StageRecord(stage, meta["epochs"], meta["wall_s"], list(meta["history"]))


def _meta(record: StageRecord, **extra: Any) -> dict[str, Any]:
    return {"epochs": record.epochs, "wall_s": record.wall_s, "history": record.history, **extra}


class RunStore:
    """A ``StageStore`` on disk: orbax checkpoints of every epoch of every stage.

    Args:
      workdir: the run's folder (created if needed).
      config: the run's config; a workdir holding another config is refused with
        ``CheckpointError`` naming the differing fields.
      restart: delete what an earlier run left in ``workdir`` first (only the
        names in ``MANAGED``; other files stay).
      keep: how many epoch checkpoints to keep per stage.
      log: receives one line per restore, fallback or move.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        config: Config,
        *,
        restart: bool = False,
        keep: int = 3,
        log: Callable[[str], None] = print,
    ):
        self.workdir = Path(workdir)
        self.keep = keep
        self.log = log
        self.workdir.mkdir(parents=True, exist_ok=True)
        if restart:
            for name in MANAGED:
                path = self.workdir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        config_path = self.workdir / "config.json"
        wanted = config_to_json(config)
        if config_path.exists():
            saved = json.loads(config_path.read_text())
            diffs = config_differences(saved, wanted)
            if diffs:
                raise CheckpointError(
                    f"{self.workdir} holds a run with another config ({'; '.join(diffs)}); "
                    f"use another --workdir, or --restart to discard that run"
                )
        else:
            _write_text_atomic(config_path, json.dumps(wanted, indent=2) + "\n")
        self._done: list[StageRecord] = []  # stages finished so far, in order

    # ------------------------------------------------------------------ StageStore

    def finished(self, stage: str, template: Params) -> tuple[Params, StageRecord] | None:
        """The final params and record of ``stage`` if it completed in an earlier run."""
        directory = self.workdir / "frozen" / stage
        if not directory.exists():
            return None
        restored = self._restore_latest(_manager(directory, None), directory, template)
        if restored is None:
            return None
        params, meta = restored
        record = _record(stage, meta)
        self.log(f"{stage}: finished in an earlier run, restored from {directory}")
        self._done.append(record)
        self._rewrite_metrics()
        return params, record

    def resume(self, stage: str, template: TrainState) -> tuple[TrainState, StageRecord] | None:
        """The state after the last good epoch checkpoint of ``stage``, if any."""
        directory = self.workdir / "checkpoints" / stage
        restored = None
        if directory.exists():
            restored = self._restore_latest(
                _manager(directory, self.keep), directory, {"state": template, "key": _KEY}
            )
        if restored is None:
            self._rewrite_metrics()
            return None
        tree, meta = restored
        record = _record(stage, meta)
        self.log(f"{stage}: resuming after epoch {len(record.history)} from {directory}")
        self._rewrite_metrics(record)
        return tree["state"], record

    def save_epoch(
        self, stage: str, state: TrainState, key: jax.Array, record: StageRecord
    ) -> None:
        """Checkpoint ``state`` after epoch ``len(record.history)``, then log its metrics."""
        epoch = len(record.history)
        manager = _manager(self.workdir / "checkpoints" / stage, self.keep)
        _save(manager, epoch, {"state": state, "key": key}, _meta(record, stage=stage, epoch=epoch))
        manager.close()
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"stage": stage, "epoch": epoch, **record.history[-1]}) + "\n")

    def save_finished(self, stage: str, params: Params, record: StageRecord) -> None:
        """Keep the final params of ``stage`` as its own frozen pytree."""
        manager = _manager(self.workdir / "frozen" / stage, None)
        if manager.latest_step() is None:
            _save(manager, 0, params, _meta(record, stage=stage))
        manager.close()
        self._done.append(record)

    # ------------------------------------------------------------------ helpers

    def _restore_latest(
        self, manager: ocp.CheckpointManager, directory: Path, template: Any
    ) -> tuple[Any, dict] | None:
        """Restore the newest good step; move damaged ones aside to ``damaged/``."""
        try:
            for step in sorted(manager.all_steps(), reverse=True):
                try:
                    return _restore(manager, step, template)
                except Exception as e:  # orbax and tensorstore raise many kinds
                    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                    target = self._move_aside(directory / str(step))
                    self.log(
                        f"checkpoint {directory / str(step)} is damaged "
                        f"({type(e).__name__}: {reason}); moved to {target}, "
                        f"falling back to an earlier one"
                    )
                    manager.reload()
            return None
        finally:
            manager.close()

    def _move_aside(self, path: Path) -> Path:
        target_dir = self.workdir / "damaged"
        target_dir.mkdir(exist_ok=True)
        rel = path.relative_to(self.workdir)
        target = target_dir / f"{'-'.join(rel.parts)}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, target)
        return target

    def _rewrite_metrics(self, current: StageRecord | None = None) -> None:
        """Make metrics.jsonl hold exactly the checkpointed epochs, before appending."""
        records = [*self._done, *([current] if current is not None else [])]
        lines = [
            json.dumps({"stage": r.name, "epoch": i + 1, **h}) + "\n"
            for r in records
            for i, h in enumerate(r.history)
        ]
        _write_text_atomic(self.workdir / "metrics.jsonl", "".join(lines))


_KEY = jax.random.PRNGKey(0)  # the structure of a saved PRNG key


def load_model(workdir: str | os.PathLike[str]) -> TrainedModel:
    """The fine-tuned stack saved in ``workdir`` (``predict``, ``encode``).

    Raises:
      CheckpointError: ``workdir`` holds no finished run.
    """
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    directory = workdir / "frozen" / "finetune"
    if not config_path.exists() or not directory.exists():
        raise CheckpointError(f"{workdir}: no finished run here (no frozen/finetune checkpoint)")
    try:
        config = config_from_json(json.loads(config_path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{config_path}: not a sae_jax config ({e})") from None
    template = init_params(classifier(config), jax.random.PRNGKey(0), config.input_features)
    manager = _manager(directory, None)
    try:
        params, _ = _restore(manager, manager.latest_step(), template)
    except Exception as e:
        raise CheckpointError(f"{directory}: cannot restore the model ({e})") from None
    finally:
        manager.close()
    return TrainedModel(config, params)
