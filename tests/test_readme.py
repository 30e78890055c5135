"""The README runs as written: every block marked runnable, in order, from the root of a
copy of the repository (default flags, relative paths), with ../shared beside it."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED_MNIST

README = (REPO / "README.md").read_text()
RUNNABLE = re.findall(r"<!-- runnable -->\n```(bash|python)\n(.*?)```", README, re.S)
# What the README marks optional, and what the test puts in its place (dropped if absent).
OPTIONAL = {"[--epochs=N]": "--epochs=1"}
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    ".dev",
)


def commands(block: str) -> list[list[str]]:
    """The command lines of a bash block as argv lists (continuations joined, comments
    dropped, optional parts substituted)."""
    lines = block.replace("\\\n", " ").splitlines()
    argvs = [shlex.split(line, comments=True) for line in lines]
    return [
        [OPTIONAL.get(a, a) for a in argv if a in OPTIONAL or a[0] != "["] for argv in argvs if argv
    ]


def test_commands_parse_as_documented():
    blocks = [body for kind, body in RUNNABLE if kind == "bash"]
    seed = next(c for b in blocks for c in commands(b) if "--config=seed" in c)
    assert seed[-2:] == ["--workdir=checkpoints/seed", "--epochs=1"]  # [--seed=S] dropped
    assert [c[-1] for c in commands(blocks[0])] == ["--config=tiny", "--config=tiny", "--eval_only"]


@pytest.fixture
def clone(tmp_path):
    """A copy of the working tree at ``tmp/main`` (its checkpoints/ emptied), with
    ``tmp/shared`` pointing at the real ../shared."""
    root = tmp_path / "main"
    shutil.copytree(REPO, root, ignore=COPY_IGNORE)
    shutil.rmtree(root / "checkpoints")
    (root / "checkpoints").mkdir()
    if (REPO.parent / "shared").is_dir():
        (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    return root


def test_readme_runs_as_written(clone):
    assert len(RUNNABLE) >= 6, "the README lost its runnable markers"
    ran, skipped = [], []
    for kind, body in RUNNABLE:
        if kind == "python":
            steps = [[sys.executable, "-c", body]]
        else:
            steps = [[sys.executable if c[0] == "python" else c[0], *c[1:]] for c in commands(body)]
        for argv in steps:
            shown = body if kind == "python" else shlex.join(argv[1:])
            if "../shared/" in shown and not SHARED_MNIST.is_dir():
                skipped.append(shown)
                continue
            proc = subprocess.run(
                argv, cwd=clone, capture_output=True, text=True, timeout=600, env=os.environ
            )
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0 and "Traceback" not in output, f"{shown}\n{output}"
            ran.append((shown, proc.stdout))
    quick_start = [out for cmd, out in ran if cmd.endswith("--config=tiny")]
    assert len(quick_start) == 2 and "finished in an earlier run" in quick_start[1]
    evaluated = next(out for cmd, out in ran if cmd.endswith("--eval_only"))
    summary = (clone / "checkpoints" / "mnist" / "summary.json").read_text()
    accuracy = re.search(r'"test_accuracy": ([0-9.]+)', summary).group(1)
    assert f"test_accuracy {float(accuracy):.4f}" in evaluated
    loaded = next(out for cmd, out in ran if "load_model" in cmd)
    predicted = np.array(re.search(r"\[([0-9 ]+)\]", loaded).group(1).split(), int)
    assert predicted.shape == (8,) and (predicted == [7, 2, 1, 0, 4, 1, 4, 9]).mean() >= 0.5
    # configs as files: the replayed config.json reproduces the run
    runs = {w: clone / "checkpoints" / w for w in ("tiny_beta1", "tiny_again", "own")}
    config = {w: json.loads((d / "config.json").read_text()) for w, d in runs.items()}
    summary = {w: json.loads((d / "summary.json").read_text()) for w, d in runs.items()}
    assert (
        config["tiny_beta1"]["layers"][0]["beta"] == 1 == config["tiny_again"]["layers"][0]["beta"]
    )
    assert config["tiny_again"] == config["tiny_beta1"]
    assert summary["tiny_again"]["test_accuracy"] == summary["tiny_beta1"]["test_accuracy"]
    # your own data, and features out
    assert config["own"]["_run"] == {"data": {"path": str(clone / "my_digits.npz")}}
    assert summary["own"]["test_accuracy"] >= 0.8
    assert np.load(clone / "codes.npy").shape == (500, 64)
    assert list((runs["own"] / "tensorboard").glob("events.out.tfevents.*"))
    shapes = next(out for cmd, out in ran if "model.reconstruct" in cmd)
    assert re.findall(r"^\(8, \d+\)$", shapes, re.M) == ["(8, 64)", "(8, 32)", "(8, 784)"]
    searched = json.loads((clone / "checkpoints" / "search" / "search.json").read_text())
    assert (
        len(searched["runs"][0]["points"]) == 2 and len(searched["runs"][0]["test_accuracy"]) == 2
    )
    assert (clone / "checkpoints" / "search" / "search.md").read_text().count("| yes |") == 2
    if skipped:
        pytest.skip(f"{len(ran)} README steps ran; skipped for want of ../shared: {skipped}")


def test_losses_example_runs():
    example = next(body for _, body in RUNNABLE if "def train_step" in body)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["params"]["w"].shape == (784, 256)


# The commands printed in the docstrings of experiments/*.py, in the order they can
# run (encode.py reads the run that mnist.py leaves in checkpoints/mnist). Not here:
# benchmark.py, whose commands tests/test_benchmark.py runs at a tiny size.
SCRIPTS = ["mnist", "encode", "sweep", "search", "benchmark_sweep"]
# What each command gets appended to run at a tiny size: a few hundred examples, one
# epoch per stage, fewer seeds, points or model counts (a later flag wins).
SMALL_DATA = ["--config.train_examples=300", "--config.test_examples=100"]
SHRINK = {
    "--config=seed": [*SMALL_DATA, "--epochs=1"],
    "--config=sda3": [*SMALL_DATA, "--config.validation_examples=100", "--epochs=1"],
    "sweep.py": ["--seeds=2", "--epochs=1"],
    "search.py": ["--points=2", "--epochs=1"],
    # and the tests' compilation cache for its sweeps, which it turns off to time them
    "benchmark_sweep.py": [
        "--models=2",
        "--epochs=1",
        f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}",
    ],
}


def docstring_commands(script: str) -> list[list[str]]:
    """The ``python experiments/...`` command lines of ``script``'s docstring."""
    import ast

    doc = ast.get_docstring(ast.parse((REPO / "experiments" / f"{script}.py").read_text()))
    lines = doc.replace("\\\n", " ").splitlines()
    return [
        shlex.split(line, comments=True) for line in lines if line.strip().startswith("python ")
    ]


def test_every_experiment_docstring_command_runs_at_a_tiny_size(clone):
    mnist = np.load(REPO / "sae_jax" / "_data" / "mnist_sample.npz")
    np.savez(clone / "my_data.npz", x=mnist["train_images"], y=mnist["train_labels"])
    ran, skipped = [], []
    for script in SCRIPTS:
        for argv in docstring_commands(script):
            extra = [f for key, flags in SHRINK.items() if key in " ".join(argv) for f in flags]
            shown = shlex.join(argv)
            if "../shared/" in shown and not SHARED_MNIST.is_dir():
                skipped.append(shown)
                continue
            proc = subprocess.run(
                [sys.executable, *argv[1:], *extra], cwd=clone, capture_output=True, text=True,
                timeout=600, env=os.environ,
            )  # fmt: skip
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0 and "Traceback" not in output, f"{shown}\n{output}"
            ran.append(shown)
    assert len(ran) + len(skipped) == sum(len(docstring_commands(s)) for s in SCRIPTS) >= 10
    assert (clone / "codes.npy").is_file()
    if skipped:
        pytest.skip(f"{len(ran)} docstring commands ran; skipped: {skipped}")
