"""Recipes on top of ``fit``: greedy pretraining, softmax stage, fine-tuning, evaluation.

Recipes take device arrays and callbacks; they never open files or print. Images
may be uint8 ``[n, features]`` (scaled to ``[0, 1]`` on the device, per batch) or
floating point.
"""

from __future__ import annotations

import dataclasses
import itertools
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
from sae_jax.config import Config, LayerConfig, OptimizerConfig
from sae_jax.corruption import corrupt
from sae_jax.engine import (
    LossFn,
    Params,
    TrainState,
    fit,
    init_state,
    make_optimizer,
    map_batches,
    place_data,
)
from sae_jax.models import (
    Autoencoder,
    FrozenLayer,
    activation_fn,
    autoencoder,
    classifier,
    compose,
    init_params,
    softmax_head,
    to_float,
)
from sae_jax.parallel import default_mesh, to_host

History = list[dict[str, float]]
# on_epoch(stage, epoch, metrics, seconds), with epoch counted from 1.
StageCallback = Callable[[str, int, dict[str, float], float], None]


SWEEPABLE = ("rho", "beta", "l1", "contractive", "weight_decay", "noise_level")
# What a sweep's ``hparams`` may name: the loss terms above and two learning rates.
SWEEP_NAMES = (*SWEEPABLE, "pretrain_learning_rate", "finetune_learning_rate")


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


def classifier_loss(module: nn.Module, weight_decay: float = 0.0) -> LossFn:
    """Mean softmax cross-entropy (+ weight decay) of ``module``'s logits.

    ``(params, (x [batch, in], labels [batch]), key) -> (loss, terms)``.
    """

    def loss_fn(params: Params, batch: tuple[jax.Array, ...], key: jax.Array, hparams=None):
        del key, hparams
        x, y = batch
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
    best_epoch: int = 0  # with keep_best: the epoch whose params the stage returned

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
    stage returns what an uninterrupted one would.
    ``mesh``, ``models``, ``data_axis`` and ``hparams`` go to ``fit``;
    ``learning_rate`` (``[models]``) gives each model its own learning rate.

    Returns:
      The final params and the stage's ``StageRecord``.
    """
    if store is not None and (done := store.finished(name, params)) is not None:
        return done
    start = time.perf_counter()
    optimizer = make_optimizer(optimizer_config, injectable=learning_rate is not None)
    record, state = StageRecord(name, epochs), None
    best: dict[str, Any] = {"value": -np.inf, "params": None}
    if store is not None and (resumed := store.resume(name, init_state(params, optimizer))):
        state, record, best_params = resumed
        if best_params is not None:  # saved only by a keep-best stage, after its best epoch
            best.update(value=record.history[record.best_epoch - 1][metric], params=best_params)
    if learning_rate is not None:
        state = init_state(params, optimizer, hparams, models)
        opt_state = state.opt_state
        rates = {**opt_state.hyperparams, "learning_rate": jnp.asarray(learning_rate, jnp.float32)}
        state = state._replace(opt_state=opt_state._replace(hyperparams=rates))
    earlier_wall = record.wall_s

    def after_epoch(epoch: int, state: TrainState, metrics: dict[str, Any], seconds: float):
        if evaluate_fn is not None:
            metrics[metric] = evaluate_fn(state.params)
        metrics["seconds"] = seconds
        record.history.append(metrics)
        record.wall_s = earlier_wall + time.perf_counter() - start
        if keep_best and metrics[metric] > best["value"]:
            best.update(value=metrics[metric], params=jax.tree.map(jnp.copy, state.params))
            record.best_epoch = epoch + 1
        if store is not None:
            store.save_epoch(name, state, key, record, best["params"])
        if on_epoch is not None:
            on_epoch(name, epoch + 1, metrics, seconds)
        return patience is not None and epoch + 1 - record.best_epoch >= patience

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
    )
    record.wall_s = earlier_wall + time.perf_counter() - start
    final = best["params"] if best["params"] is not None else result.state.params
    if store is not None:
        store.save_finished(name, final, record)
    return final, record


def _split2(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a key ``[2]`` (or keys ``[models, 2]``) in two, model by model."""
    keys = jax.vmap(jax.random.split)(key) if key.ndim == 2 else jax.random.split(key)
    return keys[..., 0, :], keys[..., 1, :]


def _init(module: nn.Module, key: jax.Array, in_features: int) -> Params:
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
    init_key, fit_key = _split2(key)
    params, record = run_stage(
        name,
        layer_loss(module, layer),
        _init(module, init_key, in_features),
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


@dataclass
class PipelineResult:
    """What ``run_pipeline`` returns (with ``seeds``, every leaf and value per model)."""

    layers: list[FrozenLayer]
    params: Params  # the fine-tuned classifier, see models.Classifier
    test: dict[str, Any]
    stages: list[StageRecord]
    test_before_finetune: dict[str, Any] = field(default_factory=dict)


def _check_split(name: str, split: tuple[jax.Array, jax.Array], config: Config) -> None:
    """Raise ``ValueError`` unless ``split`` is images ``[n, input_features]``, n >= 1,
    and integer labels ``[n]`` in ``[0, num_classes)``; the message names ``name``."""
    (x, y), features, classes = split, config.input_features, config.num_classes
    if x.ndim != 2 or x.shape[1] != features or x.shape[0] == 0:
        got = tuple(x.shape)
        raise ValueError(f"{name} images: expected [n, {features}] with n >= 1; got shape {got}")
    if tuple(y.shape) != (n := x.shape[0],):
        got = tuple(y.shape)
        raise ValueError(f"{name} labels: expected shape ({n},), one per image; got shape {got}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"{name} labels: expected an integer dtype; got {y.dtype}")
    for label in (int(jnp.min(y)), int(jnp.max(y))):
        if not 0 <= label < classes:
            raise ValueError(
                f"{name} labels: label {label} is outside 0..{classes - 1} (num_classes={classes})"
            )


def run_pipeline(
    config: Config,
    train: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array] | None = None,
    *,
    on_epoch: StageCallback | None = None,
    store: StageStore | None = None,
    mesh: Mesh | None = None,
    seeds: list[int] | None = None,
    hparams: dict[str, list[float]] | None = None,
    pretrain: bool = True,
    validation: tuple[jax.Array, jax.Array] | None = None,
) -> PipelineResult:
    """Greedy layer-wise pretraining, the softmax stage, and end-to-end fine-tuning.

    Args:
      config: a validated ``Config``.
      train: images ``[n, input_features]`` (uint8 or float) and labels ``[n]``.
      test: the same for the test set; when given, the test accuracy is measured
        after every softmax and fine-tuning epoch and at the end.
      on_epoch: ``on_epoch(stage, epoch, metrics, seconds)`` after every epoch, with
        ``epoch`` counted from 1; ``metrics`` holds ``test_accuracy`` where measured.
      store: keeps each stage's progress so that a run can resume (see
        ``StageStore``); the same config and seed give the same result either way.
      mesh: data parallelism over this mesh's devices (see ``sae_jax.parallel``);
        with ``seeds``, a mesh with a ``"models"`` axis spreads the models over it.
      seeds: train one model per seed, all in one compiled program per stage
        (``jax.vmap``); model ``i`` matches a run with ``config.seed = seeds[i]``.
      hparams: with ``seeds``, per-model values (lists as long as ``seeds``) of
        ``SWEEPABLE`` loss terms (for every pretraining layer),
        ``pretrain_learning_rate`` and ``finetune_learning_rate``.
      pretrain: False skips pretraining and the softmax stage: the same stack is
        fine-tuned from its random initialisation (the no-pretraining baseline).
      validation: held-out images and labels: the softmax and fine-tuning stages
        are judged on them after every epoch (``validation_accuracy``), keep their
        best epoch, fine-tuning stops after ``config.finetune_patience`` epochs
        without improvement, and ``test`` is only used at the end. The result's
        ``test_before_finetune`` is then the softmax-on-frozen-features model's.

    Returns:
      ``PipelineResult`` with the frozen layers, the fine-tuned classifier params,
      the test metrics and one ``StageRecord`` per stage.

    Raises:
      ValueError: before anything trains, for a split (``train``, ``test`` or
        ``validation``, named in the message) that is not images
        ``[n, input_features]`` with ``n >= 1`` and integer labels ``[n]`` in
        ``[0, num_classes)``.
    """
    hparams = dict(hparams or {})
    models = None if seeds is None else len(seeds)
    if models is None and hparams:
        raise ValueError("hparams need seeds: one value per model")
    if models is not None and store is not None:
        raise ValueError("a sweep (seeds) is not checkpointed: pass no store")
    if models is not None and validation is not None:
        raise ValueError("a sweep (seeds) takes no validation set")
    for name, values in hparams.items():
        if name not in SWEEP_NAMES:
            raise ValueError(f"cannot sweep {name!r}")
        if len(values) != models:
            raise ValueError(f"hparams[{name!r}] has {len(values)} values for {models} seeds")
    as_array = lambda name: jnp.asarray(hparams[name], jnp.float32) if name in hparams else None
    loss_hparams = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items() if k in SWEEPABLE}

    for name, split in {"train": train, "test": test, "validation": validation}.items():
        if split is not None:
            _check_split(name, split, config)
    # On the device(s) once; with a mesh every process holds its shards of each split.
    train, test, validation = (
        None if split is None else tuple(place_data(a, mesh) for a in split)
        for split in (train, test, validation)
    )

    x, y = train
    num_keys = len(config.layers) + 2
    if models is None:
        keys = jax.random.split(jax.random.PRNGKey(config.seed), num_keys)
    else:  # [num_keys, models, 2]: stage k of model i uses the key its own run would
        keys = jnp.stack([jax.random.split(jax.random.PRNGKey(s), num_keys) for s in seeds], 1)
    stages: list[StageRecord] = []
    common = {
        "batch_size": config.batch_size,
        "store": store,
        "on_epoch": on_epoch,
        "mesh": mesh,
        "models": models,
    }

    judge = validation if validation is not None else test  # judged after every epoch
    selection = {"metric": "validation_accuracy", "keep_best": True} if validation else {}

    def accuracy(module: nn.Module, inputs: jax.Array | None):
        if judge is None:
            return None
        return lambda p: evaluate(
            module, p, inputs, judge[1], config.eval_batch_size, models is not None
        )["accuracy"]

    model = classifier(config)
    if pretrain:
        # Greedy layer-wise pretraining: layer k trains on the codes of layers 1..k-1.
        layers: list[FrozenLayer] = []
        codes, in_features = x, config.input_features
        for i, layer in enumerate(config.layers):
            if layers:
                codes = encode_dataset(layers[-1:], codes, config.eval_batch_size, bool(models))
            frozen, record = pretrain_layer(
                layer,
                in_features,
                codes,
                key=keys[i],
                bias_init=config.bias_init,
                name=f"pretrain_{i + 1}",
                hparams=loss_hparams or None,
                learning_rate=as_array("pretrain_learning_rate"),
                **common,
            )
            layers.append(frozen)
            stages.append(record)
            in_features = layer.features
        top_codes = encode_dataset(layers[-1:], codes, config.eval_batch_size, bool(models))
        del codes

        # Softmax-only stage on the top code (the encoders stay frozen).
        head = softmax_head(config)
        head_key, softmax_key = _split2(keys[-2])
        judge_codes = (
            encode_dataset(layers, judge[0], config.eval_batch_size, bool(models))
            if judge
            else None
        )
        head_params, record = run_stage(
            "softmax",
            classifier_loss(head, config.softmax_weight_decay),
            _init(head, head_key, head.in_features),
            config.softmax_optimizer,
            (top_codes, y),
            epochs=config.softmax_epochs,
            key=softmax_key,
            evaluate_fn=accuracy(head, judge_codes),
            data_axis=(0, None) if models else None,
            **selection,
            **common,
        )
        stages.append(record)
        del top_codes, judge_codes
        start = compose(layers, head_params)
    else:
        layers = []
        start = _init(model, keys[-2], config.input_features)

    # End-to-end fine-tuning of the whole stack.
    params, record = run_stage(
        "finetune",
        classifier_loss(model, config.finetune_weight_decay),
        start,
        config.finetune_optimizer,
        (x, y),
        epochs=config.finetune_epochs,
        key=keys[-1],
        evaluate_fn=accuracy(model, judge[0] if judge else None),
        learning_rate=as_array("finetune_learning_rate"),
        patience=config.finetune_patience if validation else None,
        **selection,
        **common,
    )
    stages.append(record)
    test_metrics, before = {}, {}
    if test:
        test_metrics = evaluate(
            model, params, test[0], test[1], config.eval_batch_size, models is not None
        )
        if validation is not None and pretrain:
            codes = encode_dataset(layers, test[0], config.eval_batch_size)
            before = evaluate(head, head_params, codes, test[1], config.eval_batch_size)
    return PipelineResult(layers, params, test_metrics, stages, before)


def sweep(
    config: Config,
    train: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array] | None = None,
    *,
    seeds: list[int],
    hparams: dict[str, list[float]] | None = None,
    pretrain: bool = True,
    on_epoch: StageCallback | None = None,
    mesh: Mesh | str | None = "all",
) -> PipelineResult:
    """Train ``len(seeds)`` independent models in one compiled program per stage.

    Model ``i`` is the model that ``run_pipeline(model_config(config, seeds, hparams,
    i), ...)`` trains alone (up to float rounding): its own seed, its own
    hyperparameters (``hparams``: lists of per-model values, see ``run_pipeline``;
    ``grid`` makes them for every combination of values with every seed).
    Metrics and test results are lists with one value per model.

    ``mesh`` (default ``"all"``: ``parallel.make_mesh(models=len(seeds))`` over every
    device of every process when there are several, else None) spreads the models
    over its ``"models"`` axis, each device training its share without talking to
    the others, and splits every minibatch over its ``"data"`` axis.
    """
    if isinstance(mesh, str):
        if mesh != "all":
            raise ValueError(f"mesh={mesh!r}: pass a Mesh, None or 'all'")
        mesh = default_mesh(models=len(seeds))
    return run_pipeline(
        config,
        train,
        test,
        seeds=list(seeds),
        hparams=hparams,
        pretrain=pretrain,
        on_epoch=on_epoch,
        mesh=mesh,
    )


def model_config(
    config: Config, seeds: list[int], hparams: dict[str, list[float]] | None, i: int
) -> Config:
    """The config of model ``i`` of a sweep, for training it alone."""
    hparams = hparams or {}
    layer_changes = {k: float(v[i]) for k, v in hparams.items() if k in SWEEPABLE}
    layers = tuple(dataclasses.replace(layer, **layer_changes) for layer in config.layers)
    if "pretrain_learning_rate" in hparams:
        rate = float(hparams["pretrain_learning_rate"][i])
        layers = tuple(
            dataclasses.replace(
                layer, optimizer=dataclasses.replace(layer.optimizer, learning_rate=rate)
            )
            for layer in layers
        )
    changes: dict[str, Any] = {"seed": seeds[i], "layers": layers}
    if "finetune_learning_rate" in hparams:
        changes["finetune_optimizer"] = dataclasses.replace(
            config.finetune_optimizer, learning_rate=float(hparams["finetune_learning_rate"][i])
        )
    return config.replace(**changes)


def grid(
    seeds: list[int], hparams: dict[str, list[float]] | None = None
) -> tuple[list[int], dict[str, list[float]], list[dict[str, float]]]:
    """Every combination of ``hparams``' values with every seed, as per-model lists.

    The combinations (grid points) come in ``itertools.product`` order, the first
    name varying slowest. Models are value-major: all seeds of the first point
    first, so model ``k`` is point ``k // len(seeds)`` with seed
    ``seeds[k % len(seeds)]``. Without ``hparams`` there is one point, ``{}``.

    Returns:
      ``(model_seeds, model_hparams, points)``: the ``seeds`` and ``hparams`` to
      pass to ``sweep`` (and ``model_config``), and the points as dicts.
    """
    hparams = hparams or {}
    combinations = itertools.product(*hparams.values())
    points = [dict(zip(hparams, values, strict=True)) for values in combinations]
    model_seeds = [seed for _ in points for seed in seeds]
    model_hparams = {name: [p[name] for p in points for _ in seeds] for name in hparams}
    return model_seeds, model_hparams, points
