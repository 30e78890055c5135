"""TensorBoard output of a run: every epoch's metrics, the hparams and the figures.

An edge module over ``tensorboardX`` (the ``tensorboard`` extra: ``pip install
'sae-jax[tensorboard]'``; no TensorFlow needed). A run writes to
``<workdir>/tensorboard/``: the scalars ``<stage>/<metric>`` by epoch there, and the
hparams session in its ``hparams/`` folder; ``tensorboard --logdir <workdir>/tensorboard``
shows them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXTRA = "pip install 'sae-jax[tensorboard]'"


class TensorBoardUnavailable(ValueError):
    """``--tensorboard`` was asked for, but tensorboardX is not installed."""


def check_available() -> None:
    """Raise ``TensorBoardUnavailable`` (one line, naming the extra) unless tensorboardX
    can be imported."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise TensorBoardUnavailable(f"--tensorboard needs tensorboardX ({EXTRA})") from None


def flatten(tree: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """JSON data as dotted keys: ``{"layers": [{"beta": 3}]}`` -> ``{"layers.0.beta": 3}``;
    None becomes ``"None"`` (hparams take numbers, booleans and text only)."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: "None" if tree is None else tree}
    out: dict[str, bool | int | float | str] = {}
    for key, value in items:
        out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


class TensorBoard:
    """A TensorBoard writer for one run; a context manager.

    Args:
      logdir: the folder to write event files to (created if needed).
    """

    def __init__(self, logdir: str | os.PathLike[str]):
        check_available()
        from tensorboardX import SummaryWriter

        self.logdir = Path(logdir)
        self._writer = SummaryWriter(logdir=str(self.logdir))

    def epoch(self, stage: str, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        """One epoch's metrics as scalars ``<stage>/<name>`` at step ``epoch`` (plus
        ``<stage>/epoch_seconds``): the signature of the pipeline's ``on_epoch``."""
        for name, value in metrics.items():
            self._writer.add_scalar(f"{stage}/{name}", float(value), epoch)
        self._writer.add_scalar(f"{stage}/epoch_seconds", float(seconds), epoch)
        self._writer.flush()

    def hparams(self, config: dict[str, Any], results: dict[str, float]) -> None:
        """The run's config (JSON data, flattened to dotted keys) as an hparams session
        with ``results`` as its metrics (under ``hparams/``), and as text."""
        metrics = {f"result/{k}": float(v) for k, v in results.items() if v is not None}
        self._writer.add_hparams(flatten(config), metrics, name="hparams")
        text = "```\n" + json.dumps(config, indent=2) + "\n```"
        self._writer.add_text("config", text, 0)
        self._writer.flush()

    def images(self, paths: Sequence[Path]) -> None:
        """Each PNG in ``paths`` as an image named by its file's stem (at step 0): RGB(A)
        as RGB (alpha dropped), grayscale as is; floats in [0, 1] or uint8."""
        from matplotlib.image import imread

        for path in paths:
            image = np.asarray(imread(path))  # [H, W] grayscale or [H, W, 3 or 4]
            if image.ndim == 2:
                self._writer.add_image(Path(path).stem, image, 0, dataformats="HW")
            else:
                self._writer.add_image(Path(path).stem, image[..., :3], 0, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
