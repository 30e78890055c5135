"""Flags and error handling shared by the scripts in ``experiments/``.

The scripts only declare their own flags and call one library function;
``run_command`` turns user mistakes into one line on stderr and exit status 2,
and every other way a run can end early (a full disk, a NaN loss, SIGINT or SIGTERM)
into one line and its own status.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
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
    p.add_argument("--platform", default="cpu", help="cpu, gpu or tpu (default: cpu)")
    p.add_argument(
        "--config",
        default="seed",
        help=f"preset: {', '.join(PRESETS)} (default: seed; see sae_jax/config.py)",
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
    p.add_argument(
        "--data_source",
        default="auto",
        help="auto, idx, download, tfds or sample (default: auto, which takes --data_dir "
        "if it holds the files, the bundled sample if the preset fits in it, the "
        "download cache, a prepared tensorflow-datasets copy, then a download)",
    )
    p.add_argument(
        "--data_dir",
        default=None,
        help="folder with the four MNIST IDX files, .gz or raw; for tfds its data folder "
        "(default: none)",
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="download cache (default: $SAE_JAX_CACHE_DIR, else ~/.cache/sae_jax)",
    )
    p.add_argument(
        "--mirror",
        default=None,
        help="base URL to download MNIST from (default: $SAE_JAX_MNIST_MIRROR, else the "
        "tensorflow-datasets mirror)",
    )
    p.add_argument(
        "--no_verify",
        action="store_true",
        help="skip the check against canonical MNIST's sha256, for your own data in IDX "
        "format (default: check)",
    )
    p.add_argument(
        "--compilation_cache",
        default=None,
        help="folder for compiled programs, reused by later runs; 'off' disables it "
        "(default: <cache>/jax, <cache> as for --cache_dir)",
    )
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
    """Run ``body`` and say in one line on stderr why it ended early, if it did.

    Exit status: 2 for the user's mistakes (a flag, a path, damaged data or run
    files), 1 for a NaN loss or an OS error while writing (a full disk: what was saved
    before stays valid), 128 + the signal's number when SIGINT or SIGTERM stopped it.
    """
    from sae_jax.config import ConfigError
    from sae_jax.data import DataError
    from sae_jax.engine import NonFiniteLossError
    from sae_jax.experiment import UserError
    from sae_jax.files import RESUME, CheckpointError, os_error_line, stop_on_sigterm

    stop_on_sigterm()
    # Storage libraries log their failures from worker threads and abandoned tasks;
    # the failure is reported once, below.
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        body()
        return 0
    except (ConfigError, DataError, UserError, CheckpointError) as e:
        message, status = str(e), 2
    except NonFiniteLossError as e:
        message, status = str(e), 1
    except OSError as e:
        message, status = os_error_line(e), 1
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        message = str(e) or f"stopped by SIGINT; {RESUME}"
        status = 128 + signum
    print(f"error: {message}", file=sys.stderr)
    return status


def log(line: str) -> None:
    """Print one progress line at once (also through a pipe)."""
    print(line, flush=True)
