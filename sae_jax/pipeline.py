"""The whole pipeline: greedy layer-wise pretraining of a stack, the softmax stage,
end-to-end fine-tuning, and sweeps of many such runs in one compiled program.

Built on the recipes (``sae_jax.recipes``); like them, it takes arrays and
callbacks and never opens files or prints.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from sae_jax.config import Config
from sae_jax.engine import Params, place_data
from sae_jax.models import FrozenLayer, classifier, compose, softmax_head
from sae_jax.parallel import default_mesh
from sae_jax.recipes import (
    SWEEP_NAMES,
    SWEEPABLE,
    StageCallback,
    StageRecord,
    StageStore,
    classifier_loss,
    encode_dataset,
    evaluate,
    init_stage_params,
    pretrain_layer,
    run_stage,
    split2,
)


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
    keys = _stage_keys(config, seeds)
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
        layers, records, top_codes = _pretrain(
            config, x, keys, loss_hparams or None, as_array("pretrain_learning_rate"), common
        )
        stages += records

        # Softmax-only stage on the top code (the encoders stay frozen).
        head = softmax_head(config)
        head_key, softmax_key = split2(keys[-2])
        judge_codes = (
            encode_dataset(layers, judge[0], config.eval_batch_size, bool(models))
            if judge
            else None
        )
        head_params, record = run_stage(
            "softmax",
            classifier_loss(head, config.softmax_weight_decay),
            init_stage_params(head, head_key, head.in_features),
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
        start = init_stage_params(model, keys[-2], config.input_features)

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


def _stage_keys(config: Config, seeds: list[int] | None) -> jax.Array:
    """One key per stage: each pretraining layer, the softmax stage, fine-tuning.

    ``[layers + 2, 2]``; with ``seeds`` ``[layers + 2, models, 2]``, model ``i``'s
    keys being those its own run with ``config.seed = seeds[i]`` would use."""
    num_keys = len(config.layers) + 2
    if seeds is None:
        return jax.random.split(jax.random.PRNGKey(config.seed), num_keys)
    return jnp.stack([jax.random.split(jax.random.PRNGKey(s), num_keys) for s in seeds], 1)


def _pretrain(
    config: Config,
    x: jax.Array,
    keys: jax.Array,
    hparams: dict[str, jax.Array] | None,
    learning_rate: jax.Array | None,
    common: dict[str, Any],
) -> tuple[list[FrozenLayer], list[StageRecord], jax.Array]:
    """Greedy layer-wise pretraining: layer k trains on the codes of layers 1..k-1.

    Returns the frozen layers, their stage records and the top layer's codes of ``x``
    (``[n, features]``, or ``[models, n, features]`` in a sweep)."""
    models = bool(common["models"])
    layers: list[FrozenLayer] = []
    records: list[StageRecord] = []
    codes, in_features = x, config.input_features
    for i, layer in enumerate(config.layers):
        if layers:
            codes = encode_dataset(layers[-1:], codes, config.eval_batch_size, models)
        frozen, record = pretrain_layer(
            layer,
            in_features,
            codes,
            key=keys[i],
            bias_init=config.bias_init,
            name=f"pretrain_{i + 1}",
            hparams=hparams,
            learning_rate=learning_rate,
            **common,
        )
        layers.append(frozen)
        records.append(record)
        in_features = layer.features
    return layers, records, encode_dataset(layers[-1:], codes, config.eval_batch_size, models)


def pretrain_stack(
    config: Config,
    x: jax.Array,
    *,
    on_epoch: StageCallback | None = None,
    store: StageStore | None = None,
    mesh: Mesh | None = None,
) -> tuple[list[FrozenLayer], list[StageRecord]]:
    """Greedy layer-wise pretraining of ``config``'s stack on unlabelled images alone.

    The same stages, keys and results as the pretraining part of ``run_pipeline``
    with the same config (stages ``pretrain_1`` ... ``pretrain_k``); for data
    without labels, or features without a classifier.

    Args:
      config: a validated ``Config`` (its softmax and fine-tuning fields are unused).
      x: images ``[n, input_features]``, uint8 or float.
      on_epoch, store, mesh: as for ``run_pipeline``.

    Returns:
      The frozen layers (bottom first; ``encode_dataset`` gives their codes) and one
      ``StageRecord`` per layer.
    """
    if x.ndim != 2 or x.shape[1] != config.input_features or x.shape[0] == 0:
        raise ValueError(
            f"train images: expected [n, {config.input_features}] with n >= 1; "
            f"got shape {tuple(x.shape)}"
        )
    common = {
        "batch_size": config.batch_size,
        "store": store,
        "on_epoch": on_epoch,
        "mesh": mesh,
        "models": None,
    }
    keys = _stage_keys(config, None)
    layers, records, _ = _pretrain(config, place_data(x, mesh), keys, None, None, common)
    return layers, records


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
