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
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

from sae_jax.config import Config, ConfigError
from sae_jax.config_files import apply_overrides, load_config
from sae_jax.presets import PRESETS

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit status 2, and which
    collects ``--config.<dotted.field>=<value>`` overrides (also ``--config.<field>
    <value>``), in order, into ``config_overrides``: a list of ``(field, value)``."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
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


def parser(description: str | None, training: bool = True) -> Parser:
    """A ``Parser`` with the flags the experiments share: the platform, the data, the
    compilation cache and, with ``training``, the config and a run's own flags."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", default="cpu", help="cpu, gpu or tpu (default: cpu)")
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
        help=f"a preset ({', '.join(PRESETS)}; see sae_jax/presets.py), a run's config.json, "
        "or a Python file defining get_config(); then --config.<field>=<value> overrides "
        "any field, e.g. --config.layers.0.beta=2 (default: seed)",
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


def data_spec(flags: argparse.Namespace):
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
    from sae_jax.experiment import UserError

    try:
        return check()
    except ConfigError as e:
        raise UserError(f"{flag}: {e}") from None


def seed_list(flags: argparse.Namespace, config: Config) -> list[int]:
    """``--seeds=N`` as the seeds S, S+1, ..., S+N-1, S being the config's seed (what
    ``--seed`` set); each checked, the message naming the flags."""
    from sae_jax.experiment import UserError

    if flags.seeds < 1:
        raise UserError(f"--seeds={flags.seeds}: must be >= 1")
    last = config.seed + flags.seeds - 1
    flag = f"--seeds={flags.seeds}"
    if flags.seed is not None:
        flag = f"--seed={flags.seed} {flag}"
    checked(flag, config.replace(seed=last).validate)
    return list(range(config.seed, last + 1))


def select(flags: argparse.Namespace) -> None:
    """Select the platform (joining a multi-host run first with ``--distributed``) and
    the compilation cache, as the flags say."""
    from sae_jax.experiment import UserError, enable_compilation_cache, select_platform
    from sae_jax.parallel import is_primary

    distributed = None
    if getattr(flags, "distributed", False):
        if flags.distributed_timeout < 1:
            raise UserError(f"--distributed_timeout={flags.distributed_timeout}: must be >= 1")
        distributed = {
            "coordinator_address": flags.coordinator_address,
            "num_processes": flags.num_processes,
            "process_id": flags.process_id,
            "timeout_s": flags.distributed_timeout,
        }
        _runtime_aborts_in_one_line(flags.distributed_timeout)
    select_platform(flags.platform, distributed)
    global _quiet
    _quiet = not (is_primary() or getattr(flags, "verbose", False))
    if flags.compilation_cache != "off":
        enable_compilation_cache(flags.compilation_cache)


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


# Reads this process's stderr (fd 2) from a pipe and passes it on, unless JAX's
# distributed runtime aborts the process: then its log lines and stack trace become one
# line. A separate process, so that it outlives the abort; it ignores SIGINT and SIGTERM
# (they are meant for the run) and ends when the run's end closes the pipe.
_STDERR_FILTER = r"""
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
fatal, line_format = sys.argv[1].encode(), sys.argv[2]
runtime_log = re.compile(rb"^[EWI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^ ]+:\d+\] ")
out, held, ended = sys.stderr.buffer, [], False
for line in sys.stdin.buffer:
    if ended:
        continue
    if fatal in line:  # JAX's "Terminating process ...": say it once, drop the rest
        status = line.partition(b"absl::Status: ")[2].decode(errors="replace").strip()
        out.write((line_format % (status[:200] or "no reason given") + "\n").encode())
        held, ended = [], True
    elif held or runtime_log.match(line):  # from the runtime's first log line on,
        held.append(line)  # the output waits: a fatal error may follow
    else:
        out.write(line)
    out.flush()
out.write(b"".join(held))
out.flush()
"""
RUNTIME_FATAL = "Terminating process because the JAX distributed service detected fatal errors"


def _runtime_aborts_in_one_line(timeout_s: int) -> None:
    """Route stderr through ``_STDERR_FILTER``: when JAX's distributed runtime ends this
    process (the coordinator is unreachable, or a process stopped answering for
    ``timeout_s`` seconds), the user reads one line instead of a C++ stack trace."""
    line = (
        f"error: the multi-process run failed (%s): the coordinator cannot be reached, or "
        f"a process stopped answering for {timeout_s} s (--distributed_timeout); "
        f"{RESUME_ALL}"
    )
    sys.stderr.flush()
    helper = subprocess.Popen(
        [sys.executable, "-c", _STDERR_FILTER, RUNTIME_FATAL, line],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C on the terminal is for the run only
    )
    os.dup2(helper.stdin.fileno(), 2)
    helper.stdin.close()


def run_command(body: Callable[[], Any]) -> int:
    """Run ``body`` and say in one line on stderr why it ended early, if it did.

    Exit status: 2 for the user's mistakes (a flag, a path, damaged data or run
    files), 1 for a NaN loss or an OS error while writing (a full disk: what was saved
    before stays valid), 128 + the signal's number when SIGINT or SIGTERM stopped it.
    In a run of several processes, 1 also when a collective operation failed because
    another process is gone; then (and after an OS error) the process ends at once,
    since JAX's shutdown would wait for the lost process.
    """
    from sae_jax.config import ConfigError
    from sae_jax.data import DataError
    from sae_jax.engine import NonFiniteLossError
    from sae_jax.experiment import UserError
    from sae_jax.files import (
        RESUME,
        CheckpointError,
        exception_line,
        os_error_line,
        stop_on_sigterm,
    )
    from sae_jax.tensorboard import TensorBoardUnavailable

    stop_on_sigterm()
    # Storage libraries log their failures from worker threads and abandoned tasks;
    # the failure is reported once, below.
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    leave = False
    try:
        body()
        return 0
    except (ConfigError, DataError, UserError, CheckpointError, TensorBoardUnavailable) as e:
        message, status = str(e), 2
    except NonFiniteLossError as e:
        message, status = str(e), 1
    except OSError as e:
        message, status = os_error_line(e), 1
        leave = _several_processes()  # another process may be gone: see below
    except _collective_errors() as e:  # only in a run of several processes
        message, status, leave = f"{PEER_LOST} ({exception_line(e)}); {RESUME_ALL}", 1, True
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        message = str(e) or f"stopped by SIGINT; {RESUME}"
        status = 128 + signum
    print(f"error: {message}", file=sys.stderr)
    if leave:
        # JAX's shutdown at exit would wait for the lost process, then abort with a
        # stack trace; what was saved is already on disk.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


PEER_LOST = "a collective operation failed: another process of the run stopped or is unreachable"
RESUME_ALL = "run the same command again in every process to resume"


def _several_processes() -> bool:
    """True in a run of several processes (without importing JAX where it is not)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.process_count() > 1


def _collective_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which a failed collective surfaces, in a run of several processes
    (none otherwise: an error of JAX in one process is a bug, with its traceback)."""
    if not _several_processes():
        return ()
    import jax

    return (jax.errors.JaxRuntimeError,)


_quiet = False  # set by ``start`` in the processes of a multi-process run but the first


def log(line: str) -> None:
    """Print one progress line at once (also through a pipe); nothing in a process
    other than process 0 of a multi-process run, unless ``--verbose``."""
    if not _quiet:
        print(line, flush=True)


def progress_stream() -> TextIO | None:
    """The terminal to draw progress bars on: stdout when it is one and this process
    prints (see ``log``), else None."""
    return sys.stdout if sys.stdout.isatty() and not _quiet else None
