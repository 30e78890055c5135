"""Figures of a run, drawn with matplotlib's object API (no pyplot, no global state)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sae_jax.training.stage import StageRecord

DPI = 100


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
    FigureCanvasAgg(fig)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)


def save_filters(
    kernel: np.ndarray, path: str | os.PathLike[str], count: int = 100, shape=(28, 28)
) -> None:
    """The first ``count`` units' input weights as a grid of ``shape`` tiles (UFLDL style).

    Args:
      kernel: ``[in_features, units]``, the first layer's encoder weights.
      path: the PNG to write (8 x 8 inches at 100 dpi: 800 x 800 pixels).
    """
    kernel = np.asarray(kernel)
    count = min(count, kernel.shape[1])
    side = math.ceil(math.sqrt(count))
    fig = Figure(figsize=(8, 8))
    fig.suptitle(f"first-layer filters (units 1-{count} of {kernel.shape[1]})")
    for i in range(side * side):
        ax = fig.add_subplot(side, side, i + 1)
        ax.set_axis_off()
        if i < count:
            tile = kernel[:, i].reshape(shape)
            scale = np.abs(tile).max() or 1.0
            ax.imshow(tile / scale, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    fig.subplots_adjust(0.01, 0.01, 0.99, 0.95, 0.05, 0.05)
    _save(fig, path)


def save_reconstructions(
    original: np.ndarray,
    reconstructed: np.ndarray,
    path: str | os.PathLike[str],
    corrupted: np.ndarray | None = None,
    shape=(28, 28),
) -> None:
    """Rows of digits: original, corrupted (when given) and reconstructed.

    Args:
      original, reconstructed, corrupted: ``[k, features]`` in ``[0, 1]``.
      path: the PNG to write (``k`` x 1.2 inches wide, 1.2 inches per row, 100 dpi).
    """
    rows = [("original", original)]
    if corrupted is not None:
        rows.append(("corrupted", corrupted))
    rows.append(("reconstructed", reconstructed))
    k = len(original)
    fig = Figure(figsize=(1.2 * k, 1.2 * len(rows)))
    for r, (label, images) in enumerate(rows):
        for c in range(k):
            ax = fig.add_subplot(len(rows), k, r * k + c + 1)
            ax.imshow(np.asarray(images[c]).reshape(shape), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.subplots_adjust(0.06, 0.02, 0.99, 0.98, 0.05, 0.05)
    _save(fig, path)


def save_curves(stages: Sequence[StageRecord], path: str | os.PathLike[str]) -> None:
    """Mean loss per epoch for each stage, and accuracy per epoch where measured
    (validation accuracy when a validation set was held out, else test accuracy).

    Writes a PNG of (4 inches x panels) by 3.5 inches at 100 dpi.
    """
    panels = [s for s in stages if s.history]
    names = ("validation_accuracy", "test_accuracy")
    key = lambda stage: next(k for k in names if k in stage.history[0])
    accuracy = [s for s in panels if any(k in s.history[0] for k in names)]
    n = len(panels) + (1 if accuracy else 0)
    fig = Figure(figsize=(4 * max(n, 1), 3.5))
    for i, stage in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        epochs = np.arange(1, len(stage.history) + 1)
        ax.plot(epochs, [h["loss"] for h in stage.history], marker="o")
        ax.set_title(f"{stage.name} loss")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if accuracy:
        ax = fig.add_subplot(1, n, n)
        for stage in accuracy:
            epochs = np.arange(1, len(stage.history) + 1)
            ax.plot(
                epochs,
                [h[key(stage)] for h in stage.history],
                marker="o",
                label=f"{stage.name} ({key(stage).split('_')[0]})",
            )
        ax.set_title("accuracy per epoch")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    _save(fig, path)
