"""How a multi-process run's stderr becomes one line: the filter that ``exits.start``
puts on fd 2 with ``--distributed``, fed the lines a lost process can produce."""

import subprocess
import sys

import pytest

from sae_jax.commands import exits

OURS = b"error: a collective operation failed: another process of the run stopped (x); resume\n"
LOG = b"W1206 06:21:39.958220    8322 preemption_sync_manager.cc:147] Socket closed\n"
FATAL = (
    b"F1206 06:21:40.000000    8322 client.cc:50] " + exits.RUNTIME_FATAL.encode()
    + b"; absl::Status: UNAVAILABLE: the leader task died\n"
)  # fmt: skip
LINE = "error: the multi-process run failed (%s): see above"


def _filtered(*lines: bytes) -> bytes:
    proc = subprocess.run(
        [sys.executable, "-c", exits._STDERR_FILTER, exits.RUNTIME_FATAL, LINE],
        input=b"".join(lines), capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == b""
    return proc.stderr


@pytest.mark.parametrize(
    "lines, said",
    [
        # the run's own line first, then the runtime notices the lost coordinator too
        ((OURS, LOG, FATAL), OURS),
        # the runtime first: its one line, and the run's (if it still comes) dropped
        ((LOG, FATAL, OURS), b"error: the multi-process run failed (UNAVAILABLE: the leader "
                             b"task died): see above\n"),
        # no abort: the runtime's log lines pass through once the run ends
        ((b"sae_jax output\n", LOG), b"sae_jax output\n" + LOG),
    ],
)  # fmt: skip
def test_a_lost_process_is_one_line_whichever_side_notices_first(lines, said):
    assert _filtered(*lines) == said
