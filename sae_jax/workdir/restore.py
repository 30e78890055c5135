"""Reading orbax checkpoints back: the manager of a folder of steps, and one step
restored whole on every process (whatever devices and processes saved it), once its
files have passed their manifest check.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sae_jax.errors import CheckpointError
from sae_jax.files import exception_line
from sae_jax.parallel import everywhere


def checkpoint_manager(directory: Path, keep: int | None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
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
