"""``metrics.jsonl``: one JSON line per epoch per stage, and the history of the
stages that resume.

Every epoch's line is appended as the epoch ends, whether the epoch is checkpointed
or not. An epoch checkpoint holds only how many epochs its stage had run and the
sha256 of their lines (``MetricsLog.digest``), not the history itself, so a save
costs the same at every epoch; a resumed stage reads its history back from here and
checks it against that sha256 (a frozen stage holds its whole history). On
resuming, the file is made to hold exactly the checkpointed epochs of every stage
met so far, and the other stages' lines as they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sae_jax.errors import CheckpointError
from sae_jax.files import named, write_text_atomic

METRICS = "metrics.jsonl"
Entry = dict[str, Any]  # one epoch's metrics: loss, its terms, accuracy, seconds


def _line(stage: str, epoch: int, entry: Entry) -> str:
    return json.dumps({"stage": stage, "epoch": epoch, **entry}) + "\n"


def _sha256(stage: str, history: list[Entry]) -> Any:
    digest = hashlib.sha256()
    for i, entry in enumerate(history):
        digest.update(_line(stage, i + 1, entry).encode())
    return digest


class MetricsLog:
    """The lines of ``<workdir>/metrics.jsonl``, as read when the run started and as
    written since; ``write`` False (every process but process 0) keeps them without
    writing the file.

    Read the file before any process can rewrite it: process 0 rewrites it only in
    ``settle``, which the store calls after a collective operation that every process
    reaches once it has read.
    """

    def __init__(self, workdir: Path, *, write: bool = True):
        self.path = workdir / METRICS
        self.write = write
        self._clean = True  # whether the file holds exactly _rows (see _read)
        self._rows = self._read()  # (stage, epoch, entry), in the file's order
        self._logged: dict[str, int] = {}  # epochs of each stage written by this run
        self._digests: dict[str, Any] = {}  # sha256 of each stage's lines so far
        self._file: Any = None  # open for appending, between rewrites

    def _read(self) -> list[tuple[str, int, Entry]]:
        if not self.path.exists():
            return []
        text = self.path.read_text(errors="replace")
        rows = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a crash while it was written
                row = None
            if isinstance(row, dict) and isinstance(row.get("stage"), str):
                stage, epoch = row.pop("stage"), row.pop("epoch", None)
                if isinstance(epoch, int):
                    rows.append((stage, epoch, row))
        # Anything else in the file (a torn last line) goes at the first rewrite.
        self._clean = text == "".join(_line(*row) for row in rows)
        return rows

    def log(self, stage: str, history: list[Entry]) -> None:
        """Append the lines of the epochs of ``history`` (a stage's record so far)
        that are not written yet."""
        done = self._logged.get(stage, 0)
        digest = self._digests.setdefault(stage, hashlib.sha256())
        lines = []
        for epoch, entry in enumerate(history[done:], done + 1):
            lines.append(_line(stage, epoch, entry))
            digest.update(lines[-1].encode())
            self._rows.append((stage, epoch, entry))
        self._logged[stage] = max(done, len(history))
        if lines and self.write:
            try:
                if self._file is None:
                    self._file = open(self.path, "a")  # noqa: SIM115 (kept open: see close)
                self._file.write("".join(lines))
                self._file.flush()  # in the file, whatever happens to this process next
            except OSError as e:  # a full disk names no file
                raise named(e, self.path) from None

    def close(self) -> None:
        """Close the file (``log`` opens it again if needed)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def digest(self, stage: str) -> str:
        """The sha256 of the lines of ``stage`` written so far (from epoch 1)."""
        return self._digests.setdefault(stage, hashlib.sha256()).hexdigest()

    def history(self, stage: str, epochs: int, digest: str, checkpoint: Path) -> list[Entry]:
        """The first ``epochs`` epochs of ``stage`` as the file holds them, which must
        match ``digest`` (what ``checkpoint`` was saved with); ``CheckpointError``
        naming both if they do not."""
        found: dict[int, Entry] = {}
        for s, epoch, entry in self._rows:
            if s == stage:
                found.setdefault(epoch, entry)
        history = [found[epoch] for epoch in range(1, epochs + 1) if epoch in found]
        if len(history) < epochs or _sha256(stage, history).hexdigest() != digest:
            missing = "lacks some" if len(history) < epochs else "does not hold those"
            raise CheckpointError(
                f"{checkpoint} was saved after {epochs} epochs of {stage}, and {self.path} "
                f"{missing} epochs' metrics (edited or replaced?); put it back, or "
                f"--restart to discard the run"
            )
        return history

    def settle(self, stage: str, history: list[Entry]) -> None:
        """Make ``history`` the lines of ``stage`` (where its lines were, else at the
        end), keep every other stage's, and rewrite the file so."""
        others = [row for row in self._rows if row[0] != stage]
        at = next((i for i, row in enumerate(self._rows) if row[0] == stage), len(self._rows))
        rows = [(stage, i + 1, entry) for i, entry in enumerate(history)]
        settled = others[:at] + rows + others[at:]
        self._logged[stage] = len(history)
        self._digests[stage] = _sha256(stage, history)
        if settled == self._rows and self._clean:
            return  # as it is (a new run's stage, or one restored as it was written)
        self._rows, self._clean = settled, True
        self.close()  # the file is replaced
        if self.write:
            write_text_atomic(self.path, "".join(_line(*row) for row in self._rows))
