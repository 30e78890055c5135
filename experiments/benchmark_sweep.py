"""Sweeps spread over devices: the wall time of a sweep of M models on one CPU device
and on N CPU devices (faked with XLA_FLAGS=--xla_force_host_platform_device_count=N,
so they share this machine's cores), side by side.

Each sweep is a fresh child process running ``experiments/sweep.py --seeds=M`` with
the compilation cache off; the parent alternates one device, N devices, one
device, ... and prints, per model count, the median wall seconds of the sweep (from
``sweep.json``: training and evaluation, compilation included, data loading not)
and the ratio one device / N devices. Flags other than its own go to ``sweep.py``
(default: ``--config=tiny --config.batch_size=24``, a batch that divides over a
data axis of 2 or 4 devices).

  python experiments/benchmark_sweep.py --devices=4 --models=2,4,8
  python experiments/benchmark_sweep.py --devices=4 --models=2,4,8 --config=seed \\
      --epochs=1 --layers=500,500 --data_dir=../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SWEEP = Path(__file__).resolve().parent / "sweep.py"


def sweep_seconds(models: int, devices: int, flags: list[str], workdir: Path) -> float:
    """The sweep's wall seconds of ``models`` models in a child process with ``devices``
    CPU devices."""
    xla = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": xla.strip()}  # the caller's XLA flags, and the devices
    command = [sys.executable, str(SWEEP), "--platform=cpu", f"--seeds={models}"]
    command += ["--compilation_cache=off", f"--workdir={workdir}", *flags]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((workdir / "sweep.json").read_text())["runs"][0]["wall_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=4, help="N, the devices to compare with one")
    p.add_argument("--models", default="2,4,8", help="model counts (default: 2,4,8)")
    p.add_argument("--repeats", type=int, default=1, help="repetitions (default: 1)")
    args, sweep_flags = p.parse_known_args()  # the others go to sweep.py
    try:
        counts = [int(m) for m in args.models.split(",")]
    except ValueError:
        p.error(f"--models={args.models}: not a list of integers")
    # tiny's batch of 25 divides over no data axis of 2 or 4 devices; 24 does
    given = any(f.startswith("--config=") for f in sweep_flags)
    flags = [*([] if given else ["--config=tiny", "--config.batch_size=24"]), *sweep_flags]
    print(f"| models | 1 device (s) | {args.devices} devices (s) | 1 device / {args.devices} |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for models in counts:
            times: dict[int, list[float]] = {1: [], args.devices: []}
            for _ in range(args.repeats):
                for devices in times:
                    workdir = Path(tmp) / f"{models}-{devices}"
                    times[devices].append(sweep_seconds(models, devices, flags, workdir))
            one, many = (statistics.median(times[d]) for d in times)
            print(f"| {models} | {one:.1f} | {many:.1f} | {one / many:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
