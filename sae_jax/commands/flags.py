"""The flags that the commands share: the platform, the data, the config and its
``--config.<field>=<value>`` overrides, a run's own flags; ``start`` turns them into
a checked ``Config``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar

from sae_jax.commands.exits import select
from sae_jax.config import Config
from sae_jax.config.files import apply_overrides, load_config
from sae_jax.config.presets import PRESETS
from sae_jax.errors import ConfigError

if TYPE_CHECKING:
    from sae_jax.data import DataSpec

T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


class Parser(OneLineParser):
    """A ``OneLineParser`` which collects ``--config.<dotted.field>=<value>`` overrides
    (also ``--config.<field> <value>``), in order, into ``config_overrides``: a list of
    ``(field, value)``."""

    def parse_args(  # type: ignore[override]  # typeshed overloads it on namespace's type
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        flags, rest = self.parse_known_args(args, namespace)
        overrides, unknown = [], []
        takes_overrides = "--config" in self._option_string_actions
        while rest:
            arg = rest.pop(0)
            if not (takes_overrides and arg.startswith("--config.")):
                unknown.append(arg)
                continue
            name, equals, value = arg[len("--config.") :].partition("=")
            if not equals:
                if not rest or rest[0].startswith("--"):
                    self.error(f"{arg}: give a value, e.g. {arg}=2")
                value = rest.pop(0)
            overrides.append((name, value))
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        flags.config_overrides = overrides
        return flags


def parser(description: str | None, training: bool = True, prog: str | None = None) -> Parser:
    """A ``Parser`` named ``prog`` (in usage lines; default: the script's name) with the
    flags the commands share: the platform, the data, the compilation cache and, with
    ``training``, the config and a run's own flags."""
    p = Parser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--platform",
        default="auto",
        help="auto, cpu, gpu or tpu (default: auto, the first of tpu, gpu and cpu that JAX finds)",
    )
    if training:
        _config_flags(p)
    _data_flags(p)
    p.add_argument(
        "--compilation_cache",
        default=None,
        help="folder for compiled programs, reused by later runs; 'off' disables it "
        "(default: <cache>/jax, <cache> as for --cache_dir)",
    )
    if training:
        _run_flags(p)
    return p


def _config_flags(p: Parser) -> None:
    p.add_argument(
        "--config",
        default="seed",
        help=f"a preset ({', '.join(PRESETS)}; see sae_jax/config/presets.py), a run's "
        "config.json, or a Python file defining get_config(); then "
        "--config.<field>=<value> overrides any field, e.g. --config.layers.0.beta=2 "
        "(default: seed)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs for every stage; a stage the preset skips stays skipped "
        "(default: the preset's)",
    )
    p.add_argument(
        "--finetune_lr",
        type=float,
        default=None,
        help="fine-tuning learning rate (default: the preset's)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")


def _data_flags(p: Parser) -> None:
    p.add_argument(
        "--dataset",
        default="mnist",
        help="mnist, fashion_mnist or kmnist (the same IDX format, each verified against "
        "its published sha256); with --data_source=tfds any tensorflow-datasets image "
        "dataset (default: mnist)",
    )
    p.add_argument(
        "--data_source",
        default="auto",
        help="auto, idx, download, tfds or sample (default: auto, which takes --data_dir "
        "if it holds the files, the bundled sample if the preset fits in it, the "
        "download cache, a prepared tensorflow-datasets copy, then a download)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="your own data instead of MNIST: an .npz (arrays x, optional y, x_test, "
        "y_test), an .npy (x only) or a .csv (one example a row); without labels the run "
        "only pretrains (default: none)",
    )
    p.add_argument(
        "--label_column",
        default=None,
        help="with --data=FILE.csv: the column holding the labels, by header name or "
        "0-based index (default: no labels)",
    )
    p.add_argument(
        "--standardize",
        action="store_true",
        help="standardize every input feature with the training split's mean and std, "
        "saved in the run; needs layers.0.decoder_activation=linear (default: inputs as "
        "they are: uint8 pixels, or floats in [0, 1])",
    )
    p.add_argument(
        "--data_dir",
        default=None,
        help="folder with the dataset's four IDX files, .gz or raw; for tfds its data "
        "folder (default: none)",
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="download cache (default: $SAE_JAX_CACHE_DIR, else ~/.cache/sae_jax)",
    )
    p.add_argument(
        "--mirror",
        default=None,
        help="base URL to download the dataset from (default: the tensorflow-datasets "
        "mirror; for MNIST $SAE_JAX_MNIST_MIRROR first)",
    )
    p.add_argument(
        "--no_verify",
        action="store_true",
        help="skip the check against the dataset's published sha256, for your own data "
        "in IDX format (default: check)",
    )


def _run_flags(p: Parser) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another run is using --workdir, wait for it to end (default: refuse)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host run before anything else (default: one host)",
    )
    p.add_argument(
        "--coordinator_address",
        default=None,
        help="with --distributed: host:port of process 0 (default: found by JAX on Cloud "
        "TPU, SLURM and Open MPI)",
    )
    p.add_argument(
        "--num_processes",
        type=int,
        default=None,
        help="with --distributed: how many processes (default: found by JAX)",
    )
    p.add_argument(
        "--process_id",
        type=int,
        default=None,
        help="with --distributed: this process's index (default: found by JAX)",
    )
    p.add_argument(
        "--distributed_timeout",
        type=int,
        default=100,
        help="with --distributed: seconds to wait for the other processes at the start, "
        "and for a process that stopped answering before all stop (default: 100)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="with --distributed: every process prints its progress, not only process 0 "
        "(default: off)",
    )


def checkpoint_flags(p: Parser) -> None:
    """``--restart`` and ``--checkpoint_every``, for a command that trains with
    checkpoints in ``--workdir``."""
    from sae_jax.files import CHECKPOINT_EVERY

    p.add_argument(
        "--restart",
        action="store_true",
        help="discard the run saved in --workdir and start over (default: resume it)",
    )
    p.add_argument(
        "--checkpoint_every",
        type=_seconds,
        default=CHECKPOINT_EVERY,
        metavar="SECONDS",
        help="save an epoch checkpoint when at least SECONDS have passed since the last "
        "one (0: every epoch); the end of every stage is always saved, and so is the epoch "
        "in progress on Ctrl-C or SIGTERM. Saves run in the background (default: "
        f"{CHECKPOINT_EVERY:g}, as measured: a seed-sized save is up to 1.6 s of background "
        "work on 2 CPU cores, a few percent of a minute, and a SIGKILL loses at most a "
        "minute of training; with 0, epochs shorter than a save wait for it)",
    )


def _seconds(text: str) -> float:
    """A number of seconds >= 0 (``inf``: only the ends of stages and signals)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text!r}")
    return value


def data_spec(flags: argparse.Namespace) -> DataSpec:
    """The ``DataSpec`` that the data flags describe, or (where they name MNIST by
    default) the data of the run whose ``config.json`` ``start`` loaded."""
    from sae_jax.data import DataSpec

    return DataSpec(
        source=flags.data_source,
        data_dir=flags.data_dir,
        cache_dir=flags.cache_dir,
        mirror=flags.mirror,
        verify=not flags.no_verify,
        path=flags.data,
        label_column=flags.label_column,
        standardize=flags.standardize,
        dataset=flags.dataset,
    ).with_run_options(getattr(flags, "saved_data", {}))


def checked(flag: str, check: Callable[[], T]) -> T:
    """``check()``, with a ``ConfigError`` turned into a ``UserError`` naming ``flag``.

    ``flag`` is what the user wrote, e.g. ``--seed=-1``; the message keeps the
    field's name too: ``--seed=-1: seed must be an integer in [0, 4294967296)...``.
    """
    from sae_jax.errors import UserError

    try:
        return check()
    except ConfigError as e:
        raise UserError(f"{flag}: {e}") from None


def seed_list(flags: argparse.Namespace, config: Config) -> list[int]:
    """``--seeds=N`` as the seeds S, S+1, ..., S+N-1, S being the config's seed (what
    ``--seed`` set); each checked, the message naming the flags."""
    from sae_jax.errors import UserError

    if flags.seeds < 1:
        raise UserError(f"--seeds={flags.seeds}: must be >= 1")
    last = config.seed + flags.seeds - 1
    flag = f"--seeds={flags.seeds}"
    if flags.seed is not None:
        flag = f"--seed={flags.seed} {flag}"
    checked(flag, config.replace(seed=last).validate)
    return list(range(config.seed, last + 1))


def start(flags: argparse.Namespace) -> Config:
    """``select``, then return the config named by ``--config`` (a preset or a file) with
    the ``--config.<field>`` overrides, ``--seed``, ``--epochs`` and ``--finetune_lr``
    applied, each checked by ``Config.validate``. A run's ``config.json`` also brings back
    that run's ``--no_pretraining`` and own data (unless ``--data`` names other data)."""
    select(flags)
    config, options = load_config(flags.config)  # errors name the file or the preset
    if options.get("pretrain") is False and hasattr(flags, "no_pretraining"):
        flags.no_pretraining = True  # the config.json of a --no_pretraining run
    flags.saved_data = options.get("data", {})  # and its data, see data_spec
    config = apply_overrides(config, flags.config_overrides)  # errors name the override
    if flags.seed is not None:
        flag = f"--seed={flags.seed}"
        config = checked(flag, lambda: config.replace(seed=flags.seed).validate())
    if flags.epochs is not None:
        flag = f"--epochs={flags.epochs}"
        config = checked(flag, lambda: config.with_epochs(flags.epochs).validate())
    if flags.finetune_lr is not None:
        flag = f"--finetune_lr={flags.finetune_lr}"
        optimizer = dataclasses.replace(config.finetune_optimizer, learning_rate=flags.finetune_lr)
        config = checked(flag, lambda: config.replace(finetune_optimizer=optimizer).validate())
    return config
