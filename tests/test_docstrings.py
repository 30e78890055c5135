"""The commands printed in the docstrings of the subcommands (``sae-jax ...``) and of
the scripts of ``experiments/`` run as written, in a copy of the repository, at a tiny
size: ``sae-jax ...`` in this process (``conftest.run_in_process``: the console script's
``main``, from the copy's root), ``python ...`` as a process of its own."""

import os
import shlex
import subprocess

import numpy as np
import pytest
from conftest import REPO, SHARED_MNIST, command_argv, docstring_commands, run_in_process

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

# The commands printed in the docstrings of the subcommands and scripts, in the order
# they can run (encode reads the run that train leaves in checkpoints/mnist). Not here:
# the benchmark, whose commands tests/test_benchmark.py runs at a tiny size.
SCRIPTS = [
    "sae_jax/cli/main.py",
    "sae_jax/cli/train.py",
    "sae_jax/cli/encode.py",
    "sae_jax/cli/sweep.py",
    "sae_jax/cli/search.py",
    "experiments/benchmark_sweep.py",
]
# What each command gets appended to run at a tiny size: a few hundred examples, one
# epoch per stage, fewer seeds, points or model counts (a later flag wins).
SMALL_DATA = ["--config.train_examples=300", "--config.test_examples=100"]
SHRINK = {
    "--config=seed": [*SMALL_DATA, "--epochs=1"],
    "--config=sda3": [*SMALL_DATA, "--config.validation_examples=100", "--epochs=1"],
    "sae-jax sweep": ["--seeds=2", "--epochs=1"],
    "sae-jax search": ["--points=2", "--epochs=1"],
    # and the tests' compilation cache for its sweeps, which it turns off to time them
    "benchmark_sweep.py": [
        "--models=2",
        "--epochs=1",
        f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}",
    ],
}


def test_every_docstring_command_runs_at_a_tiny_size(clone):
    mnist = np.load(REPO / "sae_jax" / "_data" / "mnist_sample.npz")
    np.savez(clone / "my_data.npz", x=mnist["train_images"], y=mnist["train_labels"])
    ran, skipped = [], []
    for script in SCRIPTS:
        for argv in docstring_commands(REPO / script):
            extra = [f for key, flags in SHRINK.items() if key in " ".join(argv) for f in flags]
            shown = shlex.join(argv)
            if "../shared/" in shown and not SHARED_MNIST.is_dir():
                skipped.append(shown)
                continue
            if argv[0] == "sae-jax":
                proc = run_in_process([*argv[1:], *extra], cwd=clone)
            else:
                proc = subprocess.run(
                    [*command_argv(argv), *extra], cwd=clone, capture_output=True, text=True,
                    timeout=600, env=os.environ,
                )  # fmt: skip
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0 and "Traceback" not in output, f"{shown}\n{output}"
            ran.append(shown)
    assert len(ran) + len(skipped) == sum(len(docstring_commands(REPO / s)) for s in SCRIPTS) >= 12
    assert (clone / "codes.npy").is_file()
    if skipped:
        pytest.skip(f"{len(ran)} docstring commands ran; skipped: {skipped}")
