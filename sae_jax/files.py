"""Files a run writes: user paths, atomic writes, manifests, the workdir lock, and safe
points for signals.

An edge module of the standard library only: the checkpoint and experiment modules
build on it, and it imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sae_jax.errors import CheckpointError, Stopped, UserError

LOCK_NAME = "run.lock"
# Seconds between epoch checkpoints by default (see workdir.checkpoint.RunStore and
# --checkpoint_every).
CHECKPOINT_EVERY = 60.0


def read_json(path: Path, what: str = "file") -> Any:
    """The JSON data in ``path``; ``CheckpointError`` naming the file if it is unreadable."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{path}: the {what} is damaged (not JSON: {e})") from None


def file_manifest(directory: Path) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` for every file under ``directory``."""
    manifest = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            manifest[str(path.relative_to(directory))] = [path.stat().st_size, digest]
    return manifest


def manifest_path(workdir: Path, step_dir: Path) -> Path:
    """Where the manifest of the checkpoint ``step_dir`` (inside ``workdir``) lives."""
    return workdir / "manifests" / f"{step_dir.relative_to(workdir)}.json"


def manifest_problem(workdir: Path, step_dir: Path) -> str | None:
    """What is wrong with the checkpoint ``step_dir`` against its manifest, or None."""
    manifest = manifest_path(workdir, step_dir)
    if not manifest.exists():
        return "it has no manifest (the run stopped while saving it)"
    try:
        expected = read_json(manifest, "manifest")
    except CheckpointError as e:
        return str(e)
    if not isinstance(expected, dict):
        return f"{manifest}: the manifest is damaged (not a JSON object)"
    actual = file_manifest(step_dir)
    for name, entry in expected.items():
        if not (isinstance(entry, list) and len(entry) == 2):
            return f"{manifest}: the manifest is damaged (bad entry for {name})"
        size, digest = entry
        if name not in actual:
            return f"{name} is missing"
        if actual[name][0] != size:
            return f"{name} has {actual[name][0]} bytes, expected {size}"
        if actual[name][1] != digest:
            return f"{name} does not match its sha256"
    return None


# A URL's scheme, as a str or as pathlib leaves it ("gs://b/r" -> "gs:/b/r"); two
# letters at least, so that a Windows drive ("C:/") is not one.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def user_path(path: str | os.PathLike[str], flag: str | None = None) -> Path:
    """A path as the user gave it, made absolute: ``~`` expanded, relative to the
    current directory, ``..`` folded (symbolic links are kept). Orbax refuses relative
    paths, so every path a user gives goes through here once, where it enters the
    library.

    Raises:
      UserError: for a URL (``gs://``, ``s3://``, ...), which would otherwise become
        a local folder named after its scheme; the message names ``flag`` if given.
    """
    text = os.fspath(path)
    if url := _URL.match(text):
        raise UserError(
            f"{f'{flag}={text}' if flag else text}: a {url.group(1)}:// URL; sae_jax reads "
            f"and writes local paths only: mount the bucket (gcsfuse, s3fs) and give its "
            f"local path"
        )
    return Path(os.path.abspath(Path(text).expanduser()))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename, so a
    crash leaves either the old file or the new one, never half of it. The file gets
    the permissions of any new file (0644 under the usual umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk fails a write that names no file: name it
        Path(tmp).unlink(missing_ok=True)
        raise named(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode())


def named(e: OSError, path: str | os.PathLike[str]) -> OSError:
    """``e`` with ``path`` as its file name, where it names none (``write`` and
    ``fsync`` on a full disk say only "No space left on device")."""
    if e.filename:
        return e
    return type(e)(e.errno, e.strerror or str(e), os.fspath(path))


def os_error_line(e: OSError) -> str:
    """One line for an OS error: ``path: reason`` (``strerror`` where there is one)."""
    reason = e.strerror or str(e)
    return f"{e.filename}: {reason}" if e.filename else reason


def storage_error(what: str, e: BaseException) -> OSError:
    """An ``OSError`` saying that ``what`` failed, from whatever a storage library raised
    (tensorstore reports an OS error as text ending in ``[os_error_code='28']``)."""
    if isinstance(e, OSError):
        return OSError(e.errno, f"{what}: {os_error_line(e)}")
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code:
        return OSError(int(code.group(1)), f"{what}: {os.strerror(int(code.group(1)))}")
    return OSError(errno.EIO, f"{what}: {exception_line(e)}")


def exception_line(e: BaseException) -> str:
    """``TypeName: first line of the message`` (at most 200 characters of it), for
    libraries whose messages run over many lines."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _abandoned_write(unraisable: Any) -> bool:
    """Whether an unraisable exception is the echo of a failed save: a storage write
    finishing after its event loop closed, or its coroutine closed at exit."""
    text = str(unraisable.exc_value)
    return "Event loop is closed" in text or "Python is likely shutting down" in text


@contextlib.contextmanager
def failed_writes_quiet() -> Iterator[None]:
    """Around a save: if it fails, the writes still in flight fail too, each with a
    traceback printed from a background thread as it finishes, even after the save
    has returned. Those echoes are dropped (the failure is reported once); other
    unraisable exceptions go to the hook as before."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _abandoned_write(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    yield  # on failure the hook stays: the writes may finish later
    sys.unraisablehook = previous


MARK = ".sae_jax"  # left in every folder a run writes into: the run owns that folder


def check_workdir(path: Path, earlier_run: Callable[[Path], bool] = lambda path: False) -> None:
    """Refuse the folder ``path`` unless a sae_jax run may write there.

    A folder with the mark (``MARK``) is a run's; so is an empty one (a new
    ``--workdir``; ``run.lock`` aside), and one that ``earlier_run(path)`` accepts (what
    a version without the mark left). Anything else holds files no sae_jax run wrote,
    and a run must not write, overwrite or remove there: ``CheckpointError`` names the
    folder and what it holds.
    """
    if (path / MARK).is_file():
        return
    entries = sorted(entry.name for entry in path.iterdir() if entry.name != LOCK_NAME)
    if entries and not earlier_run(path):
        more = f" and {len(entries) - 4} more" if len(entries) > 4 else ""
        shown = ", ".join(entries[:4]) + more
        raise CheckpointError(
            f"--workdir={path}: holds files that no sae_jax run wrote ({shown}); "
            f"name a new or empty folder"
        )


def workdir_gone(path: Path) -> FileNotFoundError:
    """The error of a run whose workdir ``path`` (or its mark) was removed while it ran."""
    return FileNotFoundError(
        errno.ENOENT,
        "the folder was removed while the run was writing to it; nothing more is written "
        "there; run the same command again to start over",
        str(path),
    )


def mark_workdir(path: Path) -> None:
    """Leave the mark that a sae_jax run owns the folder ``path`` (see ``check_workdir``)."""
    if not (path / MARK).is_file():
        write_text_atomic(path / MARK, json.dumps({"written_by": "sae_jax"}) + "\n")


def make_workdir(path: Path) -> None:
    """Create ``path`` (and its parents); ``CheckpointError`` naming it if it cannot be one."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--workdir={path}: cannot create it ({e.strerror or e})") from None
    if not path.is_dir():
        raise CheckpointError(f"--workdir={path}: exists and is not a directory")


class WorkdirLock:
    """One run per workdir: an exclusive ``flock`` on ``<workdir>/run.lock``, which holds
    the holder's pid and host.

    The kernel releases the lock when its process ends, however it ends, so the lock
    of a dead process is taken over (and said so). A second run is refused with
    ``CheckpointError`` naming the workdir and the holder, or waits with ``wait=True``.
    Use as a context manager.
    """

    def __init__(self, workdir: Path, *, wait: bool = False, log: Callable[[str], None] = print):
        self.path = Path(workdir) / LOCK_NAME
        self.wait = wait
        self.log = log
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except IsADirectoryError:
            raise CheckpointError(
                f"{self.path}: is a folder, not the lock file a run keeps there; "
                f"move it away or use another --workdir"
            ) from None
        except OSError as e:
            raise CheckpointError(
                f"--workdir={self.path.parent}: cannot write in it ({e.strerror or e})"
            ) from None
        try:
            self._acquire(fd)
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if holder:  # a run that ended without releasing: killed, or its host lost
                self.log(f"{self.path}: taking over the lock of a run that stopped ({holder})")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as e:  # a full disk: the error names the lock file
            os.close(fd)
            raise named(e, self.path) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _acquire(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        if not self.wait:
            raise CheckpointError(
                f"--workdir={self.path.parent} is in use by {holder}; wait for that run to "
                f"end (--wait), or use another --workdir"
            )
        self.log(f"waiting for {holder} to finish with {self.path.parent}")
        fcntl.flock(fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # the lock goes with the descriptor anyway
                os.ftruncate(self._fd, 0)  # empty: released in good order
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them.

    Around a save, so that Ctrl-C or a scheduler's SIGTERM never stops a checkpoint
    halfway. Outside the main thread (where handlers cannot be set) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    names = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in names}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


RESUME = "run the same command again to resume"


def stop_on_sigterm() -> None:
    """Make SIGTERM (what schedulers and Colab send) stop the run as Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise Stopped(f"stopped by SIGTERM; {RESUME}", signum)

    signal.signal(signal.SIGTERM, handler)


def stopped(e: KeyboardInterrupt, where: str, advice: str = RESUME) -> Stopped:
    """The ``Stopped`` to raise for ``e``: which signal, ``where``, and what to do."""
    signum = getattr(e, "signum", signal.SIGINT)
    return Stopped(f"stopped by {signal.Signals(signum).name} {where}; {advice}", signum)
