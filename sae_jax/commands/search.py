"""Searches from the command line: choose a config on the validation split, then
test the chosen one once; the results go to ``search.json`` and ``search.md``.

``sae-jax search`` (``sae_jax.cli.search``) parses flags and calls ``run_search``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sae_jax.commands.prepare import hold_workdir, prepare
from sae_jax.config import Config
from sae_jax.config.files import config_to_json
from sae_jax.data import DEFAULT_DATA, DataSpec
from sae_jax.errors import ConfigError, UserError
from sae_jax.files import stopped, write_bytes_atomic
from sae_jax.parallel import is_primary
from sae_jax.training.pipeline import holdout
from sae_jax.training.search import (
    PRETRAINING_NAMES,
    SEARCH_NAMES,
    Range,
    Space,
    checked_points,
    search,
)
from sae_jax.workdir.summary import provenance, write_json_atomic

NO_RESUME = "a search keeps no checkpoints: the same command starts it over"


def parse_space(items: list[str]) -> Space:
    """``--space`` flags as a search space: ``NAME=V1,V2,...`` (values to choose
    from), ``NAME=LOW:HIGH`` (uniform), ``NAME=log:LOW:HIGH`` (log-uniform).

    Raises:
      ConfigError: naming the flag, for a bad name, value or repeated name.
    """
    space: Space = {}
    for item in items:
        name, _, text = item.partition("=")
        flag = f"--space={item}"
        if name not in SEARCH_NAMES:
            raise ConfigError(
                f"{flag}: cannot search {name!r}; choose from {', '.join(SEARCH_NAMES)}"
            )
        if name in space:
            raise ConfigError(f"{flag}: {name} is given twice")
        try:
            if ":" in text:
                parts = text.split(":")
                log = parts[0] == "log"
                low, high = (float(v) for v in parts[1 if log else 0 :])
                integer = name in ("features", "pretrain_epochs")
                space[name] = Range(low, high, log=log, integer=integer)
            else:
                space[name] = [float(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(
                f"{flag}: expected NAME=V1,V2,..., NAME=LOW:HIGH or NAME=log:LOW:HIGH"
            ) from None
    return space


def run_search(
    config: Config,
    workdir: str | os.PathLike[str],
    *,
    space: Space,
    seeds: list[int],
    points: int | None = None,
    sample_seed: int = 0,
    study: str | None = None,
    data: DataSpec = DEFAULT_DATA,
    wait: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Search ``space`` on the validation split (``config.validation_examples``),
    test the chosen config once; write ``search.json`` and ``search.md``.

    With ``study="pretraining"`` the same search (the same number of points, over
    the names that fine-tuning uses) also runs without pretraining, as the
    baseline. Returns what ``search.json`` holds.
    """
    if study not in (None, "pretraining"):
        raise UserError(f"--study={study}: the only study is 'pretraining'")
    if not config.validation_examples:
        raise UserError(
            "a search needs a validation split to choose on: set --config.validation_examples=N"
        )
    try:  # before the data loads
        checked_points(config, space, points, sample_seed)
    except ConfigError as e:
        raise ConfigError(f"--space: {e}") from None
    ready = prepare(config, workdir, data, log)
    workdir, config, dataset = ready.workdir, ready.config, ready.data
    if dataset.train_labels is None or dataset.test_labels is None:
        raise UserError(f"{data.path}: a search needs labels and a test split")
    train, validation = holdout(config, (dataset.train_images, dataset.train_labels))
    splits = train, validation, (dataset.test_images, dataset.test_labels)
    runs = []
    with hold_workdir(workdir, wait=wait, log=log):
        for pretrain in (True, False) if study == "pretraining" else (True,):
            used = (
                space
                if pretrain
                else {k: v for k, v in space.items() if k not in PRETRAINING_NAMES}
            )
            log(f"-- {'with' if pretrain else 'without'} pretraining: {len(seeds)} seeds")
            try:
                runs.append(
                    _search_run(config, splits, used, seeds, points, sample_seed, pretrain, log)
                )
            except KeyboardInterrupt as e:
                raise stopped(e, "during the search", NO_RESUME) from None
        summary = {
            "config": config_to_json(config),
            "space": {k: _space_json(v) for k, v in space.items()},
            "points": points,
            "sample_seed": sample_seed,
            "seeds": list(seeds),
            "runs": runs,
            "platform": jax.default_backend(),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            **provenance(dataset),
        }
        table = markdown(summary)
        if is_primary():
            write_json_atomic(workdir / "search.json", summary)
            write_bytes_atomic(workdir / "search.md", table.encode())
    for line in table.splitlines():
        log(line)
    return summary


def _space_json(values: list[float] | Range) -> Any:
    return (
        {"range": [values.low, values.high], "log": values.log}
        if isinstance(values, Range)
        else values
    )


def _search_run(config, splits, space, seeds, points, sample_seed, pretrain, log) -> dict[str, Any]:
    """One ``search``, timed, as JSON-ready data."""
    train, validation, test = splits
    start = time.perf_counter()

    def on_epoch(stage: str, epoch: int, metrics: dict[str, Any], seconds: float) -> None:
        line = f"{stage:<10} epoch {epoch:>3} mean loss {np.nanmean(metrics['loss']):.6g}"
        if "validation_accuracy" in metrics:
            line += f" best validation_accuracy {np.max(metrics['validation_accuracy']):.4f}"
        log(f"{line} {seconds:.2f}s")

    def on_group(shape: dict[str, float], models: int) -> None:
        log(f"{models} models at once{''.join(f', {k}={v:g}' for k, v in shape.items())}")

    result = search(
        config,
        train,
        validation,
        test,
        space,
        seeds=seeds,
        points=points,
        sample_seed=sample_seed,
        pretrain=pretrain,
        on_epoch=on_epoch,
        on_group=on_group,
    )
    return {
        "pretrain": pretrain,
        "points": result.points,
        "ranking": result.ranking,
        "chosen": result.chosen,
        "chosen_config": config_to_json(result.config),
        "test_accuracy": result.test_accuracy,
        "test_error_mean": float(1 - np.mean(result.test_accuracy)),
        "test_error_std": float(np.std(result.test_accuracy, ddof=1)) if len(seeds) > 1 else 0.0,
        "wall_s": time.perf_counter() - start,
    }


def markdown(summary: dict[str, Any]) -> str:
    """The ranking of every run as a markdown table, then each chosen point's test
    error per seed."""
    names = list(summary["space"])
    head = [
        "rank",
        "pretraining",
        *names,
        "validation accuracy % (mean ± sd)",
        "per seed",
        "best epochs",
    ]
    lines = [f"| {' | '.join(head)} |", "| --- " * len(head) + "|"]
    for run in summary["runs"]:
        for rank, i in enumerate(run["ranking"], 1):
            row = run["points"][i]
            cells = [str(rank), "yes" if run["pretrain"] else "no"]
            cells += [f"{row['point'][k]:.4g}" if k in row["point"] else "—" for k in names]
            cells.append(f"{100 * row['validation_mean']:.2f} ± {100 * row['validation_std']:.2f}")
            cells.append(" ".join(f"{100 * a:.2f}" for a in row["validation_accuracy"]))
            cells.append(" ".join(str(e) for e in row["best_epoch"]))
            lines.append(f"| {' | '.join(cells)} |")
    lines.append("")
    for run in summary["runs"]:
        chosen = run["points"][run["chosen"]]["point"]
        errors = " ".join(f"{100 * (1 - a):.2f}" for a in run["test_accuracy"])
        lines.append(
            f"{'with' if run['pretrain'] else 'without'} pretraining, chosen "
            f"{', '.join(f'{k}={v:.4g}' for k, v in chosen.items())}: test error "
            f"{100 * run['test_error_mean']:.2f} ± {100 * run['test_error_std']:.2f}% "
            f"(seeds {' '.join(map(str, summary['seeds']))}: {errors}), "
            f"search wall {run['wall_s']:.0f} s"
        )
    return "\n".join(lines) + "\n"
