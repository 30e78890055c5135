"""The seed workload in sae_jax and in plain PyTorch, side by side.

Both sides run exactly the seed preset's computation (784-1000-1500-10, batch 160,
sigmoid units, summed squared error + KL sparsity + weight decay, Adam 1e-3 for
each autoencoder, then fine-tuning with TF1-style RMSProp 1e-3 and the test
accuracy after every fine-tuning epoch), on the same MNIST files, for the same
epochs. Each repetition is a fresh child process (imports, data loading and
compilation included, as a user would see them); the parent alternates
sae_jax, PyTorch, sae_jax, PyTorch, ... and prints, per stage, the median
compile seconds, microseconds per step in steady state and wall seconds, with the
ratio PyTorch / sae_jax for each, plus peak memory and the fraction of the
machine's matrix-multiply throughput (a large ``jnp.dot`` timed in the same run)
that each side achieved.

  pip install -e '.[bench]'
  python experiments/benchmark.py --data_dir=../shared/data/mnist --epochs=10 --repeats=3

The PyTorch side is what a PyTorch user would write: tensors kept on the device,
manual minibatch slicing of a ``randperm``, eager mode (``--torch_compile`` adds a
``torch.compile``-d variant). Its RMSProp is ``torch.optim.RMSprop`` with its
mean square started at 1 as in TF1 (TF1 adds eps inside the square root, PyTorch
outside; at eps = 1e-10 the difference is below float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

STAGES = ("pretrain_1", "pretrain_2", "finetune")
SIZES = (784, 1000, 1500)
CLASSES, BATCH, N_TRAIN, N_TEST = 10, 160, 60000, 10000


def workload_flops(epochs: int) -> float:
    """Matrix-multiply FLOPs of the seed workload (2 per multiply-add).

    Per step of batch b through a dense layer i -> o: 2bio forward, 2bio for the
    weight gradient, 2bio for the input gradient (not needed for the data itself).
    Plus the forward passes that encode the data between layers and the test-set
    evaluations after each fine-tuning epoch.
    """
    steps = epochs * N_TRAIN  # examples processed per stage
    flops = 0.0
    for i, o in pairwise(SIZES):
        flops += steps * (4 * i * o + 6 * o * i)  # encoder (no input grad) + decoder
        flops += 2 * N_TRAIN * i * o  # encoding the data for the next stage
    dims = [*SIZES, CLASSES]
    layers = list(pairwise(dims))
    flops += steps * sum((4 if k == 0 else 6) * i * o for k, (i, o) in enumerate(layers))
    flops += epochs * N_TEST * sum(2 * i * o for i, o in layers)
    return flops


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matrix-multiply throughput of this machine through JAX."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        dot(a, a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


# ----------------------------------------------------------------------------- sae_jax


def run_jax(data_dir: str, epochs: int, seed: int, cache: str | None) -> dict:
    import jax

    jax.config.update("jax_platforms", "cpu")
    if cache:
        from sae_jax.commands.prepare import enable_compilation_cache

        enable_compilation_cache(cache)
    from sae_jax.config import seed as seed_preset
    from sae_jax.data import load_idx_dir
    from sae_jax.training.pipeline import run_pipeline

    config = seed_preset().with_epochs(epochs).replace(seed=seed)
    m = load_idx_dir(data_dir)
    train = (jax.device_put(m.train_images.reshape(N_TRAIN, -1)), jax.device_put(m.train_labels))
    test = (jax.device_put(m.test_images.reshape(N_TEST, -1)), jax.device_put(m.test_labels))
    start = time.perf_counter()
    result = run_pipeline(config, train, test)
    pipeline_s = time.perf_counter() - start
    stages = {}
    for s in result.stages:
        if s.name in STAGES:
            stages[s.name] = {"epoch_s": [h["seconds"] for h in s.history], "wall_s": s.wall_s}
    return {"stages": stages, "pipeline_s": pipeline_s, "accuracy": result.test["accuracy"]}


# ----------------------------------------------------------------------------- harness


def child(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if args.side == "jax":
        out = run_jax(args.data_dir, args.epochs, args.seed, args.cache)
    else:
        from benchmark_torch import run_torch  # beside this file

        out = run_torch(args.data_dir, args.epochs, args.seed, args.side == "torch_compile")
    out["process_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def summarize(run: dict, epochs: int) -> dict:
    steps = math.ceil(N_TRAIN / BATCH)
    stages = {}
    for name, s in run["stages"].items():
        steady = statistics.median(s["epoch_s"][1:]) if epochs > 1 else s["epoch_s"][0]
        stages[name] = {
            "compile_s": max(s["epoch_s"][0] - steady, 0.0) if epochs > 1 else float("nan"),
            "us_per_step": steady / steps * 1e6,
            "wall_s": s["wall_s"],
        }
    return stages


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data_dir",
        default="../shared/data/mnist",
        help="folder with the four MNIST IDX files (default: ../shared/data/mnist)",
    )
    p.add_argument(
        "--epochs", type=int, default=10, help="epochs per stage, both sides (default: 10)"
    )
    p.add_argument("--repeats", type=int, default=3, help="repetitions of each side (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--platform", default="cpu", help="cpu; the PyTorch side runs on the CPU (default: cpu)"
    )
    p.add_argument(
        "--torch_compile",
        action="store_true",
        help="also time torch.compile (default: eager only)",
    )
    p.add_argument(
        "--no_compilation_cache",
        action="store_true",
        help="compile from scratch in every sae_jax run (default: the first run fills a "
        "fresh persistent cache that the later ones reuse, as the CLI does)",
    )
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)  # child process
    return p


def main() -> int:
    p = _parser()
    args = p.parse_args()
    if args.side:
        child(args)
        return 0
    _check(p, args)
    import jax
    import torch

    sides = ["jax", "torch", *(["torch_compile"] if args.torch_compile else [])]
    runs = _alternate(p, args, sides)
    _report(
        args,
        runs,
        sides,
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"{jax.devices()[0].device_kind}, {jax.device_count()} JAX device(s)",
    )
    return 0


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 and one line for a bad flag or a missing PyTorch."""
    if args.platform != "cpu":
        p.exit(2, f"error: --platform={args.platform}: this benchmark compares on the CPU\n")
    if args.epochs < 2 or args.repeats < 1:
        p.exit(
            2,
            "error: --epochs must be >= 2 (compile time needs a steady epoch) and --repeats >= 1\n",
        )
    if not Path(args.data_dir).is_dir():
        p.exit(2, f"error: --data_dir={args.data_dir}: not a directory\n")
    try:
        import torch  # noqa: F401
    except ImportError:
        p.exit(2, "error: PyTorch is not installed (pip install -e '.[bench]')\n")


def _alternate(
    p: argparse.ArgumentParser, args: argparse.Namespace, sides: list[str]
) -> dict[str, list[dict]]:
    """Every side ``args.repeats`` times, alternating, each in a fresh child process."""
    cache_dir = tempfile.mkdtemp(prefix="sae_jax_bench_cache_")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in sides:  # alternate: A B A B ...
            cmd = [
                sys.executable,
                __file__,
                f"--side={side}",
                f"--data_dir={args.data_dir}",
                f"--epochs={args.epochs}",
                f"--seed={args.seed}",
            ]
            if side == "jax" and not args.no_compilation_cache:
                cmd.append(f"--cache={cache_dir}")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stderr[-2000:])
                p.exit(1, f"error: the {side} run failed\n")
            runs[side].append(json.loads(line[len("RESULT ") :]))
            run = runs[side][-1]
            first = {n: round(s["epoch_s"][0], 2) for n, s in run["stages"].items()}
            print(
                f"repeat {r + 1}/{args.repeats} {side}: process {run['process_s']:.1f} s, "
                f"pipeline {run['pipeline_s']:.1f} s, first epochs {first}, "
                f"accuracy {run['accuracy']:.4f}",
                flush=True,
            )
    shutil.rmtree(cache_dir, ignore_errors=True)
    return runs


def _report(
    args: argparse.Namespace,
    runs: dict[str, list[dict]],
    sides: list[str],
    versions: str,
    machine: str,
) -> None:
    """The per-stage tables and the whole-run table, medians over the repetitions."""
    gflops = matmul_gflops()
    flops = workload_flops(args.epochs)
    med = statistics.median
    table = {
        s: {
            name: {
                k: med([summarize(run, args.epochs)[name][k] for run in runs[s]])
                for k in ("compile_s", "us_per_step", "wall_s")
            }
            for name in STAGES
        }
        for s in sides
    }
    print()
    print(f"machine: {machine}; {versions}")
    print(
        f"seed workload, {args.epochs} epochs per stage, median of {args.repeats} "
        f"alternating repetitions per side"
    )
    print(
        f"matrix-multiply throughput (jnp.dot 2048^2, float32): {gflops:.0f} GFLOP/s; "
        f"workload {flops / 1e12:.2f} TFLOP"
    )
    for other in sides[1:]:
        _stage_table(table, other)
    _whole_table(runs, sides, flops, gflops)


def _stage_table(table: dict, other: str) -> None:
    print()
    print(f"| stage | figure | sae_jax | {other} | {other} / sae_jax |")
    print("| --- | --- | --- | --- | --- |")
    for name in STAGES:
        for k, label in (("compile_s", "compile s"), ("us_per_step", "us / step"),
                         ("wall_s", "wall s")):  # fmt: skip
            a, b = table["jax"][name][k], table[other][name][k]
            print(f"| {name} | {label} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


def _whole_table(runs: dict[str, list[dict]], sides: list[str], flops: float, gflops: float):
    med = statistics.median
    print()
    print(
        "| side | pipeline s | process s | peak RSS MB | test accuracy | fraction of matmul peak |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for s in sides:
        pipe = med([r["pipeline_s"] for r in runs[s]])
        print(
            f"| {s} | {pipe:.1f} | {med([r['process_s'] for r in runs[s]]):.1f} | "
            f"{med([r['peak_rss_mb'] for r in runs[s]]):.0f} | "
            f"{med([r['accuracy'] for r in runs[s]]):.4f} | "
            f"{flops / pipe / (gflops * 1e9):.2f} |"
        )
    jax_pipe = med([r["pipeline_s"] for r in runs["jax"]])
    for s in sides[1:]:
        ratio = med([r["pipeline_s"] for r in runs[s]]) / jax_pipe
        print(f"end to end (pipeline): {s} / sae_jax = {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
