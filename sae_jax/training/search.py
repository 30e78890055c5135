"""Searches that choose a config on a validation split: a grid or N random points of
a search space, grouped by the shape of their models into vmapped sweeps in which
every model keeps its best fine-tuning epoch and stops on its own patience; the
points are ranked by mean validation accuracy over seeds and the chosen one alone is
evaluated on the test set, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh

from sae_jax.config import Config
from sae_jax.errors import ConfigError
from sae_jax.models import classifier
from sae_jax.parallel import default_mesh
from sae_jax.training.evaluate import evaluate
from sae_jax.training.hparams import (
    PRETRAINING_NAMES as PRETRAINING_HPARAMS,
)
from sae_jax.training.hparams import SWEEP_NAMES, check_used, structure, with_values
from sae_jax.training.loop import Params
from sae_jax.training.pipeline import PipelineResult, run_pipeline
from sae_jax.training.stage import StageCallback
from sae_jax.training.sweep import grid

# Fields that change the models' shapes or loop lengths: one compiled program each.
SHAPE_NAMES = ("features", "pretrain_epochs")
SEARCH_NAMES = (*SWEEP_NAMES, *SHAPE_NAMES)
# What only pretraining uses: left out of a no-pretraining search.
PRETRAINING_NAMES = (*PRETRAINING_HPARAMS, "pretrain_epochs")

Split = tuple[jax.Array, jax.Array]


@dataclass(frozen=True)
class Range:
    """An interval ``[low, high]`` that random search draws from: uniformly, or
    log-uniformly with ``log`` (learning rates); ``integer`` rounds the draw."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def draw(self, rng: np.random.Generator) -> float:
        """One value from the interval."""
        if self.log:
            value = float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        else:
            value = float(rng.uniform(self.low, self.high))
        return float(round(value)) if self.integer else value


Space = dict[str, "list[float] | Range"]


def search_points(space: Space, points: int | None = None, seed: int = 0) -> list[dict[str, float]]:
    """The points of a search: every combination of ``space``'s lists (``points``
    None, as ``grid``: the first name varying slowest), or ``points`` random draws,
    each name independently: a ``Range`` by its ``draw``, a list uniformly.

    Raises:
      ConfigError: for a name not in ``SEARCH_NAMES``, an empty list, a ``Range``
        with ``low > high`` (or ``low <= 0`` with ``log``), or a ``Range`` in a grid.
    """
    for name, values in space.items():
        if name not in SEARCH_NAMES:
            raise ConfigError(f"cannot search {name!r}; choose from {', '.join(SEARCH_NAMES)}")
        if isinstance(values, Range):
            if values.low > values.high or (values.log and values.low <= 0):
                raise ConfigError(f"{name}: bad range {values.low}..{values.high}")
            if points is None:
                raise ConfigError(f"{name}: a range needs random points, not a grid")
        elif not values:
            raise ConfigError(f"{name}: no values to search")
    if points is None:
        # (no Range here: a range without points raised above)
        lists = {k: list(v) for k, v in space.items() if not isinstance(v, Range)}
        return grid([0], lists)[2]
    rng = np.random.default_rng(seed)
    draw = lambda v: v.draw(rng) if isinstance(v, Range) else float(v[rng.integers(len(v))])
    return [{name: draw(values) for name, values in space.items()} for _ in range(points)]


def point_config(config: Config, point: dict[str, float]) -> Config:
    """``config`` with every value of a search point applied (for every layer)."""
    layers = config.layers
    if "features" in point:
        layers = tuple(dataclasses.replace(la, features=int(point["features"])) for la in layers)
    if "pretrain_epochs" in point:
        epochs = int(point["pretrain_epochs"])
        layers = tuple(dataclasses.replace(la, epochs=epochs) for la in layers)
    swept = {k: v for k, v in point.items() if k in SWEEP_NAMES}
    return with_values(config.replace(layers=layers), swept)


def checked_points(
    config: Config,
    space: Space,
    points: int | None = None,
    seed: int = 0,
    num_train: int | None = None,
) -> list[dict[str, float]]:
    """``search_points(space, points, seed)``, each point's config validated (against
    ``num_train`` training examples when given); ``ConfigError`` names the point."""
    candidates = search_points(space, points, seed)
    configs = []
    for point in candidates:
        try:
            configs.append(point_config(config, point).validate(num_train))
        except ConfigError as e:
            raise ConfigError(f"search point {point}: {e}") from None
    check_used(configs, [name for name in space if name in SWEEP_NAMES])
    return candidates


@dataclass
class SearchResult:
    """What ``search`` returns.

    ``points``: one dict per point, in search order: ``{"point", "seeds",
    "validation_accuracy" (per seed, at its best epoch), "best_epoch" (per seed),
    "validation_mean", "validation_std", "epochs_trained" (per seed)}``.
    ``ranking``: point indices by mean validation accuracy, best first; ``chosen``
    is ``ranking[0]``.
    ``test_accuracy``: the chosen point's models on the test set, one per seed.
    """

    points: list[dict[str, Any]]
    ranking: list[int]
    chosen: int
    config: Config  # the chosen point's config
    test_accuracy: list[float]
    params: Params  # the chosen point's fine-tuned classifiers, one per seed


def search(
    config: Config,
    train: Split,
    validation: Split,
    test: Split | None,
    space: Space,
    *,
    seeds: list[int],
    points: int | None = None,
    sample_seed: int = 0,
    pretrain: bool = True,
    on_epoch: StageCallback | None = None,
    on_group: Callable[[dict[str, float], int], None] | None = None,
    mesh: Mesh | Literal["all"] | None = "all",
) -> SearchResult:
    """Choose a config on ``validation``: every point of ``space`` times ``seeds``.

    The points (``search_points(space, points, sample_seed)``) are grouped by the
    values of ``SHAPE_NAMES`` they set; each group trains as one ``run_pipeline``
    sweep, every model keeping its own best fine-tuning epoch on ``validation``
    and stopping on its own ``config.finetune_patience``. Points are ranked by
    their mean validation accuracy over ``seeds``; the test set is then evaluated
    once, for the chosen point's models only.

    Args:
      config: the base config; ``finetune_patience`` None trains every model for
        ``finetune_epochs`` and keeps its best epoch.
      train, validation, test: images ``[n, input_features]`` and labels ``[n]``.
      space: ``{name: [values] or Range}``, names from ``SEARCH_NAMES``.
      seeds: the seeds of every point.
      points: None for the grid of ``space``'s lists, else this many random points.
      pretrain: False: the no-pretraining baseline (no pretraining, no softmax stage).
      on_epoch: as for ``run_pipeline`` (metrics are per model).
      on_group: ``on_group(shape, models)`` before each group trains.
      mesh: ``"all"`` (default) spreads each group's models over every device.

    Raises:
      ConfigError: before anything trains, for a bad space or a point whose config
        does not validate (the message names the point).
    """
    candidates = checked_points(config, space, points, sample_seed, len(train[0]))
    groups: dict[Config, list[int]] = {}
    for i, point in enumerate(candidates):
        groups.setdefault(structure(point_config(config, point)), []).append(i)
    rows: list[dict[str, Any]] = [{} for _ in candidates]
    best: tuple[float, int, Params] | None = None
    for members in groups.values():
        models = [
            point_config(config, candidates[i]).replace(seed=s) for i in members for s in seeds
        ]
        if on_group is not None:
            shape = {
                k: candidates[members[0]][k] for k in SHAPE_NAMES if k in candidates[members[0]]
            }
            on_group(shape, len(models))
        batch = models[0].batch_size
        group_mesh = default_mesh(models=len(models), batch_size=batch) if mesh == "all" else mesh
        result = run_pipeline(
            models, train, validation=validation, pretrain=pretrain, on_epoch=on_epoch,
            mesh=group_mesh,
        )  # fmt: skip
        for k, i in enumerate(members):
            rows[i] = _point_row(candidates[i], seeds, result, k)
            if best is None or (-rows[i]["validation_mean"], i) < (-best[0], best[1]):
                own = slice(k * len(seeds), (k + 1) * len(seeds))
                chosen_params = jax.tree.map(lambda a, m=own: a[m], result.params)
                best = (rows[i]["validation_mean"], i, chosen_params)
        del result
    ranking = sorted(range(len(rows)), key=lambda i: -rows[i]["validation_mean"])
    chosen = ranking[0]
    assert best is not None  # set by the chosen point
    params = best[2]
    chosen_config = point_config(config, candidates[chosen])
    accuracy: list[float] = []
    if test is not None:  # the only look at the test set
        accuracy = evaluate(
            classifier(chosen_config), params, *test, config.eval_batch_size, models=True
        )["accuracy"]
    return SearchResult(rows, ranking, chosen, chosen_config, accuracy, params)


def _point_row(
    point: dict[str, float], seeds: list[int], result: PipelineResult, k: int
) -> dict[str, Any]:
    """The validation results of point ``k`` of a group (its ``len(seeds)`` models):
    each model's best fine-tuning epoch and its accuracy there (0 with none), the
    epochs it trained, and the stage it diverged in (None: it did not)."""
    finetune = result.stages[-1]
    # A sweep's record: an epoch and a count per model.
    assert isinstance(finetune.best_epoch, list) and finetune.epochs_trained is not None
    models = range(k * len(seeds), (k + 1) * len(seeds))
    best_epochs = [int(finetune.best_epoch[m]) for m in models]
    accuracy = [
        float(finetune.history[e - 1]["validation_accuracy"][m]) if e else 0.0
        for e, m in zip(best_epochs, models, strict=True)
    ]
    diverged = result.diverged()
    return {
        "point": dict(point),
        "seeds": list(seeds),
        "validation_accuracy": accuracy,
        "best_epoch": best_epochs,
        "validation_mean": float(np.mean(accuracy)),
        "validation_std": float(np.std(accuracy, ddof=1)) if len(seeds) > 1 else 0.0,
        "epochs_trained": [int(finetune.epochs_trained[m]) for m in models],
        "diverged": [diverged[m] for m in models],
    }
