"""The whole pipeline: greedy layer-wise pretraining of a stack, the softmax stage and
end-to-end fine-tuning, for one model or for many in one compiled program
(``sae_jax.training.sweep`` and ``search`` build on it).

Built on the stages (``layerwise``, ``objectives``, ``evaluate``); like them, it takes
arrays and callbacks and never opens files or prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from sae_jax.config import Config
from sae_jax.models import FrozenLayer, classifier, compose, softmax_head
from sae_jax.parallel import MODEL_AXIS, axis_size
from sae_jax.training.evaluate import encode_dataset, evaluate
from sae_jax.training.hparams import (
    HParams,
    check_sweep,
    hparams_of,
    model_configs,
    pretraining_rows,
    stack,
    uses_dropout,
)
from sae_jax.training.layerwise import (
    init_stage_params,
    pretrain_layers,
    split_init,
    stage_keys,
)
from sae_jax.training.loop import Params, place_data, take_models
from sae_jax.training.objectives import classifier_loss
from sae_jax.training.stage import Stage, StageCallback, StageRecord, StageStore, run_stage


@dataclass
class PipelineResult:
    """What ``run_pipeline`` returns (with ``seeds``, every leaf and value per model)."""

    layers: list[FrozenLayer]
    params: Params  # the fine-tuned classifier, see models.Classifier
    test: dict[str, Any]
    stages: list[StageRecord]
    test_before_finetune: dict[str, Any] = field(default_factory=dict)

    def diverged(self) -> list[str | None]:
        """Per model of a sweep: the first stage whose loss became NaN or infinite for
        it (the model stopped there), or None; empty for a single run."""
        flags = [(s.name, s.diverged) for s in self.stages if s.diverged is not None]
        if not flags:
            return []
        return [
            next((name for name, diverged in flags if diverged[m]), None)
            for m in range(len(flags[0][1]))
        ]


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
    labels = np.asarray(y)  # checked on the host: no program runs for it
    for label in (int(labels.min()), int(labels.max())):
        if not 0 <= label < classes:
            raise ValueError(
                f"{name} labels: label {label} is outside 0..{classes - 1} (num_classes={classes})"
            )


def run_pipeline(
    config: Config | Sequence[Config],
    train: tuple[jax.Array | np.ndarray, jax.Array | np.ndarray],
    test: tuple[jax.Array | np.ndarray, jax.Array | np.ndarray] | None = None,
    *,
    on_epoch: StageCallback | None = None,
    store: StageStore | None = None,
    mesh: Mesh | None = None,
    seeds: list[int] | None = None,
    hparams: dict[str, list[float]] | None = None,
    pretrain: bool = True,
    validation: tuple[jax.Array | np.ndarray, jax.Array | np.ndarray] | None = None,
) -> PipelineResult:
    """Greedy layer-wise pretraining, the softmax stage, and end-to-end fine-tuning.

    Args:
      config: a validated ``Config``; or a list of them, one per model, trained at
        once in one compiled program per stage (``jax.vmap``): they may differ only
        in the values of ``sae_jax.training.hparams.HParams`` and their seeds, and
        model ``i`` matches a run of ``config[i]`` alone. Models with the same seed
        and the same pretraining values share one pretraining and softmax stage
        (they differ from fine-tuning on).
      train: images ``[n, input_features]`` (uint8 or float) and labels ``[n]``.
        With ``config.validation_examples = N`` (and no ``validation``) its last N
        examples are held out as the validation split, as the commands do.
      test: the same for the test set; when given, the test accuracy is measured
        after every softmax and fine-tuning epoch and at the end (only at the end
        when there is a validation split).
      on_epoch: ``on_epoch(stage, epoch, metrics, seconds)`` after every epoch, with
        ``epoch`` counted from 1; ``metrics`` holds ``test_accuracy`` (or
        ``validation_accuracy``) where measured.
      store: keeps each stage's progress so that a run can resume (see
        ``StageStore``); the same config and seed give the same result either way.
      mesh: data parallelism over this mesh's devices (see ``sae_jax.parallel``);
        with several models, a mesh with a ``"models"`` axis spreads them over it.
      seeds, hparams: another way to give a list of configs: model ``i`` is
        ``hparams.model_config(config, seeds, hparams, i)`` (``hparams``: lists of
        per-model values of ``SWEEP_NAMES``).
      pretrain: False skips pretraining and the softmax stage: the same stack is
        fine-tuned from its random initialisation (the no-pretraining baseline).
      validation: held-out images and labels: the softmax and fine-tuning stages
        are judged on them after every epoch (``validation_accuracy``), keep their
        best epoch, fine-tuning stops after ``config.finetune_patience`` epochs
        without improvement, and ``test`` is only used at the end. The result's
        ``test_before_finetune`` is then the softmax-on-frozen-features model's.
        With several models, every model keeps its own best epoch and stops on its
        own; a model that diverges stops alone, in any stage (``record.diverged``).

    Returns:
      ``PipelineResult`` with the frozen layers, the fine-tuned classifier params,
      the test metrics and one ``StageRecord`` per stage.

    Raises:
      ValueError: before anything trains, for a split (``train``, ``test`` or
        ``validation``, named in the message) that is not images
        ``[n, input_features]`` with ``n >= 1`` and integer labels ``[n]`` in
        ``[0, num_classes)``, or models that cannot train together.
    """
    run = _setting(config, seeds, hparams, store, mesh, on_epoch)
    run = _placed(run, train, test, validation)
    config = run.configs[0]
    layers: list[FrozenLayer]
    stages: list[StageRecord]
    layers, head_params, stages = [], None, []
    if pretrain:
        layers, head_params, stages = _pretrain_with_softmax(run)
        start = compose(layers, head_params)
    else:
        start = init_stage_params(classifier(config), run.keys[-2], config.input_features)
    params, record = _finetune(run, start)
    stages.append(record)
    test_metrics, before = _evaluate_test(run, layers, head_params, params)
    return PipelineResult(layers, params, test_metrics, stages, before)


def holdout(
    config: Config, train: tuple[Any, Any]
) -> tuple[tuple[Any, Any], tuple[Any, Any] | None]:
    """The training split without its last ``config.validation_examples`` examples,
    and those examples as the validation split (None when there are none)."""
    n = config.validation_examples
    if not n:
        return train, None
    x, y = train
    keep = len(x) - n
    return (x[:keep], y[:keep]), (x[keep:], y[keep:])


@dataclass
class _Run:
    """What the stages of one ``run_pipeline`` call share: the models' configs, the
    splits on the device, the stage keys, the models' ``HParams`` and ``run_stage``'s
    common kwargs."""

    configs: list[Config]
    models: int | None
    hp: HParams
    keys: jax.Array
    common: dict[str, Any]
    train: tuple[jax.Array, jax.Array] | None = None
    test: tuple[jax.Array, jax.Array] | None = None
    validation: tuple[jax.Array, jax.Array] | None = None

    @property
    def judge(self) -> tuple[jax.Array, jax.Array] | None:
        """The split judged after every epoch: validation if given, else test."""
        return self.validation if self.validation is not None else self.test

    @property
    def placement(self) -> dict[str, Any]:
        """``run_stage``'s keyword arguments that every stage shares."""
        return {k: self.common[k] for k in ("store", "on_epoch", "mesh", "models")}

    def selection(self) -> dict[str, Any]:
        """``run_stage``'s keep-best options: with a validation split only."""
        return {"metric": "validation_accuracy", "keep_best": True} if self.validation else {}

    def accuracy(self, module: nn.Module, inputs: jax.Array | None):
        """``params -> accuracy`` of ``module`` on ``inputs`` and the judged labels."""
        if self.judge is None:
            return None
        assert inputs is not None  # the judged split's images, or their codes
        batch, models = self.configs[0].eval_batch_size, self.models is not None
        y = self.judge[1]
        return lambda p: evaluate(module, p, inputs, y, batch, models, on_host=False)["accuracy"]


def _setting(config, seeds, hparams, store, mesh, on_epoch) -> _Run:
    """The models of a ``run_pipeline`` call, their ``HParams`` and keys, checked."""
    if isinstance(config, Config):
        if seeds is None and hparams:
            raise ValueError("hparams need seeds: one value per model")
        configs = [config] if seeds is None else model_configs(config, seeds, hparams)
        models = None if seeds is None else len(seeds)
    else:
        if seeds is not None or hparams:
            raise ValueError("pass seeds and hparams with one config, not with a list")
        configs, models = list(config), len(config)
    if models is not None:
        if store is not None:
            raise ValueError("a sweep (several models) is not checkpointed: pass no store")
        check_sweep(configs)
    hp = hparams_of(configs[0]) if models is None else stack(configs)
    common = {"batch_size": configs[0].batch_size, "store": store, "on_epoch": on_epoch}
    common |= {"mesh": mesh, "models": models}
    return _Run(configs, models, hp, stage_keys(configs, models is not None), common)


def _placed(run: _Run, train, test, validation) -> _Run:
    """``run`` with its splits checked and put on the device(s) once (with a mesh,
    every process holds its shards of each split)."""
    config = run.configs[0]
    if validation is None:
        train, validation = holdout(config, train)
    splits = {"train": train, "test": test, "validation": validation}
    for name, split in splits.items():
        if split is not None:
            _check_split(name, split, config)
    mesh = run.common["mesh"]
    placed = [
        None if s is None else (place_data(s[0], mesh), place_data(s[1], mesh))
        for s in splits.values()
    ]
    return replace(run, train=placed[0], test=placed[1], validation=placed[2])


def _pretrain_with_softmax(run: _Run) -> tuple[list[FrozenLayer], Params, list[StageRecord]]:
    """Pretraining and the softmax stage, trained once for each distinct pretraining
    among the models (``_shared_pretraining``) and then handed to every model."""
    shared = _shared_pretraining(run)
    sub = run if shared is None else _subset(run, shared[0])
    assert sub.train is not None  # placed by _placed
    layers, stages, top_codes = pretrain_layers(
        sub.configs, sub.train[0], sub.keys, sub.hp.layers, sub.common
    )
    head_params, record = _train_softmax(sub, layers, top_codes)
    stages.append(record)
    if shared is None:
        return layers, head_params, stages
    index = shared[1]
    mesh = run.common["mesh"]
    layers = [FrozenLayer(layer.module, take_models(layer.params, index, mesh)) for layer in layers]
    return layers, take_models(head_params, index, mesh), [r.take(index) for r in stages]


def _shared_pretraining(run: _Run) -> tuple[np.ndarray, np.ndarray] | None:
    """Which models pretrain, when several pretrain alike: the same seed (stage keys)
    and the same pretraining values (``HParams.pretraining``).

    Returns the models to pretrain (the first of each distinct kind, padded to a
    multiple of the mesh's ``"models"`` axis) and each model's index among them
    (``[models]``); or None when sharing would save nothing (one model, or all
    distinct)."""
    if run.models is None:
        return None
    keys = np.asarray(run.keys).swapaxes(0, 1).reshape(run.models, -1)
    kinds = np.concatenate([keys.astype(np.float64), pretraining_rows(run.hp)], 1)
    _, firsts, index = np.unique(kinds, axis=0, return_index=True, return_inverse=True)
    mesh = run.common["mesh"]
    spread = 1 if mesh is None else axis_size(mesh, MODEL_AXIS)
    firsts = np.concatenate([firsts, firsts[:1].repeat(-len(firsts) % spread)])
    return None if len(firsts) >= run.models else (firsts, index.ravel())


def _subset(run: _Run, models: np.ndarray) -> _Run:
    """``run`` restricted to ``models`` (indices of its models)."""
    return replace(
        run,
        configs=[run.configs[i] for i in models],
        keys=run.keys[:, models],
        models=len(models),
        hp=jax.tree.map(lambda v: v[models], run.hp),
        common=run.common | {"models": len(models)},
    )


def _train_softmax(
    run: _Run, layers: list[FrozenLayer], top_codes: jax.Array
) -> tuple[Params, StageRecord]:
    """The softmax-only stage on the top code of the frozen stack."""
    config, models = run.configs[0], bool(run.models)
    head = softmax_head(config)
    judge_codes = None
    if run.judge is not None:
        judge_codes = encode_dataset(layers, run.judge[0], config.eval_batch_size, models)
    stage = Stage(
        "softmax",
        classifier_loss(head, config.softmax_weight_decay),
        config.softmax_optimizer,
        config.softmax_epochs,
        config.batch_size,
        learning_rate=run.hp.softmax_learning_rate,
        evaluate_fn=run.accuracy(head, judge_codes),
        **run.selection(),
    )
    params, softmax_key = split_init(head, run.keys[-2], head.in_features)
    assert run.train is not None  # placed by _placed
    data, data_axis = (top_codes, run.train[1]), (0, None) if models else None
    return run_stage(stage, params, data, key=softmax_key, data_axis=data_axis, **run.placement)


def _finetune(run: _Run, start: Params) -> tuple[Params, StageRecord]:
    """End-to-end fine-tuning of the whole stack from ``start`` (with dropout when a
    model's keep probabilities ask for it), judged after every epoch."""
    config = run.configs[0]
    model = classifier(config)
    stage = Stage(
        "finetune",
        classifier_loss(model, config.finetune_weight_decay, dropout=uses_dropout(run.configs)),
        config.finetune_optimizer,
        config.finetune_epochs,
        config.batch_size,
        hparams=run.hp.dropout,
        learning_rate=run.hp.finetune_learning_rate,
        evaluate_fn=run.accuracy(model, None if run.judge is None else run.judge[0]),
        patience=config.finetune_patience if run.validation else None,
        **run.selection(),
    )
    assert run.train is not None  # placed by _placed
    return run_stage(stage, start, run.train, key=run.keys[-1], **run.placement)


def _evaluate_test(
    run: _Run, layers: list[FrozenLayer], head_params: Params | None, params: Params
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The test metrics of the fine-tuned classifier, and (with a validation split
    and pretraining) of the softmax on the frozen features before fine-tuning."""
    if run.test is None:
        return {}, {}
    config, models = run.configs[0], run.models is not None
    x, y = run.test
    batch = config.eval_batch_size
    metrics = evaluate(classifier(config), params, x, y, batch, models)
    if run.validation is None or head_params is None:
        return metrics, {}
    codes = encode_dataset(layers, x, batch, models)
    return metrics, evaluate(softmax_head(config), head_params, codes, y, batch, models)
