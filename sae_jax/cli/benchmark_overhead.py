"""The overhead report of ``sae-jax benchmark``: where the wall time of one run of
the training command goes.

``run_command`` runs the training command (``sae-jax train``, ``sae_jax.cli.train``) in
this process, with a fresh ``--workdir``, and records three things while it runs:

- compilation: the spans of JAX's compile events (``jax.monitoring`` duration events
  ``COMPILE_EVENTS``: tracing to a jaxpr, lowering to MLIR, and the backend compile,
  which on a persistent-cache hit is the cache read), and the counts of lowerings and
  cache hits;
- checkpoints: the spans of calls to ``RunStore``'s methods (``STORE_METHODS``, each
  present one, wrapped at class level; a call inside another is counted once);
- stages: a stage starts at the first call naming it (``finished``) and ends when
  ``save_finished`` for it returns; its epochs' seconds come from ``metrics.jsonl``.

``overhead`` turns such a record into figures (all in seconds; see its docstring for
the definitions) and ``table`` into a markdown table.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND = "/jax/core/compile/backend_compile_duration"
COMPILE_EVENTS = (TRACE, LOWER, BACKEND)
CACHE_HITS = "/jax/compilation_cache/cache_hits"
CACHE_MISSES = "/jax/compilation_cache/cache_misses"
# RunStore's methods that the stages call (the first two open a stage, save_finished
# closes it), and those of a newer RunStore that finish or wait for saves.
STORE_MARKS = ("finished", "resume", "save_epoch", "save_finished")
STORE_METHODS = (*STORE_MARKS, "close", "flush", "wait", "wait_until_finished", "finish")
FIGURES = (
    "wall_s",
    "epochs_s",
    "steady_s",
    "compile_s",
    "checkpoint_s",
    "rest_s",
    "checkpoint_in_epochs_s",
)
COUNTS = ("programs", "cache_hits")
COUNT_EVENTS = {
    "lowered": LOWER,
    "backend_compiles": BACKEND,
    "cache_hits": CACHE_HITS,
    "cache_misses": CACHE_MISSES,
}

Spans = list[tuple[float, float]]


# ----------------------------------------------------------------------------- recording


class Recorder:
    """Collects compile events and ``RunStore`` calls, times relative to ``self.t0``."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.compile: list[list] = []  # [start, end, event]
        self.events: dict[str, list[float]] = {}  # event -> times it was recorded
        self.store: list[list] = []  # [start, end, method, stage or None]
        self._depth = 0

    def now(self) -> float:
        """Seconds since ``t0``."""
        return time.time() - self.t0

    def install(self) -> None:
        """Listen to JAX's monitoring events and wrap ``RunStore``'s methods."""
        import jax.monitoring

        from sae_jax.workdir.checkpoint import RunStore

        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        for name in STORE_METHODS:
            if callable(getattr(RunStore, name, None)):
                setattr(RunStore, name, self._timed(getattr(RunStore, name), name))

    def _duration(self, event: str, duration_secs: float, **_: str | int) -> None:
        end = self.now()  # recorded as the event ends
        self.events.setdefault(event, []).append(end)
        if event in COMPILE_EVENTS:
            self.compile.append([end - duration_secs, end, event])

    def _event(self, event: str, **_: Any) -> None:
        self.events.setdefault(event, []).append(self.now())

    def _timed(self, method, name: str):
        @functools.wraps(method)
        def timed(store, *args, **kwargs):
            if self._depth:  # inside another timed call: counted there
                return method(store, *args, **kwargs)
            stage = args[0] if args and isinstance(args[0], str) else kwargs.get("stage")
            start, self._depth = self.now(), 1
            try:
                return method(store, *args, **kwargs)
            finally:
                self._depth = 0
                self.store.append([start, self.now(), name, stage])

        return timed


def run_command(argv: list[str], workdir: Path) -> dict[str, Any]:
    """Run the training command with ``argv`` and ``--workdir=workdir`` in this process
    (jax and sae_jax already imported) and return what ``overhead`` reads: the exit
    status, ``total_wall_s`` (the command's main, start to end), the stages, the
    compile spans, the store calls and the monitoring events' times."""
    from sae_jax.cli import train

    recorder = Recorder()
    recorder.install()
    start = recorder.now()
    status = train.main([*argv, f"--workdir={workdir}"])
    total = recorder.now() - start
    return {
        "status": status,
        "command": "sae-jax train",
        "total_wall_s": total,
        "start": start,
        "stages": stage_windows(recorder.store, epoch_seconds(workdir / "metrics.jsonl")),
        "compile": recorder.compile,
        "store": recorder.store,
        "events": recorder.events,
    }


def epoch_seconds(metrics: Path) -> dict[str, list[float]]:
    """Every epoch's ``seconds`` per stage, in order, from a run's ``metrics.jsonl``."""
    seconds: dict[str, list[float]] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            epoch = json.loads(line)
            seconds.setdefault(epoch["stage"], []).append(epoch["seconds"])
    return seconds


def stage_windows(store: list[list], seconds: dict[str, list[float]]) -> dict[str, dict]:
    """Per stage (in the order they started): ``start`` (its first store call), ``end``
    (the end of its ``save_finished``, else of its last call), ``first_save`` (the start
    of its first ``save_epoch``), ``saves`` (the start of every ``save_epoch``) and
    ``epoch_s``; stages that trained no epoch here (done in an earlier run) are left
    out."""
    stages: dict[str, dict] = {}
    for start, end, method, stage in store:
        if stage is None or method not in STORE_MARKS:
            continue
        s = stages.setdefault(stage, {"start": start, "end": end, "first_save": None})
        s["end"] = end
        if method == "save_epoch":
            s.setdefault("saves", []).append(start)
            if s["first_save"] is None:
                s["first_save"] = start
    return {
        name: {**s, "epoch_s": seconds[name]} for name, s in stages.items() if seconds.get(name)
    }


# ----------------------------------------------------------------------------- arithmetic


def union(spans) -> Spans:
    """The spans ``[(start, end), ...]`` merged where they overlap, sorted."""
    merged: Spans = []
    for start, end in sorted((s[0], s[1]) for s in spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(spans: Spans, window: tuple[float, float] | None = None) -> float:
    """The seconds the (merged) ``spans`` cover, within ``window`` if given."""
    lo, hi = window if window is not None else (float("-inf"), float("inf"))
    return sum(max(0.0, min(end, hi) - max(start, lo)) for start, end in spans)


def minus(spans: Spans, cut: Spans) -> Spans:
    """The parts of the merged ``spans`` outside the merged ``cut``."""
    out: Spans = []
    for start, end in spans:
        for c0, c1 in cut:
            if c1 <= start or c0 >= end:
                continue
            if c0 > start:
                out.append((start, c0))
            start = max(start, c1)
        if start < end:
            out.append((start, end))
    return out


def steady_seconds(epoch_s: list[float], first_compile_s: float) -> float:
    """Epochs x the median steady epoch (every epoch but the first). A stage of one
    epoch has no steady epoch: its steady seconds are that epoch less the compilation
    before its first save (``first_compile_s``), at least 0."""
    if len(epoch_s) > 1:
        return len(epoch_s) * statistics.median(epoch_s[1:])
    return max(epoch_s[0] - first_compile_s, 0.0) if epoch_s else 0.0


def epoch_spans(stage: dict[str, Any]) -> Spans:
    """Where the stage's epochs ran, as far as the store calls tell: epoch k ends where
    its ``save_epoch`` starts (the loop saves an epoch once its seconds are measured)
    and lasts its seconds. Empty where the saves and the epochs are not one to one."""
    saves = stage.get("saves", [])
    if len(saves) != len(stage["epoch_s"]):
        return []
    return [(t - s, t) for t, s in zip(saves, stage["epoch_s"], strict=True)]


def _row(
    wall: float,
    epochs: float,
    steady: float,
    compile_: float,
    store: list[Spans],
    window: tuple[float, float] | None,
) -> dict[str, float]:
    """One row's figures; ``store``: [exposed, hidden] checkpoint spans."""
    exposed, hidden = (length(spans, window) for spans in store)
    return {
        "wall_s": wall,
        "epochs_s": epochs,
        "steady_s": steady,
        "compile_s": compile_,
        "checkpoint_s": exposed,
        "rest_s": wall - steady - compile_ - exposed,
        "checkpoint_in_epochs_s": hidden,
    }


def _count(times: list[float], window: tuple[float, float] | None = None) -> int:
    lo, hi = window if window is not None else (float("-inf"), float("inf"))
    return sum(lo <= t <= hi for t in times)


def overhead(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of one recorded run (see ``run_command``), in seconds.

    Per stage (its window: from its first store call to the end of ``save_finished``):
    ``wall_s`` the window; ``epochs_s`` the sum of its epochs' seconds; ``steady_s``
    epochs x the median steady epoch (``steady_seconds``); ``compile_s`` the time
    covered by compile events in the window (overlapping events counted once: a trace
    holds the traces of the functions it calls); ``checkpoint_s`` the time in
    ``RunStore``'s methods not covered by compile events nor by the epochs (a loop may
    save epoch k while epoch k + 1 runs: that time is ``checkpoint_in_epochs_s``, and
    it is in the epochs' seconds already); ``rest_s`` = wall - steady - compile -
    checkpoint. Compilation inside the first epoch is not in ``steady_s`` (the
    first epoch is left out of the median), so it is counted once, in ``compile_s``;
    ``rest_s`` holds the evaluation, the first epoch's excess over a steady one beyond
    its compilation, and the Python between. "outside" is the command's time outside
    every stage (loading data, encoding it between stages, the test evaluation, figures,
    the summary): its steady seconds are 0. "total" is the whole command: wall
    ``total_wall_s``, and the sums. Also ``programs`` (lowerings to MLIR) and
    ``cache_hits`` (programs read from the persistent cache) per row.
    """
    compile_spans = union(run["compile"])
    store_spans = minus(union(run["store"]), compile_spans)
    epochs = union(span for s in run["stages"].values() for span in epoch_spans(s))
    exposed = minus(store_spans, epochs)
    store = [exposed, minus(store_spans, exposed)]
    lowered = run["events"].get(LOWER, [])
    hits = run["events"].get(CACHE_HITS, [])
    rows: dict[str, dict] = {}
    for name, s in run["stages"].items():
        window = (s["start"], s["end"])
        first = (s["start"], s["first_save"] if s["first_save"] is not None else s["end"])
        c = length(compile_spans, window)
        steady = steady_seconds(s["epoch_s"], length(compile_spans, first))
        rows[name] = _row(s["end"] - s["start"], sum(s["epoch_s"]), steady, c, store, window)
        rows[name].update(programs=_count(lowered, window), cache_hits=_count(hits, window))
    total = _row(
        run["total_wall_s"],
        sum(r["epochs_s"] for r in rows.values()),
        sum(r["steady_s"] for r in rows.values()),
        length(compile_spans),
        store,
        None,
    )
    total.update(programs=len(lowered), cache_hits=len(hits))
    outside = {k: total[k] - sum(r[k] for r in rows.values()) for k in (*FIGURES, *COUNTS)}
    outside["rest_s"] = outside["wall_s"] - outside["compile_s"] - outside["checkpoint_s"]
    outside["steady_s"] = outside["epochs_s"] = 0.0
    return {"stages": rows, "outside": outside, "total": total, **counts(run)}


def counts(run: dict[str, Any]) -> dict[str, int]:
    """The whole run's program counts: ``lowered`` (to MLIR), ``backend_compiles``
    (XLA compiles and persistent-cache reads), ``cache_hits`` and ``cache_misses``."""
    return {k: len(run["events"].get(e, [])) for k, e in COUNT_EVENTS.items()}


def median_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over several runs' ``overhead`` reports."""
    med = lambda values: statistics.median(values)
    first = reports[0]
    rows = lambda get: {k: med([get(r)[k] for r in reports]) for k in get(first)}
    return {
        "stages": {n: rows(lambda r, n=n: r["stages"][n]) for n in first["stages"]},
        "outside": rows(lambda r: r["outside"]),
        "total": rows(lambda r: r["total"]),
        **{k: med([r[k] for r in reports]) for k in COUNT_EVENTS},
    }


def table(report: dict[str, Any]) -> str:
    """A markdown table of an ``overhead`` report: a row per stage, outside, total."""
    head = "| part | wall s | epochs s | steady s | compile s | checkpoint s | rest s |"
    lines = [head + " checkpoint in epochs s | programs | cache hits |", "|" + " --- |" * 10]
    rows = [
        *report["stages"].items(),
        ("outside stages", report["outside"]),
        ("total", report["total"]),
    ]
    for name, r in rows:
        figures = " | ".join(f"{r[k]:.2f}" for k in FIGURES)
        lines.append(f"| {name} | {figures} | {r['programs']:.0f} | {r['cache_hits']:.0f} |")
    return "\n".join(lines)
