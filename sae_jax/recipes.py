"""Recipes on top of ``fit``: greedy pretraining, softmax stage, fine-tuning, evaluation.

Recipes take device arrays and callbacks; they never open files or print. Images
may be uint8 ``[n, features]`` (scaled to ``[0, 1]`` on the device, per batch) or
floating point.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from sae_jax import losses
from sae_jax.config import LayerConfig, OptimizerConfig
from sae_jax.corruption import corrupt
from sae_jax.engine import (
    LossFn,
    Params,
    TrainState,
    fit,
    init_state,
    map_batches,
)
from sae_jax.models import (
    Autoencoder,
    FrozenLayer,
    activation_fn,
    autoencoder,
    init_params,
    to_float,
)
from sae_jax.optim import make_optimizer, set_learning_rate
from sae_jax.parallel import to_host

History = list[dict[str, float]]
# on_epoch(stage, epoch, metrics, seconds), with epoch counted from 1.
StageCallback = Callable[[str, int, dict[str, float], float], None]


SWEEPABLE = ("rho", "beta", "l1", "contractive", "weight_decay", "noise_level")
# Fine-tuning's dropout keep probabilities (Config.finetune_input_keep / _hidden_keep).
DROPOUT = ("input_keep", "hidden_keep")
# What a sweep's ``hparams`` may name: the loss terms above, two learning rates and
# the dropout keep probabilities.
SWEEP_NAMES = (*SWEEPABLE, "pretrain_learning_rate", "finetune_learning_rate", *DROPOUT)


def layer_loss(module: Autoencoder, layer: LayerConfig) -> LossFn:
    """The pretraining loss of one autoencoder layer, ``(params, (x,), key) -> (loss, terms)``.

    ``x`` ``[batch, in]`` is corrupted with ``layer.noise`` (when not "none") before it
    is encoded; the reconstruction is always compared with the clean ``x``. The
    keyword ``hparams`` may override any of ``SWEEPABLE`` with a (traced) scalar.
    """
    reduce = jnp.sum if layer.batch_reduction == "sum" else jnp.mean

    def loss_fn(params: Params, batch: tuple[jax.Array, ...], key: jax.Array, hparams=None):
        hp = {name: getattr(layer, name) for name in SWEEPABLE} | (hparams or {})
        x = to_float(batch[0])
        h, z = module.apply(params, corrupt(key, x, layer.noise, hp["noise_level"]))
        if layer.reconstruction == "cross_entropy":
            rec = losses.bernoulli_cross_entropy(z, x)
        else:
            rec = losses.squared_error(activation_fn(layer.decoder_activation)(z), x)
        terms = {"reconstruction": layer.reconstruction_scale * reduce(rec)}  # x1.0 is exact
        swept = hparams or {}
        if layer.beta or "beta" in swept:
            terms["sparsity"] = hp["beta"] * losses.kl_sparsity(h, hp["rho"])
        if layer.l1 or "l1" in swept:
            terms["l1"] = hp["l1"] * reduce(losses.l1_activity(h))
        if layer.contractive or "contractive" in swept:
            kernel = params["params"]["encoder"]["kernel"]
            terms["contractive"] = hp["contractive"] * reduce(losses.contractive_penalty(h, kernel))
        if layer.weight_decay or "weight_decay" in swept:
            terms["weight_decay"] = hp["weight_decay"] * losses.l2_weight_decay(params)
        return sum(terms.values()), terms

    return loss_fn


def classifier_loss(
    module: nn.Module, weight_decay: float = 0.0, input_keep: float = 1.0, hidden_keep: float = 1.0
) -> LossFn:
    """Mean softmax cross-entropy (+ weight decay) of ``module``'s logits.

    ``(params, (x [batch, in], labels [batch]), key) -> (loss, terms)``. With a keep
    probability below 1 (or ``hparams`` naming one of ``DROPOUT``), the logits come
    from ``module.dropout_logits`` (a ``Classifier``) with the step's key.
    """

    def loss_fn(params: Params, batch: tuple[jax.Array, ...], key: jax.Array, hparams=None):
        x, y = batch
        swept = {k: v for k, v in (hparams or {}).items() if k in DROPOUT}
        keep = {"input_keep": input_keep, "hidden_keep": hidden_keep} | swept
        if swept or input_keep < 1.0 or hidden_keep < 1.0:
            logits = module.apply(params, to_float(x), key, **keep, method="dropout_logits")
        else:
            logits = module.apply(params, to_float(x))
        terms = {"cross_entropy": jnp.mean(losses.softmax_cross_entropy(logits, y))}
        if weight_decay:
            terms["weight_decay"] = weight_decay * losses.l2_weight_decay(params)
        return sum(terms.values()), terms

    return loss_fn


def _model_axis(x: jax.Array, models: Any) -> int | None:
    """0 when ``x`` carries a model axis (``[models, n, in]``), None when it is shared."""
    return 0 if models and x.ndim == 3 else None


@partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _encode(module, params: Params, x: jax.Array, batch_size: int, models: bool, x_axis):
    def one(p, xs):
        encode = lambda b: module.apply(p, to_float(b), method=Autoencoder.encode)
        return map_batches(encode, xs, batch_size)

    return jax.vmap(one, in_axes=(0, x_axis))(params, x) if models else one(params, x)


def encode_dataset(
    layers: list[FrozenLayer], x: jax.Array, batch_size: int, models: bool = False
) -> jax.Array:
    """The code of ``x`` ``[n, in]`` after ``layers`` (bottom first): ``[n, features]``.

    With ``models``, the layers' params carry a leading model axis and so does the
    result (``[models, n, features]``); ``x`` may be shared or per model.
    """
    for layer in layers:
        x = _encode(layer.module, layer.params, x, batch_size, models, _model_axis(x, models))
    return x


@partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _evaluate(
    module, params: Params, x: jax.Array, y: jax.Array, batch_size: int, models: bool, x_axis
):
    def one(p, xs):
        def batch_stats(batch):
            xb, yb = batch
            logits = module.apply(p, to_float(xb))
            return losses.softmax_cross_entropy(logits, yb), jnp.argmax(logits, -1) == yb

        ce, correct = map_batches(batch_stats, (xs, y), batch_size)
        return jnp.mean(correct), jnp.mean(ce)

    return jax.vmap(one, in_axes=(0, x_axis))(params, x) if models else one(params, x)


def evaluate(
    module: nn.Module,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    batch_size: int,
    models: bool = False,
) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of a classifier (or softmax head).

    Args:
      module: a Flax module mapping ``[batch, in]`` to logits ``[batch, classes]``.
      params: its params (with a leading model axis when ``models``).
      x: ``[n, in]`` inputs (or ``[models, n, in]``), ``batch_size`` rows at a time.
      y: ``[n]`` integer labels.

    Returns:
      ``{"accuracy": float in [0, 1], "loss": float}``; lists with ``models``.
    """
    x_axis = _model_axis(x, models)
    accuracy, loss = to_host(_evaluate(module, params, x, y, batch_size, models, x_axis))
    return {"accuracy": np.asarray(accuracy).tolist(), "loss": np.asarray(loss).tolist()}


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

    @property
    def final_loss(self) -> float | None:
        """The mean loss of the last epoch (None when the stage ran no epoch)."""
        return self.history[-1]["loss"] if self.history else None

    def summary(self) -> dict[str, Any]:
        """``{name, epochs, wall_s, final_loss}`` as JSON-ready data."""
        return {
            "name": self.name,
            "epochs": self.epochs,
            "wall_s": self.wall_s,
            "final_loss": self.final_loss,
        }


class StageStore(Protocol):
    """Where stages keep their progress (``sae_jax.checkpoint.RunStore`` on disk).

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

    ``params`` are a copy of the best epoch's params (per model, with a leading model
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
        if improved.any():
            if self.params is None or improved.all():
                self.params = jax.tree.map(jnp.copy, params)
            else:
                self.params = _keep_improved(jnp.asarray(improved), params, self.params)
        self.value = np.where(improved, value, self.value)
        self.epoch = np.where(improved, epoch + 1, self.epoch)
        if self.patience is None:
            return False if self.models is None else np.ones(self.models, bool)
        going = epoch + 1 - self.epoch < self.patience
        return bool(not going) if self.models is None else going

    def best_epoch(self) -> int | list[int]:
        return int(self.epoch) if self.models is None else self.epoch.tolist()


@jax.jit
def _keep_improved(improved: jax.Array, new: Params, old: Params) -> Params:
    """Per model (leading axis): ``new`` where ``improved``, else ``old``."""
    pick = lambda n, o: jnp.where(improved.reshape(-1, *[1] * (n.ndim - 1)), n, o)
    return jax.tree.map(pick, new, old)


def run_stage(
    name: str,
    loss_fn: LossFn,
    params: Params,
    optimizer_config: OptimizerConfig,
    data: tuple[jax.Array, ...],
    *,
    epochs: int,
    key: jax.Array,
    batch_size: int,
    store: StageStore | None = None,
    evaluate_fn: Callable[[Params], Any] | None = None,
    on_epoch: StageCallback | None = None,
    mesh: Mesh | None = None,
    models: int | None = None,
    data_axis: Any = None,
    hparams: dict[str, Any] | None = None,
    learning_rate: Any = None,
    metric: str = "test_accuracy",
    keep_best: bool = False,
    patience: int | None = None,
) -> tuple[Params, StageRecord]:
    """One stage: ``fit`` from ``params``, or from where ``store`` says it stopped.

    After every epoch: ``evaluate_fn``'s accuracy (when given) joins the metrics as
    ``metric``, with ``seconds``; ``store`` saves the state; then ``on_epoch`` is
    called. With ``keep_best`` the stage returns the params of its epoch with the
    highest ``metric`` (``record.best_epoch``), and stops after ``patience`` epochs
    without a new best; the best params travel in every checkpoint, so a resumed
    stage returns what an uninterrupted one would. With ``models``, every model
    keeps its own best epoch (``record.best_epoch`` is a list) and stops on its own
    patience while the others go on; a model whose loss diverges stops too.
    ``mesh``, ``models``, ``data_axis`` and ``hparams`` go to ``fit``;
    ``learning_rate`` (``[models]``) gives each model its own learning rate.

    Returns:
      The final params and the stage's ``StageRecord``.
    """
    if store is not None and (done := store.finished(name, params)) is not None:
        return done
    start = time.perf_counter()
    steps = -(-_num_examples(data, models, data_axis) // batch_size)
    optimizer = make_optimizer(optimizer_config, learning_rate is not None, steps)
    record, state = StageRecord(name, epochs), None
    best = _Best(models, patience) if keep_best else None
    if store is not None and (resumed := store.resume(name, init_state(params, optimizer))):
        state, record, best_params = resumed
        if best_params is not None:  # saved only by a keep-best stage, after its best epoch
            best.value = np.float64(record.history[record.best_epoch - 1][metric])
            best.epoch, best.params = np.asarray(record.best_epoch), best_params
    if learning_rate is not None:
        state = init_state(params, optimizer, hparams, models)
        state = state._replace(opt_state=set_learning_rate(state.opt_state, learning_rate))
    earlier_wall = record.wall_s

    def after_epoch(epoch: int, state: TrainState, metrics: dict[str, Any], seconds: float):
        if evaluate_fn is not None:
            metrics[metric] = evaluate_fn(state.params)
        metrics["seconds"] = seconds
        record.history.append(metrics)
        record.wall_s = earlier_wall + time.perf_counter() - start
        verdict = None if best is None else best.update(epoch, metrics[metric], state.params)
        if best is not None:
            record.best_epoch = best.best_epoch()
        if store is not None:
            store.save_epoch(name, state, key, record, None if best is None else best.params)
        if on_epoch is not None:
            on_epoch(name, epoch + 1, metrics, seconds)
        return verdict

    result = fit(
        loss_fn,
        params,
        optimizer,
        data,
        batch_size=batch_size,
        epochs=epochs,
        key=key,
        name=name,
        on_epoch=after_epoch,
        state=state,
        start_epoch=len(record.history),
        mesh=mesh,
        models=models,
        data_axis=data_axis,
        hparams=hparams,
        drop_nonfinite=models is not None and keep_best,
    )
    record.wall_s = earlier_wall + time.perf_counter() - start
    final = result.state.params if best is None or best.params is None else best.params
    if store is not None:
        store.save_finished(name, final, record)
    return final, record


def _num_examples(data: tuple[jax.Array, ...], models: int | None, data_axis: Any) -> int:
    """The number of examples in ``data`` (see ``fit``'s ``data_axis``)."""
    axis = data_axis[0] if isinstance(data_axis, tuple) else data_axis
    return data[0].shape[1 if models is not None and axis == 0 else 0]


def split2(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a key ``[2]`` (or keys ``[models, 2]``) in two, model by model."""
    keys = jax.vmap(jax.random.split)(key) if key.ndim == 2 else jax.random.split(key)
    return keys[..., 0, :], keys[..., 1, :]


def init_stage_params(module: nn.Module, key: jax.Array, in_features: int) -> Params:
    """``init_params`` for one key ``[2]`` or for each of ``[models, 2]`` keys."""
    if key.ndim == 2:
        return jax.vmap(lambda k: init_params(module, k, in_features))(key)
    return init_params(module, key, in_features)


def pretrain_layer(
    layer: LayerConfig,
    in_features: int,
    x: jax.Array,
    *,
    key: jax.Array,
    batch_size: int,
    bias_init: str = "uniform",
    name: str = "pretrain",
    store: StageStore | None = None,
    on_epoch: StageCallback | None = None,
    mesh: Mesh | None = None,
    models: int | None = None,
    hparams: dict[str, Any] | None = None,
    learning_rate: Any = None,
) -> tuple[FrozenLayer, StageRecord]:
    """Train one autoencoder layer on ``x`` ``[n, in_features]`` and freeze it.

    With ``models``, ``key`` is ``[models, 2]``, ``x`` is shared ``[n, in]`` or per
    model ``[models, n, in]``, and the frozen params carry a leading model axis.
    """
    module = autoencoder(layer, in_features, bias_init)
    init_key, fit_key = split2(key)
    params, record = run_stage(
        name,
        layer_loss(module, layer),
        init_stage_params(module, init_key, in_features),
        layer.optimizer,
        (x,),
        epochs=layer.epochs,
        key=fit_key,
        batch_size=batch_size,
        store=store,
        on_epoch=on_epoch,
        mesh=mesh,
        models=models,
        data_axis=_model_axis(x, models),
        hparams=hparams,
        learning_rate=learning_rate,
    )
    return FrozenLayer(module, params), record
