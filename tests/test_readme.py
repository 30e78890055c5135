"""The README and the guides run as written: every block marked runnable, in order, from
the root of a copy of the repository (default flags, relative paths), with ../shared beside
it. The blocks run in this process, from that folder: ``sae-jax ...`` through the console
script's ``main`` (``conftest.run_in_process``), Python blocks by ``exec``; a run of the
seed preset on real MNIST through the console script, in a process compiled as users
compile (``conftest.TEST_XLA_FLAGS`` aside). The quick start through the console script
of an installed wheel, in processes of their own, is ``tests/test_wheel.py``'s."""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess

import numpy as np
import pytest
from conftest import REPO, SHARED_MNIST, TEST_XLA_FLAGS, command_argv, run_in_process

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

# The pages with runnable blocks, in an order in which each block finds what the ones
# before it leave (the README's quick start trains checkpoints/mnist; the guide to data
# writes my_digits.npz, trains checkpoints/own and then encodes it); any other page of
# docs/ after them.
PAGES = [
    "README.md",
    *(f"docs/guides/{g}.md" for g in ["running", "configs", "data", "sweeps", "losses"]),
]
DOCS = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").rglob("*.md")}
PAGES += sorted(p for p in DOCS - set(PAGES) if not p.startswith("docs/_build/"))
# (kind, body, page) of every runnable block, in that order
RUNNABLE = [
    (kind, body, page)
    for page in PAGES
    for kind, body in re.findall(
        r"<!-- runnable -->\n```(bash|python)\n(.*?)```", (REPO / page).read_text(), re.S
    )
]
# What the README marks optional, and what the test puts in its place (dropped if absent).
OPTIONAL = {"[--epochs=N]": "--epochs=1"}


def commands(block: str) -> list[list[str]]:
    """The command lines of a bash block as argv lists (continuations joined, comments
    dropped, optional parts substituted)."""
    lines = block.replace("\\\n", " ").splitlines()
    argvs = [shlex.split(line, comments=True) for line in lines]
    return [
        [OPTIONAL.get(a, a) for a in argv if a in OPTIONAL or a[0] != "["] for argv in argvs if argv
    ]


def exec_in_process(code: str, page: str, cwd) -> subprocess.CompletedProcess:
    """``code`` run in a namespace of its own in this process, from ``cwd``: status 0 and
    what it printed (an exception fails the test, traceback and all)."""
    out, here = io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out):
            exec(compile(code, page, "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["python", "-c", code], 0, out.getvalue(), "")


def test_commands_parse_as_documented():
    blocks = [body for kind, body, _ in RUNNABLE if kind == "bash"]
    seed = next(c for b in blocks for c in commands(b) if "--config=seed" in c)
    assert seed[-2:] == ["--workdir=checkpoints/seed", "--epochs=1"]  # [--seed=S] dropped
    assert [c[-1] for c in commands(blocks[0])] == ["--config=tiny", "--config=tiny", "--eval_only"]


def test_readme_runs_as_written(clone):
    assert sum(page == "README.md" for _, _, page in RUNNABLE) >= 2, "the quick start's"
    assert len(RUNNABLE) >= 6, "the README and the guides lost their runnable markers"
    ran, skipped = [], []
    for kind, body, page in RUNNABLE:
        written = [["python", "-c", body]] if kind == "python" else commands(body)
        for line in written:
            shown = body if kind == "python" else shlex.join(line)
            if "../shared/" in shown and not SHARED_MNIST.is_dir():
                skipped.append(shown)
                continue
            if kind == "python":
                proc = exec_in_process(body, page, cwd=clone)
            elif "--config=seed" in line:  # 60,000 examples: compiled as users compile
                env = {
                    **os.environ,
                    "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(TEST_XLA_FLAGS, ""),
                }
                proc = subprocess.run(
                    command_argv(line), cwd=clone, capture_output=True, text=True, timeout=600,
                    env=env,
                )  # fmt: skip
            else:
                assert line[0] == "sae-jax", f"{page}: {shown}"
                proc = run_in_process(line[1:], cwd=clone)
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
        pytest.skip(f"{len(ran)} documented steps ran; skipped for want of ../shared: {skipped}")


def test_losses_example_runs():
    example, page = next((body, page) for _, body, page in RUNNABLE if "def train_step" in body)
    namespace: dict = {}
    exec(compile(example, page, "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["params"]["w"].shape == (784, 256)
