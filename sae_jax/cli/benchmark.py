"""Where the time of a training run goes, and the seed workload in sae_jax against plain
PyTorch.

Each run is a fresh child process. The sae_jax side runs what a user runs: the training
command (``sae-jax train`` of this package) in the child, with a fresh temporary
``--workdir``, so its checkpoints, summary and
figures count. Per repetition it runs twice: cold (an empty persistent compilation
cache) and warm (the cache the cold run filled). For each it prints the overhead
report (see ``benchmark_overhead``): per stage and outside the stages, the wall time,
the steady compute (epochs x the median steady epoch), the compilation, the
checkpoint seconds and the rest, and the programs compiled; then the derived checks.

``--config=tiny`` is sae_jax alone. ``--config=seed`` (784-1000-1500-10, batch 160, 10
epochs per stage by default) also runs the same computation in plain PyTorch
(``benchmark_torch``: tensors on the device, manual minibatch slicing of a
``randperm``, eager mode, ``--torch_compile`` adds a ``torch.compile``-d variant; its
RMSProp is ``torch.optim.RMSprop`` with the mean square started at 1 as in TF1) and
prints, per stage, compile s, us / step and wall s of sae_jax warm against PyTorch,
and per side the process seconds, peak memory and the fraction of the machine's
matrix-multiply throughput reached. The parent alternates sae_jax cold, sae_jax
warm, PyTorch, ... ``--repeats`` times; figures are medians.

  sae-jax benchmark --config=tiny --repeats=3
  pip install 'sae-jax[bench]'
  sae-jax benchmark --config=seed --data_dir=../shared/data/mnist --repeats=3

It measures the ``sae_jax`` it belongs to: to compare with other code, run that code's
own benchmark in its own checkout and environment. ``--platform=gpu`` runs
PyTorch on CUDA (synchronized before every timer read); ``--precision`` sets both
sides' float32 matrix-multiply precision. ``--train_examples``, ``--test_examples``
and ``--epochs`` shrink a run; ``--json=PATH`` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sae_jax.commands.flags import OneLineParser

CONFIGS = ("tiny", "seed")
PLATFORMS = ("cpu", "gpu", "tpu")
PRECISIONS = ("default", "highest")
SHARED_MNIST = "../shared/data/mnist"
PRECISION_TEXT = {
    "highest": "highest (jax_default_matmul_precision=highest; PyTorch "
    "set_float32_matmul_precision('highest'), allow_tf32 False): full float32",
    "default": "default (JAX's default: TF32 on a GPU that has it, float32 on the CPU; "
    "PyTorch on CUDA set_float32_matmul_precision('high'), allow_tf32 True, to match; "
    "on the CPU its default, float32)",
}


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add(
        "--config",
        default="tiny",
        help="tiny (sae_jax only) or seed (against PyTorch) (default: tiny)",
    )
    add(
        "--data_dir",
        default=None,
        help=f"folder with the four MNIST IDX files (default: "
        f"{SHARED_MNIST} for seed, the command's default for tiny: the bundled sample)",
    )
    add(
        "--epochs",
        type=int,
        default=None,
        help="epochs per stage (default: the preset's, 10 for seed)",
    )
    add("--train_examples", type=int, default=None, help="training examples (default: all)")
    add("--test_examples", type=int, default=None, help="test examples (default: all)")
    add("--repeats", type=int, default=3, help="repetitions of each side (default: 3)")
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add(
        "--platform",
        default="cpu",
        help="cpu, gpu or tpu; PyTorch runs on cpu or CUDA (default: cpu)",
    )
    add(
        "--precision",
        default="default",
        help="float32 matrix-multiply precision of both "
        "sides: default or highest (default: default)",
    )
    add(
        "--torch_compile",
        action="store_true",
        help="with seed, also time torch.compile (default: eager only)",
    )
    add("--json", default=None, help="also write every figure to this JSON file (default: none)")
    for hidden in ("--side", "--cache", "--workdir"):  # the child process's
        add(hidden, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``sae-jax benchmark`` (or, with the hidden ``--side``, one child run): parse
    ``argv`` (default ``sys.argv[1:]``), run; the exit status."""
    p = _parser(prog)
    args = p.parse_args(argv)
    if args.side:
        return child(args)
    _check(p, args)
    if args.config == "seed" and args.epochs is None:
        args.epochs = 10
    if args.config == "seed" and args.data_dir is None:
        args.data_dir = SHARED_MNIST
    runs = _alternate(p, args)
    from sae_jax.cli.benchmark_report import N_TEST, N_TRAIN, report, workload_flops

    n_train, n_test = args.train_examples or N_TRAIN, args.test_examples or N_TEST
    flops = workload_flops(args.epochs, n_train, n_test) if args.config == "seed" else None
    result = report(_header(args, runs), args.config, runs, n_train, flops)
    result["flags"] = {k: v for k, v in vars(args).items() if k not in ("side", "cache", "workdir")}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 and one line for a bad flag or a missing PyTorch."""
    for flag, value, allowed in (
        ("--config", args.config, CONFIGS),
        ("--platform", args.platform, PLATFORMS),
        ("--precision", args.precision, PRECISIONS),
    ):
        if value not in allowed:
            p.error(f"{flag}={value}: choose from {', '.join(allowed)}")
    least = 2 if args.config == "seed" else 1  # seed's comparison needs a steady epoch
    for flag, value, low in (
        ("--epochs", args.epochs, least),
        ("--repeats", args.repeats, 1),
        ("--train_examples", args.train_examples, 1),
        ("--test_examples", args.test_examples, 1),
    ):
        if value is not None and value < low:
            p.error(f"{flag}={value}: must be >= {low}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f"--json={args.json}: its folder does not exist")
    if args.config == "seed":
        _check_torch(p, args)
    data_dir = args.data_dir or (SHARED_MNIST if args.config == "seed" else None)
    if data_dir is not None and not Path(data_dir).is_dir():
        p.error(f"--data_dir={data_dir}: not a directory")


def _check_torch(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 and one line where the PyTorch side cannot run."""
    if args.platform == "tpu":
        p.error("--platform=tpu: the PyTorch side runs on cpu or gpu; --config=tiny runs on tpu")
    try:
        import torch
    except ImportError:
        p.error("--config=seed: PyTorch is not installed (pip install 'sae-jax[bench]')")
    if args.platform == "gpu" and not torch.cuda.is_available():
        p.error("--platform=gpu: this PyTorch has no CUDA device")


# ----------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> int:
    """One run in this (child) process; prints ``RESULT <json>`` on stdout."""
    if args.side == "jax":
        out = _child_jax(args)
        if out["status"] != 0:
            return out["status"]  # the command said why, on stderr
    else:
        from sae_jax.cli.benchmark_torch import run_torch

        out = run_torch(
            args.data_dir,
            args.epochs,
            args.seed,
            compile_=args.side == "torch_compile",
            device="cuda" if args.platform == "gpu" else "cpu",
            precision=args.precision,
            n_train=args.train_examples,
            n_test=args.test_examples,
        )
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))
    return 0


def _child_jax(args: argparse.Namespace) -> dict:
    """The training command on the flags' config, recorded (see ``benchmark_overhead``)."""
    import jax

    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    from sae_jax.cli.benchmark_overhead import run_command

    argv = [
        f"--platform={args.platform}",
        f"--config={args.config}",
        f"--seed={args.seed}",
        f"--compilation_cache={args.cache}",
    ]
    for flag, value in (
        ("--epochs", args.epochs),
        ("--data_dir", args.data_dir),
        ("--config.train_examples", args.train_examples),
        ("--config.test_examples", args.test_examples),
    ):
        if value is not None:
            argv.append(f"{flag}={value}")
    workdir = Path(args.workdir)
    run = run_command(argv, workdir)
    summary = workdir / "summary.json"
    run["accuracy"] = (
        json.loads(summary.read_text()).get("test_accuracy") if summary.is_file() else None
    )
    run["sae_jax"] = str(Path(__file__).resolve().parents[1])
    return run


# ----------------------------------------------------------------------------- parent


def _alternate(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Per repetition: sae_jax cold (a fresh compilation cache), sae_jax warm (the same
    cache), then each PyTorch side; each a fresh child process with a fresh workdir."""
    sides = ["torch", *(["torch_compile"] if args.torch_compile else [])]
    sides = sides if args.config == "seed" else []
    runs: dict[str, list[dict]] = {s: [] for s in ("cold", "warm", *sides)}
    tmp = Path(tempfile.mkdtemp(prefix="sae_jax_bench_"))
    try:
        for r in range(args.repeats):
            for temp in ("cold", "warm"):
                extra = [f"--cache={tmp / f'cache-{r}'}", f"--workdir={tmp / f'run-{r}-{temp}'}"]
                runs[temp].append(_spawn(p, args, "jax", extra, f"{r + 1} sae_jax {temp}"))
            for side in sides:
                runs[side].append(_spawn(p, args, side, [], f"{r + 1} {side}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return runs


def _spawn(p: argparse.ArgumentParser, args, side: str, extra: list[str], label: str) -> dict:
    """One child run; its ``RESULT`` with ``process_s``, the child's wall time."""
    cmd = [
        sys.executable,
        "-m",
        "sae_jax",
        "benchmark",
        f"--side={side}",
        f"--config={args.config}",
        f"--seed={args.seed}",
        f"--platform={args.platform}",
        f"--precision={args.precision}",
        *extra,
    ]
    for flag in ("epochs", "data_dir", "train_examples", "test_examples"):
        if getattr(args, flag) is not None:
            cmd.append(f"--{flag}={getattr(args, flag)}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    process_s = time.perf_counter() - start
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode == 2:  # a user mistake, which the command said in one line
        said = proc.stderr.strip().splitlines()
        p.exit(2, (said[-1] if said else f"error: the {side} run refused its flags") + "\n")
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stderr[-3000:])
        p.exit(1, f"error: the {label} run failed (exit status {proc.returncode})\n")
    run = json.loads(line[len("RESULT ") :])
    run["process_s"] = process_s
    first = {n: round(s["epoch_s"][0], 2) for n, s in run["stages"].items()}
    print(f"repeat {label}: process {process_s:.1f} s, first epochs {first}", flush=True)
    return run


def _header(args: argparse.Namespace, runs: dict[str, list[dict]]) -> list[str]:
    """The lines that say what ran where: machine, versions, code, sizes, precision."""
    import jax

    if args.platform != "gpu":
        jax.config.update("jax_platforms", args.platform)
    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    versions = f"jax {jax.__version__}"
    if args.config == "seed":
        import torch

        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    first = runs["cold"][0]
    preset = lambda value: value if value is not None else "the preset's"
    return [
        "",
        f"machine: {jax.devices()[0].device_kind}, {jax.device_count()} JAX device(s), "
        f"platform {args.platform}; {versions}",
        f"sae_jax from {first['sae_jax']}; command {first['command']}",
        f"config {args.config}: epochs per stage {preset(args.epochs)}, train examples "
        f"{preset(args.train_examples)}, test examples {preset(args.test_examples)}, "
        f"seed {args.seed}; median of {args.repeats} alternating repetitions",
        f"float32 matmul precision: {PRECISION_TEXT[args.precision]}",
    ]
