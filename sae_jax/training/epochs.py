"""The epochs of one ``loop.fit``, looked at one epoch late (``Epochs``), and which of
its models still train (``Models``).

Epoch ``e`` is dispatched, then epoch ``e - 1`` is looked at: its metrics read, its
NaN check made, ``on_epoch`` called, while ``e`` runs. Nothing here compiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding

from sae_jax.errors import NonFiniteLossError
from sae_jax.parallel import put, to_host


class Launched(NamedTuple):
    """An epoch dispatched to the device: its number, state and metrics (with the
    ``evaluate`` values of its params), the models it trained, and when it started."""

    epoch: int
    state: Any  # loop.TrainState
    metrics: dict[str, jax.Array]
    active: np.ndarray | None
    started: float


class Epochs:
    """``fit``'s epochs, looked at one epoch late: epoch ``e``'s metrics are read (and
    ``on_epoch`` called) once epoch ``e + 1`` is queued, so the device never waits
    for the host between epochs. The result is the same as looking at once."""

    def __init__(
        self,
        epoch_fn: Callable[..., tuple[Any, dict[str, jax.Array]]],
        data: tuple[jax.Array, ...],
        key: jax.Array,
        where: NamedSharding | None,
        models: Models,
        evaluate: Callable[[Any], dict[str, jax.Array]] | None,
    ) -> None:
        """``epoch_fn(state, data, key, active, epoch)`` runs one epoch; ``where`` is
        where the models' flags live (None: the default device); ``models`` a
        ``Models``; ``evaluate`` as for ``fit``."""
        self.epoch_fn, self.data, self.key, self.where = epoch_fn, data, key, where
        self.models, self.evaluate = models, evaluate
        self.history: list[dict[str, Any]] = []
        self.done = time.perf_counter()  # when the last epoch looked at was over

    def launch(self, state: Any, epoch: int) -> Launched:
        """Dispatch ``epoch`` from ``state`` (and its evaluation) without waiting."""
        started = time.perf_counter()
        active = None if self.models.active is None else self.models.active.copy()
        mask = self.models.mask(self.where)
        new, metrics = self.epoch_fn(state, self.data, self.key, mask, epoch)
        if self.evaluate is not None:
            metrics = {**metrics, **self.evaluate(new.params)}
        return Launched(epoch, new, metrics, active, started)

    def settle(self, ran: Launched, name: str, on_epoch: Callable | None) -> bool:
        """Wait for ``ran``, record it, call ``on_epoch``; True when training ends."""
        host = {k: np.asarray(v).tolist() for k, v in to_host(ran.metrics).items()}
        now = time.perf_counter()
        seconds, self.done = now - max(ran.started, self.done), now
        self.models.after_epoch(np.isfinite(np.asarray(host["loss"])), name, ran.epoch, host)
        self.history.append(host)
        verdict = None if on_epoch is None else on_epoch(ran.epoch, ran.state, host, seconds)
        return self.models.stop(verdict)

    def left_changed(self, running: Launched) -> bool:
        """Whether ``running`` trained models that have stopped since it was queued."""
        left = self.models.active
        ran = running.active
        return left is not None and (ran is None or not np.array_equal(left, ran))


class Models:
    """Which of a ``fit``'s models still train, how many epochs each trained, and
    which diverged (one model: None, and a non-finite loss raises)."""

    def __init__(self, models: int | None):
        self.active = None if models is None else np.ones(models, bool)
        self.epochs = None if models is None else np.zeros(models, int)
        self.diverged = None if models is None else np.zeros(models, bool)

    def mask(self, where: NamedSharding | None) -> jax.Array | None:
        """The ``active`` flags on the device(s), at ``where`` (None: the default)."""
        return None if self.active is None else _put_mask(self.active, where)

    def after_epoch(self, finite: np.ndarray, name: str, epoch: int, host: dict) -> None:
        """Count the epoch for the models that trained in it; stop the ones that
        diverged (a stopped model's loss is whatever its frozen state gives)."""
        if self.active is None:
            if not finite.all():
                raise NonFiniteLossError(
                    f"stage {name}, epoch {epoch + 1}: the loss became {host['loss']}"
                )
            return
        self.epochs += self.active
        self.diverged |= self.active & ~finite
        self.active &= finite

    def stop(self, verdict: Any) -> bool:
        """Apply ``on_epoch``'s verdict; True when training ends."""
        if self.active is None:
            return bool(verdict)
        if isinstance(verdict, np.ndarray):
            self.active &= verdict
        elif verdict:
            return True
        return not self.active.any()


def _put_mask(active: np.ndarray, where: NamedSharding | None) -> jax.Array:
    """The models' ``active`` flags ``[models]`` where their states live."""
    return jax.device_put(active) if where is None else put(active, where)
