"""Flags and error handling shared by the scripts in ``experiments/``.

The scripts only declare their own flags and call one library function;
``run_command`` turns user mistakes into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from sae_jax.config import PRESETS, Config, ConfigError, get_preset

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")


def parser(description: str | None) -> Parser:
    """A ``Parser`` with the flags every experiment shares (platform, preset, data)."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", default="cpu", help="cpu, gpu or tpu (default cpu)")
    p.add_argument(
        "--config",
        default="seed",
        help=f"preset name: {', '.join(PRESETS)} (default seed; see sae_jax/config.py)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override every stage's epochs (a stage the preset skips stays skipped)",
    )
    p.add_argument(
        "--finetune_lr",
        type=float,
        default=None,
        help="override the fine-tuning learning rate (default: the preset's)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    p.add_argument(
        "--data_source",
        default="auto",
        help="auto, idx, download, tfds or sample (default auto: --data_dir if it holds the "
        "files, the bundled sample if the preset fits in it, the cache, a prepared "
        "tensorflow-datasets copy, then a download)",
    )
    p.add_argument(
        "--data_dir",
        default=None,
        help="folder with the four MNIST IDX files, .gz or raw (for tfds: its data folder)",
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="download cache root (default $SAE_JAX_CACHE_DIR, else ~/.cache/sae_jax)",
    )
    p.add_argument(
        "--mirror",
        default=None,
        help="base URL to download from (default $SAE_JAX_MNIST_MIRROR, else the "
        "tensorflow-datasets mirror)",
    )
    p.add_argument(
        "--no_verify",
        action="store_true",
        help="skip the canonical sha256 check, for your own data in IDX format",
    )
    p.add_argument(
        "--compilation_cache",
        default=None,
        help="folder for compiled programs, reused by later runs (default "
        "<cache root>/jax; 'off' to disable)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host run (jax.distributed.initialize) before anything else",
    )
    p.add_argument("--coordinator_address", default=None, help="with --distributed: host:port")
    p.add_argument("--num_processes", type=int, default=None, help="with --distributed")
    p.add_argument("--process_id", type=int, default=None, help="with --distributed")
    return p


def data_spec(flags: argparse.Namespace):
    """The ``DataSpec`` that the data flags describe."""
    from sae_jax.data import DataSpec

    return DataSpec(
        source=flags.data_source,
        data_dir=flags.data_dir,
        cache_dir=flags.cache_dir,
        mirror=flags.mirror,
        verify=not flags.no_verify,
    )


def checked(flag: str, check: Callable[[], T]) -> T:
    """``check()``, with a ``ConfigError`` turned into a ``UserError`` naming ``flag``.

    ``flag`` is what the user wrote, e.g. ``--seed=-1``; the message keeps the
    field's name too: ``--seed=-1: seed must be an integer in [0, 4294967296)...``.
    """
    from sae_jax.experiment import UserError

    try:
        return check()
    except ConfigError as e:
        raise UserError(f"{flag}: {e}") from None


def start(flags: argparse.Namespace) -> Config:
    """Select the platform (joining a multi-host run first with ``--distributed``) and
    return the preset named by ``--config`` with ``--seed``, ``--epochs`` and
    ``--finetune_lr`` applied, each checked by ``Config.validate``."""
    from sae_jax.experiment import enable_compilation_cache, select_platform

    distributed = None
    if flags.distributed:
        distributed = {
            "coordinator_address": flags.coordinator_address,
            "num_processes": flags.num_processes,
            "process_id": flags.process_id,
        }
    select_platform(flags.platform, distributed)
    if flags.compilation_cache != "off":
        enable_compilation_cache(flags.compilation_cache)
    config = get_preset(flags.config)
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


def run_command(body: Callable[[], Any]) -> int:
    """Run ``body``; map user mistakes to exit status 2 and a NaN loss to 1, one line each."""
    from sae_jax.checkpoint import CheckpointError
    from sae_jax.config import ConfigError
    from sae_jax.data import DataError
    from sae_jax.engine import NonFiniteLossError
    from sae_jax.experiment import UserError

    try:
        body()
    except (ConfigError, DataError, UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def log(line: str) -> None:
    """Print one progress line at once (also through a pipe)."""
    print(line, flush=True)
