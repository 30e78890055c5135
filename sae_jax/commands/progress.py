"""Progress output of a run: one line per epoch, or a bar with loss and ETA on a terminal."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from sae_jax.config import Config


def format_epoch(
    stage: str, epoch: int, epochs: int, metrics: dict[str, float], seconds: float
) -> str:
    """One progress line, e.g. ``pretrain_1 epoch 3/10 loss 1234.5 (...) 2.31s``."""
    skip = ("loss", "test_accuracy", "validation_accuracy", "seconds")
    terms = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in skip)
    line = f"{stage:<10} epoch {epoch:>3}/{epochs} loss {metrics['loss']:.6g}"
    if terms:
        line += f" ({terms})"
    for name in ("validation_accuracy", "test_accuracy"):
        if name in metrics:
            line += f" {name} {metrics[name]:.4f}"
    return f"{line} {seconds:.2f}s"


class Progress:
    """Per-epoch progress: a bar with loss and ETA on a terminal, plain lines otherwise."""

    def __init__(self, config: Config, log: Callable[[str], None], stream: TextIO | None = None):
        self.epochs = {f"pretrain_{i + 1}": layer.epochs for i, layer in enumerate(config.layers)}
        self.epochs.update(softmax=config.softmax_epochs, finetune=config.finetune_epochs)
        self.log = log
        self.stream = stream
        self._seconds: dict[str, list[float]] = {}

    def __call__(self, stage: str, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        total = self.epochs[stage]
        if self.stream is None:
            self.log(format_epoch(stage, epoch, total, metrics, seconds))
            return
        times = self._seconds.setdefault(stage, [])
        times.append(seconds)
        steady = times[1:] or times  # the first epoch includes compilation
        eta = (total - epoch) * sum(steady) / len(steady)
        filled = 20 * epoch // max(total, 1)
        line = (
            f"\r{stage:<10} [{'#' * filled}{'.' * (20 - filled)}] {epoch}/{total} "
            f"loss {metrics['loss']:.5g}"
        )
        for name in ("validation_accuracy", "test_accuracy"):
            if name in metrics:
                line += f" {name.split('_')[0][:4]} {metrics[name]:.4f}"
        line += f" ETA {eta:.0f}s   "
        self.stream.write(line + ("\n" if epoch == total else ""))
        self.stream.flush()
