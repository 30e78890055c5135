"""sae_jax.files: user paths, atomic writes, the workdir lock, deferred signals."""

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from sae_jax.errors import CheckpointError
from sae_jax.files import WorkdirLock, signals_deferred, storage_error, user_path, write_text_atomic

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sae_jax.files import WorkdirLock
    with WorkdirLock(Path(sys.argv[1]), log=lambda line: None):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _hold(workdir, seconds):
    """A child process holding the lock of ``workdir`` for ``seconds``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_user_path_is_absolute_and_expands_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_path("checkpoints/mnist") == tmp_path / "checkpoints" / "mnist"
    assert user_path("~/runs") == tmp_path / "home" / "runs"
    assert user_path(tmp_path / "x") == tmp_path / "x"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_get_the_usual_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert (tmp_path / "a.json").read_text() == "{}\n"
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left


def test_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    holder = _hold(tmp_path, 60)
    try:
        with pytest.raises(CheckpointError) as e, WorkdirLock(tmp_path, log=print):
            pass
        assert str(e.value) == (
            f"--workdir={tmp_path} is in use by pid {holder.pid} on {os.uname().nodename}; "
            f"wait for that run to end (--wait), or use another --workdir"
        )
    finally:
        holder.kill()
        holder.wait()
    # Killed, its lock is gone with it: the next run takes over and says so.
    lines = []
    with WorkdirLock(tmp_path, log=lines.append):
        assert (tmp_path / "run.lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert lines == [
        f"{tmp_path}/run.lock: taking over the lock of a run that stopped "
        f"(pid {holder.pid} on {os.uname().nodename})"
    ]
    assert (tmp_path / "run.lock").read_text() == ""  # released in good order
    with WorkdirLock(tmp_path, log=lines.append):
        pass
    assert len(lines) == 1  # nothing to take over after a clean release


def test_wait_waits_for_the_holder(tmp_path):
    holder = _hold(tmp_path, 1.5)
    lines = []
    start = time.monotonic()
    with WorkdirLock(tmp_path, wait=True, log=lines.append):
        assert time.monotonic() - start > 1.0  # the holder kept it for 1.5 s
        assert (tmp_path / "run.lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert (
        lines[0]
        == f"waiting for pid {holder.pid} on {os.uname().nodename} to finish with {tmp_path}"
    )
    holder.wait()


def test_signals_wait_until_the_block_ends():
    # Ctrl-C's usual handler, even where the tests were started with SIGINT ignored
    # (a background job of a shell without job control).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reached = []
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, and must not raise
            reached.append("end of block")
        assert reached == ["end of block"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_storage_errors_become_one_os_error_line():
    text = (
        'RESOURCE_EXHAUSTED: Error writing "key/0" in OCDBT database at local file "/w/x/": '
        "Failed to write 78254 bytes to file 17: No space left on device [os_error_code='28']\n"
        "more detail"
    )
    e = storage_error("cannot save the checkpoint /w/x/2", ValueError(text))
    assert e.errno == errno.ENOSPC
    assert str(e) == "[Errno 28] cannot save the checkpoint /w/x/2: No space left on device"
    e = storage_error("cannot save x", OSError(errno.EFBIG, "File too large", "/w/f"))
    assert e.strerror == "cannot save x: /w/f: File too large"
    e = storage_error("cannot save x", RuntimeError("something else\nand more"))
    assert e.strerror == "cannot save x: RuntimeError: something else"
