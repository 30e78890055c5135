"""One training stage on top of ``fit``: its record, where it keeps its progress
(``StageStore``), and ``run_stage``, which evaluates after every epoch, keeps the
best epoch (of each model, when many train at once) and stops on patience.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sae_jax.config import OptimizerConfig
from sae_jax.training.loop import LossFn, Params, TrainState, fit, init_state, legacy_key
from sae_jax.training.optim import make_optimizer

History = list[dict[str, Any]]  # per epoch: floats, or per-model lists in a sweep
# on_epoch(stage, epoch, metrics, seconds), with epoch counted from 1.
StageCallback = Callable[[str, int, dict[str, float], float], None]


@dataclass
class StageRecord:
    """One stage of a run: its name, epochs, wall seconds and per-epoch metrics.

    ``wall_s`` adds up the time of every run that worked on the stage (a resumed
    stage counts its earlier runs too).
    """

    name: str
    epochs: int
    wall_s: float = 0.0
    history: History = field(default_factory=list)
    best_epoch: int | list[int] = 0  # with keep_best: the epoch returned (per model)
    # With several models: how many epochs each trained, and which diverged (its loss
    # became NaN or infinite, and it stopped there).
    epochs_trained: list[int] | None = None
    diverged: list[bool] | None = None

    @property
    def final_loss(self) -> float | None:
        """The mean loss of the last epoch (None when the stage ran no epoch)."""
        return self.history[-1]["loss"] if self.history else None

    def take(self, index: np.ndarray) -> StageRecord:
        """The record of a stage shared by several models: per-model values (arrays
        ``[k]``, the ``best_epoch`` list) are reordered, model ``index[i]`` as ``i``."""

        def per_model(value: Any) -> Any:
            return np.asarray(value)[index] if np.ndim(value) else value

        def listed(value: Any) -> Any:
            return [value[i] for i in index] if isinstance(value, list) else value

        history = [{k: per_model(v) for k, v in epoch.items()} for epoch in self.history]
        return replace(
            self,
            history=history,
            best_epoch=listed(self.best_epoch),
            epochs_trained=listed(self.epochs_trained),
            diverged=listed(self.diverged),
        )

    def summary(self) -> dict[str, Any]:
        """``{name, epochs, wall_s, final_loss}`` as JSON-ready data."""
        return {
            "name": self.name,
            "epochs": self.epochs,
            "wall_s": self.wall_s,
            "final_loss": self.final_loss,
        }


class StageStore(Protocol):
    """Where stages keep their progress (``sae_jax.workdir.checkpoint.RunStore`` on disk).

    ``finished`` returns the final params and record of a completed stage;
    ``resume`` the state after the last saved epoch, the record so far and the
    params of the best epoch so far (None unless ``save_epoch`` was given them).
    Both return None when there is nothing to restore; ``template`` gives the
    structure.
    """

    def finished(self, stage: str, template: Params) -> tuple[Params, StageRecord] | None: ...

    def resume(
        self, stage: str, template: TrainState
    ) -> tuple[TrainState, StageRecord, Params | None] | None: ...

    def save_epoch(
        self,
        stage: str,
        state: TrainState,
        key: jax.Array,
        record: StageRecord,
        best: Params | None = None,
    ) -> None: ...

    def save_finished(self, stage: str, params: Params, record: StageRecord) -> None: ...


class _Best:
    """The best epoch so far by ``metric``: of one model, or of each of ``models``.

    ``params`` are the best epoch's params (per model, with a leading model
    axis); ``epoch`` counts from 1 (0: none yet); ``value`` is the best metric.
    """

    def __init__(self, models: int | None, patience: int | None):
        shape = () if models is None else (models,)
        self.models, self.patience = models, patience
        self.value, self.epoch = np.full(shape, -np.inf), np.zeros(shape, int)
        self.params: Params | None = None

    def update(self, epoch: int, value: Any, params: Params) -> bool | np.ndarray:
        """Keep ``params`` where ``value`` improves on the best; return the stop
        verdict for ``fit``: True to stop (one model), or which models go on."""
        improved = np.asarray(value, np.float64) > self.value  # NaN never improves
        if improved.any():  # arrays are never donated: no copy is needed
            if self.params is None or improved.all():
                self.params = params
            else:
                self.params = _keep_improved(jnp.asarray(improved), params, self.params)
        self.value = np.where(improved, value, self.value)
        self.epoch = np.where(improved, epoch + 1, self.epoch)
        if self.patience is None:
            return False if self.models is None else np.ones(self.models, bool)
        going = epoch + 1 - self.epoch < self.patience
        return bool(not going) if self.models is None else going

    def restore(self, record: StageRecord, metric: str, params: Params) -> None:
        """Take up the best epoch so far of a resumed stage (of each model)."""
        self.epoch = np.asarray(record.best_epoch)
        history = record.history
        values = [
            history[e - 1][metric] if self.models is None else history[e - 1][metric][m]
            for m, e in enumerate(np.atleast_1d(self.epoch))
            if e > 0
        ]
        if self.models is None:
            self.value = np.float64(values[0]) if values else np.float64(-np.inf)
        else:
            epochs = np.atleast_1d(self.epoch)
            value = np.full(self.models, -np.inf)
            value[epochs > 0] = values
            self.value = value
        self.params = params

    def best_epoch(self) -> int | list[int]:
        return int(self.epoch) if self.models is None else self.epoch.tolist()


@jax.jit
def _keep_improved(improved: jax.Array, new: Params, old: Params) -> Params:
    """Per model (leading axis): ``new`` where ``improved``, else ``old``."""
    pick = lambda n, o: jnp.where(improved.reshape(-1, *[1] * (n.ndim - 1)), n, o)
    return jax.tree.map(pick, new, old)


@dataclass(frozen=True)
class Stage:
    """What one stage trains and how it is judged.

    ``loss_fn`` (with ``hparams``, the loss's values: scalars, or ``[models]`` arrays)
    is minimised for ``epochs`` epochs of ``batch_size`` examples with the optimizer of
    ``optimizer`` at ``learning_rate`` (a scalar or ``[models]``; None: the config's);
    ``reduction`` says how the loss reduces a batch (``fit`` reports per-example
    metrics either way). After every epoch ``evaluate_fn(params)`` (when given: a
    device value, dispatched right after the epoch and read one epoch late) is
    recorded as ``metric``; with ``keep_best`` the stage returns the params of the
    epoch with the highest ``metric`` and stops after ``patience`` epochs without a
    new best.
    """

    name: str
    loss_fn: LossFn
    optimizer: OptimizerConfig
    epochs: int
    batch_size: int
    reduction: str = "mean"
    hparams: Any = None
    learning_rate: Any = None
    evaluate_fn: Callable[[Params], Any] | None = None
    metric: str = "test_accuracy"
    keep_best: bool = False
    patience: int | None = None


def run_stage(
    stage: Stage,
    params: Params,
    data: tuple[jax.Array, ...],
    *,
    key: jax.Array,
    store: StageStore | None = None,
    on_epoch: StageCallback | None = None,
    mesh: Mesh | None = None,
    models: int | None = None,
    data_axis: Any = None,
) -> tuple[Params, StageRecord]:
    """One ``stage``: ``fit`` from ``params``, or from where ``store`` says it stopped.

    After every epoch: the stage's evaluation (when it has one) joins the metrics,
    with ``seconds``; ``store`` saves the state; then ``on_epoch`` is called. A
    keep-best stage's best params travel in every checkpoint, so a resumed stage
    returns what an uninterrupted one would. With ``models``, every model keeps its
    own best epoch (``record.best_epoch`` is a list) and stops on its own patience
    while the others go on; a model whose loss diverges stops there
    (``record.diverged``). ``mesh``, ``models`` and ``data_axis`` go to ``fit``.

    Returns:
      The final params and the stage's ``StageRecord``.
    """
    name, key = stage.name, legacy_key(key)  # the form checkpoints keep
    if store is not None and (done := store.finished(name, params)) is not None:
        return done
    start = time.perf_counter()
    steps = -(-_num_examples(data, models, data_axis) // stage.batch_size)
    # A given rate lives in the optimizer's state alone: one optimizer (and program)
    # serves every rate.
    rated = stage.learning_rate is not None
    optimizer = make_optimizer(replace(stage.optimizer, learning_rate=1.0) if rated else
                               stage.optimizer, steps)  # fmt: skip
    state = init_state(params, optimizer, stage.hparams, models, stage.learning_rate)
    record = StageRecord(name, stage.epochs)
    best = _Best(models, stage.patience) if stage.keep_best else None
    if store is not None and (resumed := store.resume(name, state)) is not None:
        state, record, best_params = resumed
        if best is not None and best_params is not None:  # saved after its best epoch
            best.restore(record, stage.metric, best_params)
    earlier_wall = record.wall_s  # of the runs that worked on the stage before
    evaluate_fn = stage.evaluate_fn
    judge = evaluate_fn and (lambda p: {stage.metric: evaluate_fn(p)})
    metric = None if judge is None else stage.metric
    after_epoch = _after_epoch(name, record, best, store, key, metric, on_epoch)
    result = fit(
        stage.loss_fn, params, optimizer, data, batch_size=stage.batch_size,
        epochs=stage.epochs, key=key, name=name, on_epoch=after_epoch, state=state,
        start_epoch=len(record.history), mesh=mesh, models=models, data_axis=data_axis,
        hparams=stage.hparams, reduction=stage.reduction, evaluate=judge,
    )  # fmt: skip
    record.wall_s = earlier_wall + time.perf_counter() - start
    if models is not None:
        assert result.diverged is not None  # fit reports it for models
        earlier = np.asarray(record.epochs_trained or np.zeros(models, int))
        record.epochs_trained = (earlier + result.epochs_trained).tolist()
        record.diverged = result.diverged.tolist()
    final = result.state.params if best is None or best.params is None else best.params
    if store is not None:
        store.save_finished(name, final, record)
    return final, record


def _after_epoch(
    name: str,
    record: StageRecord,
    best: _Best | None,
    store: StageStore | None,
    key: jax.Array,
    metric: str | None,
    on_epoch: StageCallback | None,
) -> Callable[[int, TrainState, dict[str, Any], float], Any]:
    """``fit``'s ``on_epoch`` for a stage: record, keep the best, save. ``metric``
    names the evaluation in the metrics (None: the stage has none)."""
    earlier_wall, start = record.wall_s, time.perf_counter()

    def after_epoch(epoch: int, state: TrainState, metrics: dict[str, Any], seconds: float):
        metrics["seconds"] = seconds
        record.history.append(metrics)
        record.wall_s = earlier_wall + time.perf_counter() - start
        verdict = None
        if best is not None:
            assert metric is not None  # keep_best judges by the stage's evaluate_fn
            value = metrics[metric]
            if best.models is not None:  # a model whose loss is not finite diverged:
                finite = np.isfinite(np.asarray(metrics["loss"], np.float64))
                value = np.where(finite, np.asarray(value, np.float64), np.nan)  # never best
            verdict = best.update(epoch, value, state.params)
        if best is not None:
            record.best_epoch = best.best_epoch()
        if store is not None:
            store.save_epoch(name, state, key, record, None if best is None else best.params)
        if on_epoch is not None:
            on_epoch(name, epoch + 1, metrics, seconds)
        return verdict

    return after_epoch


def _num_examples(data: tuple[jax.Array, ...], models: int | None, data_axis: Any) -> int:
    """The number of examples in ``data`` (see ``fit``'s ``data_axis``)."""
    axis = data_axis[0] if isinstance(data_axis, tuple) else data_axis
    return data[0].shape[1 if models is not None and axis == 0 else 0]
