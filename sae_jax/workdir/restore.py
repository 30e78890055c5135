"""Reading orbax checkpoints back: the manager of a folder of steps, and one step
restored whole on every process (whatever devices and processes saved it), once its
files have passed their manifest check; the steps that fail it are moved aside.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sae_jax.errors import CheckpointError
from sae_jax.files import exception_line, manifest_path, manifest_problem
from sae_jax.parallel import broadcast_int, everywhere, is_primary


def checkpoint_manager(
    directory: Path, keep: int | None, *, background: bool = False
) -> ocp.CheckpointManager:
    """The orbax manager of the steps in ``directory``, keeping the last ``keep``
    (None: all). With ``background``, a save returns once the arrays are copied
    and commits in orbax's own thread (``wait_until_finished`` waits for it)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=background)
    return ocp.CheckpointManager(directory, options=options)


def _restore(
    manager: ocp.CheckpointManager, step: int, template: Any | Callable[[dict], Any]
) -> tuple[Any, dict]:
    """Restore ``step``; ``template`` may be a function of the step's JSON metadata.

    The arrays come back whole on every process (see ``parallel.everywhere``), so a
    run saved on any number of devices and processes restores on any other."""
    if callable(template):
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        template = template(meta)
    where = everywhere()  # whatever devices and processes saved it
    template = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), template
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            tree=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.tree, restored.meta


def restore_intact(
    manager: ocp.CheckpointManager, step: int, template: Any, step_dir: Path
) -> tuple[Any, dict]:
    """``_restore`` a checkpoint whose files match its manifest; ``CheckpointError``
    naming it, with orbax's reason in one line, if orbax still cannot read it."""
    try:
        return _restore(manager, step, template)
    except Exception as e:  # orbax and tensorstore raise many kinds
        raise CheckpointError(
            f"{step_dir}: cannot restore it although its files are intact "
            f"({exception_line(e)}); "
            f"it was left in place (saved by another version of sae_jax? --restart starts over)"
        ) from None


def restore_latest(
    manager: ocp.CheckpointManager,
    directory: Path,
    template: Any,
    workdir: Path,
    log: Callable[[str], None],
) -> tuple[Path, Any, dict] | None:
    """The folder, tree and JSON metadata of the newest step of ``manager`` (in
    ``directory``, inside ``workdir``) that passes its manifest check, or None; the
    steps that fail it are moved to ``<workdir>/damaged/``, each said in ``log``.

    Only a failed check condemns a checkpoint: one that passes but cannot be
    restored stops the run (``CheckpointError``) and stays where it is. Process 0
    checks and moves; every process restores the step it chose."""
    chosen = _newest_intact(manager, directory, workdir, log) if is_primary() else -1
    step = broadcast_int(chosen)
    if step < 0:
        return None
    step_dir = directory / str(step)
    tree, meta = restore_intact(manager, step, template, step_dir)
    return step_dir, tree, meta


def _newest_intact(
    manager: ocp.CheckpointManager, directory: Path, workdir: Path, log: Callable[[str], None]
) -> int:
    """The newest step of ``manager`` whose files match its manifest (-1: none);
    the steps that fail the check are moved to ``damaged/``."""
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = directory / str(step)
        problem = manifest_problem(workdir, step_dir)
        if problem is None:
            return step
        target = _move_aside(workdir, step_dir)
        manifest_path(workdir, step_dir).unlink(missing_ok=True)
        log(
            f"checkpoint {step_dir} is damaged ({problem}); moved to {target}, "
            f"falling back to an earlier one"
        )
        manager.reload()
    return -1


def _move_aside(workdir: Path, path: Path) -> Path:
    target_dir = workdir / "damaged"
    target_dir.mkdir(exist_ok=True)
    rel = path.relative_to(workdir)
    target = target_dir / f"{'-'.join(rel.parts)}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, target)
    return target
