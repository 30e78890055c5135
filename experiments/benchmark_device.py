"""The two Python steps of ``experiments/device_check.sh``.

  python experiments/benchmark_device.py env OUT_DIR    # OUT_DIR/env.json: what runs where
  python experiments/benchmark_device.py table OUT_DIR  # OUT_DIR/device_check.md

``table`` gathers every figure that the check's parts left in ``OUT_DIR`` (``status.tsv``,
``env.json``, ``bench-*.json``, ``tests-*.xml``, ``sweep/sweep.json``, the training runs'
``summary.json`` and ``metrics.jsonl``) into one markdown
table: part, figure, value, target (and whether it is met) and the file and key it came
from. A part that did not run or left nothing says so in its status rows.
"""

from __future__ import annotations

import json
import math
import platform
import re
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# The per-step budget on a GPU, for the seed benchmark: (temperature or stage figure) ->
# bound. total_wall_s is the training command's main (see benchmark_overhead).
GPU_TARGETS = {"cold total wall_s": 8.0, "warm total wall_s": 2.5, "us_per_step": 50.0}
STATUS = {
    "0": "exit 0",
    "124": "timed out",
    "137": "killed after its time",
    "skip": "not run",
    "one device": "not run: one device",
}

Row = tuple[str, str, str, str, str]  # part, figure, value, target, source


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _target(value: float, bound: float, sense: str = "<=") -> str:
    met = value <= bound if sense == "<=" else value >= bound
    return f"{sense} {bound:g} ({'met' if met else 'NOT met'})"


def env(out: Path) -> None:
    """Write ``out/env.json``: Python, jax (its backend and devices), PyTorch (and CUDA),
    the GPU as ``nvidia-smi`` names it, the CPU count."""
    import os

    facts: dict[str, Any] = {"python": sys.version.split()[0], "machine": platform.machine()}
    facts["cpus"] = os.cpu_count()
    try:
        import jax

        facts["jax"] = jax.__version__
        facts["jax_backend"] = jax.default_backend()
        facts["jax_devices"] = [d.device_kind for d in jax.devices()]
    except Exception as e:  # a broken install is a figure of the check too
        facts["jax"] = f"unavailable: {e}"
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        facts["torch"] = "not installed"
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"]
        facts["nvidia_smi"] = subprocess.run(
            query, capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        facts["nvidia_smi"] = "absent"
    (out / "env.json").write_text(json.dumps(facts, indent=2) + "\n")


def status_rows(out: Path) -> list[Row]:
    """One row per part: how it ended and its seconds (``status.tsv``)."""
    rows = []
    path = out / "status.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        part, status, seconds, cap, command = line.split("\t", 4)
        ended = STATUS.get(status, f"exit {status}")
        rows.append((part, "status", ended, "exit 0", f"status.tsv: {command}"))
        rows.append((part, "seconds", seconds, f"<= {cap} (its time)", "status.tsv"))
    return rows


def env_rows(out: Path) -> list[Row]:
    """The facts of ``env.json``."""
    path = out / "env.json"
    facts = json.loads(path.read_text()) if path.is_file() else {}
    return [("env", k, _fmt(v), "", f"env.json: {k}") for k, v in facts.items()]


def bench_rows(path: Path) -> list[Row]:
    """Every figure of one benchmark's ``--json``, with the GPU targets where they apply."""
    part, name = path.stem, path.name
    data = json.loads(path.read_text())
    gpu_seed = data["flags"]["platform"] == "gpu" and data["flags"]["config"] == "seed"
    header = [line for line in data["header"] if line]
    rows: list[Row] = [(part, "header", line, "", f"{name}: header") for line in header]
    for temp, report in data["overhead"].items():
        parts = {**report["stages"], "outside": report["outside"], "total": report["total"]}
        for row, figures in parts.items():
            for k, v in figures.items():
                figure = f"{temp} {row} {k}"
                target = GPU_TARGETS.get(figure) if gpu_seed else None
                target_text = "" if target is None else _target(v, target)
                key = f"overhead.{temp}.{'stages.' if row in report['stages'] else ''}{row}.{k}"
                rows.append((part, figure, _fmt(v), target_text, f"{name}: {key}"))
        for k in data["count_events"]:
            rows.append((part, f"{temp} {k}", _fmt(report[k]), "", f"{name}: overhead.{temp}.{k}"))
    for side, stages in (data.get("per_stage") or {}).items():
        for stage, figures in stages.items():
            for k, v in figures.items():
                target = (
                    GPU_TARGETS[k] if gpu_seed and side == "warm" and k in GPU_TARGETS else None
                )
                target_text = "" if target is None else _target(v, target)
                key = f"per_stage.{side}.{stage}.{k}"
                rows.append((part, f"{side} {stage} {k}", _fmt(v), target_text, f"{name}: {key}"))
    for side, figures in data["whole_process"].items():
        for k, v in figures.items():
            key = f"whole_process.{side}.{k}"
            rows.append((part, f"{side} {k}", _fmt(v), "", f"{name}: {key}"))
    for i, c in enumerate(data["checks"]):
        target = (
            "" if c["target"] is None else f"{c['target']} ({'met' if c['met'] else 'NOT met'})"
        )
        figure = f"{c['temperature']} {c['figure']}"
        rows.append((part, figure, _fmt(c["value"]), target, f"{name}: checks[{i}]"))
    return rows


def junit(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A JUnit file's totals and ``{test id: outcome}`` (passed, skipped, failed: ...)."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    totals = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}
    outcomes = {}
    for case in suite.iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcomes[test] = "passed"
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                first = (found.get("message") or "").strip().splitlines()
                what = "skipped" if kind == "skipped" else f"{kind}: {first[0] if first else ''}"
                outcomes[test] = what[:160]
    return totals, outcomes


def tests_rows(out: Path) -> list[Row]:
    """Each test run's totals and every test that did not pass; the CPU rerun says of
    each GPU failure whether it passes on the CPU."""
    rows: list[Row] = []
    runs = {p.stem: junit(p) for p in sorted(out.glob("tests*.xml"))}
    for part, (totals, outcomes) in runs.items():
        for k, v in totals.items():
            target = "0" if k in ("failures", "errors") else ""
            rows.append((part, k, str(v), target, f"{part}.xml: testsuite@{k}"))
        for test, outcome in outcomes.items():
            if outcome not in ("passed", "skipped"):
                rows.append((part, test, outcome.replace("|", "/"), "passed", f"{part}.xml"))
    rerun = runs.get("tests-cpu-rerun", ({}, {}))[1]
    for test, outcome in rerun.items():
        verdict = "passes on the CPU: GPU only" if outcome == "passed" else "fails on the CPU too"
        rows.append(("tests-cpu-rerun", test, verdict, "", "tests-cpu-rerun.xml"))
    return rows


def sweep_rows(out: Path) -> list[Row]:
    """The sweep's figures: wall seconds, every model's test accuracy, the mean and
    standard deviation of the test error."""
    path = out / "sweep" / "sweep.json"
    if not path.is_file():
        return []
    rows: list[Row] = []
    for r, run in enumerate(json.loads(path.read_text())["runs"]):
        seeds = run["points"][0]["seeds"] if run.get("points") else []
        for k in ("wall_s", "test_error_mean", "test_error_std"):
            if k in run:
                rows.append(("sweep", k, _fmt(run[k]), "", f"sweep/sweep.json: runs[{r}].{k}"))
        for i, accuracy in enumerate(run["test_accuracy"]):
            seed = f"seed {seeds[i]}" if i < len(seeds) else f"model {i}"
            key = f"runs[{r}].test_accuracy[{i}]"
            rows.append(
                ("sweep", f"{seed} test_accuracy", _fmt(accuracy), "", f"sweep/sweep.json: {key}")
            )
    return rows


# The training runs of the check: float32 against bfloat16, one device against all.
TRAINED = ("seed-float32", "seed-bfloat16", "one-device", "all-devices")


def _steady(metrics: Path) -> dict[str, float]:
    """Each stage's median epoch seconds after its first epoch (compilation), from a
    run's ``metrics.jsonl`` (stages of one epoch left out)."""
    seconds: dict[str, list[float]] = {}
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        m = json.loads(line)
        if m["epoch"] > 1:
            seconds.setdefault(m["stage"], []).append(m["seconds"])
    return {stage: statistics.median(s) for stage, s in seconds.items()}


def train_rows(out: Path) -> list[Row]:
    """Each training run's test accuracy, wall seconds and devices (``summary.json``),
    each stage's steady epoch and step (over the training examples its log's first
    line counts), and bfloat16's test accuracy against float32's."""
    rows: list[Row] = []
    accuracy = {}
    for name in TRAINED:
        path = out / name / "summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        accuracy[name] = summary["test_accuracy"]
        for k in ("test_accuracy", "total_wall_s", "devices"):
            rows.append((name, k, _fmt(summary[k]), "", f"{name}/summary.json: {k}"))
        log = out / f"{name}.log"
        found = re.search(r"(\d+) training / ", log.read_text()) if log.is_file() else None
        steps = found and math.ceil(int(found.group(1)) / summary["config"]["batch_size"])
        source = f"{name}/metrics.jsonl: median seconds of the epochs after the first"
        for stage, seconds in _steady(out / name / "metrics.jsonl").items():
            rows.append((name, f"{stage} steady epoch_s", _fmt(seconds), "", source))
            if steps:
                per_step = _fmt(1e6 * seconds / steps)
                rows.append(
                    (name, f"{stage} us_per_step", per_step, "", f"{source}, {steps} steps")
                )
    if {"seed-float32", "seed-bfloat16"} <= set(accuracy):
        gap = accuracy["seed-bfloat16"] - accuracy["seed-float32"]
        source = "seed-*/summary.json: test_accuracy"
        rows.append(
            (
                "seed-bfloat16",
                "test_accuracy - float32's",
                _fmt(gap),
                _target(abs(gap), 0.03),
                source,
            )
        )
    return rows


def table(out: Path) -> Path:
    """Write ``out/device_check.md`` from what the parts left in ``out``."""
    rows = [*status_rows(out), *env_rows(out)]
    for path in sorted(out.glob("bench-*.json")):
        rows += bench_rows(path)
    rows += tests_rows(out) + sweep_rows(out) + train_rows(out)
    lines = ["| part | figure | value | target | source |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    path = out / "device_check.md"
    path.write_text("# Device check\n\n" + "\n".join(lines) + "\n")
    return path


def main(argv: list[str]) -> int:
    """``env OUT_DIR`` or ``table OUT_DIR``."""
    if len(argv) != 2 or argv[0] not in ("env", "table") or not Path(argv[1]).is_dir():
        print("usage: benchmark_device.py env|table OUT_DIR (an existing folder)", file=sys.stderr)
        return 2
    out = Path(argv[1])
    if argv[0] == "env":
        env(out)
    else:
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
