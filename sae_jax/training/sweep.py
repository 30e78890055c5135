"""Many models in one compiled program: ``sweep`` trains a list of models (one seed
and one set of hyperparameter values each) as one ``vmap``-ed program per stage;
``grid`` expands every combination of values times seeds; ``model_config`` (from
``sae_jax.training.hparams``) is the config of one of them alone.
"""

from __future__ import annotations

import itertools

import jax
from jax.sharding import Mesh

from sae_jax.config import Config
from sae_jax.parallel import default_mesh
from sae_jax.training.hparams import check_models, model_config
from sae_jax.training.pipeline import PipelineResult, run_pipeline
from sae_jax.training.stage import StageCallback

__all__ = ["grid", "model_config", "sweep"]


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
    hyperparameters (``hparams``: lists of per-model values of ``SWEEP_NAMES``;
    ``grid`` makes them for every combination of values with every seed), the same
    validation split when ``config.validation_examples`` holds one out, its own best
    epoch and patience. Metrics and test results are lists with one value per model.

    ``mesh`` (default ``"all"``: ``parallel.default_mesh``, over every device of every
    process when there are several and the batch divides over them, else None)
    spreads the models over its ``"models"`` axis, each device training its share
    without talking to the others, and splits every minibatch over its ``"data"`` axis.

    Raises:
      ConfigError: for a model whose config does not validate, or a swept name that
        changes nothing (see ``hparams.check_models``).
    """
    if isinstance(mesh, str):
        if mesh != "all":
            raise ValueError(f"mesh={mesh!r}: pass a Mesh, None or 'all'")
        mesh = default_mesh(models=len(seeds), batch_size=config.batch_size)
    models = check_models(config, list(seeds), hparams)
    return run_pipeline(models, train, test, pretrain=pretrain, on_epoch=on_epoch, mesh=mesh)


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
