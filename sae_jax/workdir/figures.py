"""Figures of a run, drawn with matplotlib's object API (no pyplot, no global state)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
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


def mosaic(images: np.ndarray, columns: int, gap: int = 1) -> np.ndarray:
    """``images`` ``[n, h, w]`` as one ``[rows * (h + gap) - gap, columns * (w + gap)
    - gap]`` array, row by row, with ``gap`` pixels of NaN between tiles (and NaN
    where the last row has no image); drawn as one image, it is one ``imshow``
    instead of one panel per tile."""
    n, h, w = images.shape
    rows = -(-n // columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap), np.nan)
    for i, tile in enumerate(images):
        r, c = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def _show(
    fig: Figure, rect: tuple[float, float, float, float], image: np.ndarray, vmin: float
) -> Axes:
    """``image`` in gray from ``vmin`` to 1 (NaN white) on axes at ``rect`` of ``fig``."""
    ax = fig.add_axes(rect)
    cmap = colormaps["gray"].with_extremes(bad="white")
    ax.imshow(image, cmap=cmap, vmin=vmin, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return ax


def save_filters(
    kernel: np.ndarray,
    path: str | os.PathLike[str],
    count: int = 100,
    shape: tuple[int, int] = (28, 28),
) -> None:
    """The first ``count`` units' input weights as a grid of ``shape`` tiles (UFLDL style),
    each scaled by its largest magnitude, drawn as one ``mosaic``.

    Args:
      kernel: ``[in_features, units]``, the first layer's encoder weights.
      path: the PNG to write (8 x 8 inches at 100 dpi: 800 x 800 pixels).
    """
    kernel = np.asarray(kernel)
    count = min(count, kernel.shape[1])
    side = math.ceil(math.sqrt(count))
    tiles = kernel[:, :count].T.reshape(count, *shape)
    scale = np.abs(tiles).max(axis=(1, 2), keepdims=True)
    tiles = tiles / np.where(scale > 0, scale, 1.0)
    fig = Figure(figsize=(8, 8))
    fig.suptitle(f"first-layer filters (units 1-{count} of {kernel.shape[1]})")
    _show(fig, (0.01, 0.01, 0.98, 0.94), mosaic(tiles, side), vmin=-1)
    _save(fig, path)


def save_reconstructions(
    original: np.ndarray,
    reconstructed: np.ndarray,
    path: str | os.PathLike[str],
    corrupted: np.ndarray | None = None,
    shape: tuple[int, int] = (28, 28),
) -> None:
    """Rows of digits: original, corrupted (when given) and reconstructed, drawn as one
    ``mosaic`` whose rows are labelled.

    Args:
      original, reconstructed, corrupted: ``[k, features]`` in ``[0, 1]``.
      path: the PNG to write (``k`` x 1.2 inches wide, 1.2 inches per row, 100 dpi).
    """
    rows = [("original", original)]
    if corrupted is not None:
        rows.append(("corrupted", corrupted))
    rows.append(("reconstructed", reconstructed))
    k = len(original)
    images = np.concatenate([np.asarray(im).reshape(k, *shape) for _, im in rows])
    fig = Figure(figsize=(1.2 * k, 1.2 * len(rows)))
    ax = _show(fig, (0.1, 0.02, 0.89, 0.96), mosaic(images, k, gap=2), vmin=0)
    ax.set_yticks([r * (shape[0] + 2) + shape[0] / 2 for r in range(len(rows))])
    ax.set_yticklabels([label for label, _ in rows], fontsize=8)
    ax.tick_params(length=0)
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
    fig.subplots_adjust(left=0.25 / n, right=1 - 0.05 / n, bottom=0.14, top=0.9, wspace=0.3)
    _save(fig, path)
