"""How a command runs and ends: ``run_command`` turns user mistakes into one line on
stderr and exit status 2, and every other way a run can end early (a full disk, a NaN
loss, SIGINT or SIGTERM, a lost process) into one line and its own status; ``select``
picks the platform and joins a multi-process run; ``log`` prints in process 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TextIO


def select(flags: argparse.Namespace) -> None:
    """Select the platform (joining a multi-host run first with ``--distributed``) and
    the compilation cache, as the flags say."""
    from sae_jax.commands.prepare import enable_compilation_cache, select_platform
    from sae_jax.errors import UserError
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


# Reads this process's stderr (fd 2) from a pipe and passes it on, unless JAX's
# distributed runtime aborts the process: then its log lines and stack trace become one
# line. Whichever comes first, that line or the run's own "error: " line, is the only
# one: a lost process can make both happen. A separate process, so that it outlives the
# abort; it ignores SIGINT and SIGTERM (they are meant for the run) and ends when the
# run's end closes the pipe.
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
    elif line.startswith(b"error: "):  # the run's own one line came first: the rest is noise
        out.write(line)
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
    assert helper.stdin is not None  # stdin=PIPE
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
    from sae_jax.data import DataError
    from sae_jax.errors import CheckpointError, ConfigError, NonFiniteLossError, UserError
    from sae_jax.files import RESUME, exception_line, os_error_line, stop_on_sigterm
    from sae_jax.workdir.tensorboard import TensorBoardUnavailable

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
        if not _collective_failure(e):
            raise
        message, status, leave = f"{PEER_LOST} ({exception_line(e)}); {RESUME_ALL}", 1, True
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        message = str(e) or f"stopped by SIGINT; {RESUME}"
        status = 128 + signum
        # A signal that lands while XLA compiles leaves its threads running: the
        # interpreter's shutdown would crash under them (status 139). What the run saved
        # is on disk (the stack has unwound through every save and close).
        leave = True
    # One write: a line that the runtime's log threads cannot split.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    if leave:
        # After a lost process, JAX's shutdown at exit would wait for it, then abort
        # with a stack trace; what was saved is already on disk.
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

    return (jax.errors.JaxRuntimeError, ValueError)


def _collective_failure(e: BaseException) -> bool:
    """Whether ``e`` (of ``_collective_errors``) is a failed collective: JAX's runtime
    error, or the ``ValueError`` that a host-side gather (``process_allgather``)
    raises when gloo loses its peer."""
    import jax

    return isinstance(e, jax.errors.JaxRuntimeError) or "Gloo" in str(e)


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
