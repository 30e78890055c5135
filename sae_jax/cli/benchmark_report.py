"""What ``sae-jax benchmark`` prints and writes: the overhead tables of its sae_jax
runs (see ``benchmark_overhead``), the comparison with PyTorch per stage and for the
whole process, and the derived checks against their targets.
"""

from __future__ import annotations

import math
import statistics
import time
from itertools import pairwise
from typing import Any

from sae_jax.cli.benchmark_overhead import COUNT_EVENTS, median_report, overhead, table

# The seed workload (784-1000-1500-10, batch 160), which both sides of the comparison run.
STAGES = ("pretrain_1", "pretrain_2", "finetune")
SIZES = (784, 1000, 1500)
CLASSES, BATCH, N_TRAIN, N_TEST = 10, 160, 60000, 10000
TEMPERATURES = ("cold", "warm")
# The derived checks of each config: figure -> {temperature: (">=" or "<=", bound)}; a
# figure is printed for both temperatures, its target where one is given.
CHECKS = {
    "tiny": {"total_wall_s / epochs_s": {"warm": ("<=", 2.0)}},
    "seed": {
        "(total_wall_s - epochs_s) / total_wall_s": {"cold": ("<=", 0.03), "warm": ("<=", 0.03)},
        "torch process_s / sae_jax process_s": {"cold": (">=", 1.52), "warm": (">=", 1.52)},
    },
}
DEFINITIONS = """\
Figures (seconds, median over the repetitions), measured in the child process:
- total wall: the training command's main, from its call (jax and sae_jax imported) to its
  return; a stage's wall: from RunStore.finished for it to the end of save_finished.
- epochs: the sum of the epochs' `seconds` (metrics.jsonl); steady: epochs x the median
  steady epoch (all but the first; a one-epoch stage: that epoch less the compilation
  before its first save).
- compile: the time covered by JAX's compile events (jaxpr trace, MLIR lowering, backend
  compile, which on a cache hit is the cache read), overlaps counted once. Compilation
  inside the first epoch is not in steady (the first epoch is left out of the median),
  so it is counted once, here.
- checkpoint: the time inside RunStore's methods, less compilation within them and less
  the time they ran while an epoch did (a loop may save epoch k during epoch k + 1; epoch
  k is taken to end where its save_epoch starts): that part is in the epochs' seconds
  already and shows as "checkpoint in epochs".
- rest: wall - steady - compile - checkpoint (evaluation, the first epoch's excess beyond
  its compilation, Python in between; outside stages: loading, encoding between stages,
  the test evaluation, figures, the summary). Slightly negative where the first epoch's
  excess over a steady one is less than the compilation inside it (steady epochs can
  carry work the first does not, such as the previous epoch's save).
- programs: lowerings to MLIR; cache hits: programs read from the persistent cache.
- process: the child process's wall time as the parent saw it (interpreter start,
  imports and exit included)."""


def workload_flops(epochs: int, n_train: int = N_TRAIN, n_test: int = N_TEST) -> float:
    """Matrix-multiply FLOPs of the seed workload (2 per multiply-add).

    Per step of batch b through a dense layer i -> o: 2bio forward, 2bio for the
    weight gradient, 2bio for the input gradient (not needed for the data itself).
    Plus the forward passes that encode the data between layers and the test-set
    evaluations after each fine-tuning epoch.
    """
    steps = epochs * n_train  # examples processed per stage
    flops = 0.0
    for i, o in pairwise(SIZES):
        flops += steps * (4 * i * o + 6 * o * i)  # encoder (no input grad) + decoder
        flops += 2 * n_train * i * o  # encoding the data for the next stage
    dims = [*SIZES, CLASSES]
    layers = list(pairwise(dims))
    flops += steps * sum((4 if k == 0 else 6) * i * o for k, (i, o) in enumerate(layers))
    flops += epochs * n_test * sum(2 * i * o for i, o in layers)
    return flops


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matrix-multiply throughput of JAX's default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        dot(a, a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def stage_view(run: dict[str, Any]) -> dict[str, dict]:
    """``{stage: {epoch_s, wall_s}}`` of a PyTorch run, or of a sae_jax run (the wall of
    its stage windows)."""
    wall = lambda s: s["wall_s"] if "wall_s" in s else s["end"] - s["start"]
    return {name: {"epoch_s": s["epoch_s"], "wall_s": wall(s)} for name, s in run["stages"].items()}


def summarize(run: dict[str, Any], n_train: int = N_TRAIN) -> dict[str, dict]:
    """Per stage: ``compile_s`` (the first epoch's excess over the median steady one;
    NaN for one epoch), ``us_per_step`` (steady) and ``wall_s``."""
    steps = math.ceil(n_train / BATCH)
    stages = {}
    for name, s in stage_view(run).items():
        epochs = s["epoch_s"]
        steady = statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]
        stages[name] = {
            "compile_s": max(epochs[0] - steady, 0.0) if len(epochs) > 1 else float("nan"),
            "us_per_step": steady / steps * 1e6,
            "wall_s": s["wall_s"],
        }
    return stages


def check_values(report: dict[str, Any], process_s: dict[str, float], temp: str) -> dict:
    """The derived figures of one temperature's median overhead report; ``process_s``:
    the median process seconds per side (``cold``, ``warm``, and ``torch`` if run)."""
    total = report["total"]
    values = {
        "total_wall_s / epochs_s": total["wall_s"] / total["epochs_s"],
        "(total_wall_s - epochs_s) / total_wall_s": (total["wall_s"] - total["epochs_s"])
        / total["wall_s"],
    }
    if "torch" in process_s:
        values["torch process_s / sae_jax process_s"] = process_s["torch"] / process_s[temp]
    return values


def derived_checks(config: str, reports: dict[str, dict], process_s: dict[str, float]) -> list:
    """The derived checks of ``config`` (``CHECKS``), for both temperatures:
    ``[{figure, temperature, value, target, met}]`` (``target`` and ``met`` None where
    the figure has no target at that temperature)."""
    values = {t: check_values(reports[t], process_s, t) for t in TEMPERATURES}
    out = []
    for figure, targets in CHECKS[config].items():
        for temp in TEMPERATURES:
            if figure not in values[temp]:
                continue  # the PyTorch ratio, where PyTorch did not run
            value, target, met = values[temp][figure], targets.get(temp), None
            if target is not None:
                sense, bound = target
                met = value <= bound if sense == "<=" else value >= bound
            text = None if target is None else f"{target[0]} {target[1]:g}"
            out.append(
                {"figure": figure, "temperature": temp, "value": value, "target": text, "met": met}
            )
    return out


def print_overhead(config: str, reports: dict[str, dict]) -> None:
    """The overhead table and the program counts of each temperature."""
    for temp in TEMPERATURES:
        r = reports[temp]
        cache = "empty" if temp == "cold" else "filled by the cold run"
        print(f"\n{config}, {temp} (persistent compilation cache {cache}):\n")
        print(table(r))
        print(
            f"\nprograms: {r['lowered']:.0f} lowered, {r['backend_compiles']:.0f} backend "
            f"compiles, of which {r['cache_hits']:.0f} persistent-cache hits and "
            f"{r['cache_misses']:.0f} misses"
        )
        if not r["lowered"]:
            print("warning: no compile events were recorded (does this jax name them so?)")


def print_checks(checks: list[dict]) -> None:
    """One line per derived check."""
    print()
    for c in checks:
        verdict = "" if c["met"] is None else ("  met" if c["met"] else "  NOT met")
        target = f" (target {c['target']}){verdict}" if c["target"] else ""
        print(f"{c['figure']}, {c['temperature']}: {c['value']:.3f}{target}")


def print_comparison(runs: dict[str, list], others: list[str], n_train: int) -> dict:
    """Per stage, sae_jax warm against each PyTorch side: compile s, us / step, wall s;
    returns them, ``{side: {stage: {figure: median}}}``."""
    med = statistics.median
    table_ = {
        side: {
            name: {
                k: med([summarize(run, n_train)[name][k] for run in runs[side]])
                for k in ("compile_s", "us_per_step", "wall_s")
            }
            for name in STAGES
        }
        for side in ("warm", *others)
    }
    labels = (("compile_s", "compile s"), ("us_per_step", "us / step"), ("wall_s", "wall s"))
    for other in others:
        print(f"\n| stage | figure | sae_jax warm | {other} | {other} / sae_jax |")
        print("| --- | --- | --- | --- | --- |")
        for name in STAGES:
            for k, label in labels:
                a, b = table_["warm"][name][k], table_[other][name][k]
                ratio = b / a if a else float("nan")  # a warm compile can be 0
                print(f"| {name} | {label} | {a:.2f} | {b:.2f} | {ratio:.2f} |")
    return table_


def whole_process(runs: dict[str, list], sides: list[str], flops: float | None, gflops: float):
    """Per side: process s, command (sae_jax) or pipeline (PyTorch) s, epochs s, peak
    RSS, test accuracy and the fraction of the matmul peak over the epochs."""
    med = statistics.median
    print(
        "\n| side | process s | command or pipeline s | epochs s | peak RSS MB | "
        "test accuracy | fraction of matmul peak |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = {}
    for side in sides:
        rs = runs[side]
        epochs = med([sum(sum(s["epoch_s"]) for s in r["stages"].values()) for r in rs])
        row = {
            "process_s": med([r["process_s"] for r in rs]),
            "main_s": med([r.get("total_wall_s", r.get("pipeline_s", 0.0)) for r in rs]),
            "epochs_s": epochs,
            "peak_rss_mb": med([r["peak_rss_mb"] for r in rs]),
            "accuracy": med([r["accuracy"] for r in rs if r["accuracy"] is not None] or [0.0]),
        }
        peak = "" if flops is None else f"{flops / epochs / (gflops * 1e9):.2f}"
        name = f"sae_jax {side}" if side in TEMPERATURES else side
        print(
            f"| {name} | {row['process_s']:.1f} | {row['main_s']:.1f} | {epochs:.1f} | "
            f"{row['peak_rss_mb']:.0f} | {row['accuracy']:.4f} | {peak} |"
        )
        rows[side] = row
    return rows


def report(header: list[str], config: str, runs: dict[str, list], n_train: int, flops) -> dict:
    """Print everything of a benchmark's runs (``runs``: cold and warm sae_jax runs, and
    any PyTorch sides) and return it as JSON-ready data."""
    for line in header:
        print(line)
    print(DEFINITIONS)
    reports = {t: median_report([overhead(r) for r in runs[t]]) for t in TEMPERATURES}
    print_overhead(config, reports)
    others = [s for s in runs if s not in TEMPERATURES]
    gflops, per_stage = (matmul_gflops() if others else float("nan")), None
    if others:
        print(
            f"\nmatrix-multiply throughput (jnp.dot 2048^2, float32, at the precision above): "
            f"{gflops:.0f} GFLOP/s; "
            f"workload {flops / 1e12:.2f} TFLOP"
        )
        per_stage = print_comparison(runs, others, n_train)
    whole = whole_process(runs, [*TEMPERATURES, *others], flops if others else None, gflops)
    process_s = {s: whole[s]["process_s"] for s in whole}
    checks = derived_checks(config, reports, process_s)
    print_checks(checks)
    return {
        "header": header,
        "overhead": reports,
        "per_run": {t: [overhead(r) for r in runs[t]] for t in TEMPERATURES},
        "whole_process": whole,
        "per_stage": per_stage,
        "matmul_gflops": gflops if others else None,
        "checks": checks,
        "count_events": COUNT_EVENTS,
    }
